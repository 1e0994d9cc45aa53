"""``vlprune demo``: patch a tiny LLaVA-1.5-shaped model and show kept tokens and prefill time.

A random-weight model with LLaVA-1.5's token geometry (336 px, 14 px patches: 576 visual tokens)
at toy width, built offline. It shows what pruning does to the prefill, not accuracy.
"""

from __future__ import annotations

import statistics
import time

import torch

import vlprune
from vlprune.testing import tiny_config, tiny_tokenizer

DEMO_METHODS = ("random", "uniform", "fastv")


def demo_model() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A tiny LLaVA with 576 visual tokens per image and one prompt for it (batch 1)."""
    from transformers import LlavaForConditionalGeneration

    config = tiny_config("llava", hidden_size=256, intermediate_size=512, num_hidden_layers=8)
    config.vision_config.image_size = 336
    config.vision_config.hidden_size = 128
    config.vision_config.intermediate_size = 256
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()
    tokenizer = tiny_tokenizer()
    words = " ".join(f"w{i}" for i in range(40))
    ids = tokenizer(f"<s> {'<image> ' * 576}{words}", return_tensors="pt")
    pixels = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(0))
    return model, {"input_ids": ids.input_ids, "pixel_values": pixels}


@torch.no_grad()
def prefill_ms(model: torch.nn.Module, inputs: dict[str, torch.Tensor], repeats: int = 5) -> float:
    """Median wall time of one forward pass (prefill) in milliseconds, after one warm-up."""
    model(**inputs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(**inputs)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def run_demo(budgets: tuple[int, ...] = (64, 128, 192)) -> list[dict[str, object]]:
    """Prefill time and kept tokens of the unpruned model and of each demo method × budget."""
    model, inputs = demo_model()
    base = prefill_ms(model, inputs)
    rows: list[dict[str, object]] = [
        {"method": "none", "budget": 576, "tokens_into_llm": 576, "prefill_ms": base,
         "speedup": 1.0}
    ]
    for method in DEMO_METHODS:
        for budget in budgets:
            with vlprune.patch(model, method, budget=budget) as handle:
                ms = prefill_ms(model, inputs)
                kept = handle.stats.kept_tokens[0]
            rows.append({"method": method, "budget": budget, "tokens_into_llm": kept,
                         "prefill_ms": ms, "speedup": base / ms})
    return rows


def format_table(rows: list[dict[str, object]]) -> str:
    """Markdown table of :func:`run_demo` rows."""
    lines = ["| method | budget | visual tokens kept | prefill ms | speed-up |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['budget']} | {r['tokens_into_llm']} | "
                     f"{r['prefill_ms']:.1f} | {r['speedup']:.2f}× |")
    return "\n".join(lines)


def main() -> None:
    """Print the demo table."""
    print("tiny LLaVA-1.5-shaped model (random weights), 576 visual tokens, batch 1, CPU")
    print(format_table(run_demo()))
    print("(fastv keeps all 576 tokens in layers 0-1 and the budget from layer 2 on)")
