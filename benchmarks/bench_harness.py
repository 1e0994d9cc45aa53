"""Shared harness of the CPU selection benchmarks (``bench_selection.py``, ``bench_decode.py``).

This thread's CPU time of a call, medians, the load average, interleaved rounds with a warm-up,
and LLaVA-1.5-7B widths with random weights and a synthetic 336 px prompt.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from vlprune.eval.profiler.presets import MODEL_CLASSES, llava_15_7b, synthetic_inputs


def _cpu_ms(fn: Callable[[], Any]) -> float:
    start = time.thread_time()
    fn()
    return (time.thread_time() - start) * 1e3


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _load() -> float:
    return os.getloadavg()[0]


def build_llava(llm_layers: int, dtype: torch.dtype, *, narrow_llm: bool = False) -> Any:
    """LLaVA-1.5-7B widths with ``llm_layers`` decoder layers (``narrow_llm``: a 64-wide LLM,
    so that a prefill is its vision tower), random weights, eval mode."""
    config = llava_15_7b(mini=False)
    config.text_config.num_hidden_layers = llm_layers
    if narrow_llm:
        for key, value in {"hidden_size": 64, "intermediate_size": 172,
                           "num_attention_heads": 4, "num_key_value_heads": 4}.items():
            setattr(config.text_config, key, value)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = MODEL_CLASSES["llava"]._from_config(config, attn_implementation="sdpa",
                                                    dtype=dtype)
    return model.eval()


def _inputs(model: Any, dtype: torch.dtype, batch: int = 1) -> dict[str, torch.Tensor]:
    return synthetic_inputs(model.config, "llava", image_size=(336, 336), text_tokens=64,
                            batch=batch, dtype=dtype)


@torch.no_grad()
def _prefill(model: Any, inputs: dict[str, torch.Tensor]) -> None:
    model(**inputs, use_cache=True, logits_to_keep=1)


def _rounds(configs: list[Any], rounds: int, measure: Callable[[Any], dict[str, float]],
            desc: str) -> tuple[dict[Any, list[dict[str, float]]], list[float]]:
    """Run ``measure(config)`` for every config in rotated order, ``rounds`` + 1 times (the
    first is a warm-up); returns the measurements per config and the load after each round."""
    out: dict[Any, list[dict[str, float]]] = {config: [] for config in configs}
    loads = []
    with tqdm(total=(rounds + 1) * len(configs), desc=desc, file=sys.stderr) as bar:
        for r in range(rounds + 1):
            shift = r % len(configs)
            for config in configs[shift:] + configs[:shift]:
                result = measure(config)
                if r:
                    out[config].append(result)
                bar.update()
            loads.append(_load())
    return out, loads
