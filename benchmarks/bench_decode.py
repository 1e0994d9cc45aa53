"""Part 3 of ``bench_selection.py``: per-token decode time patched / unpatched.

The median interval between consecutive tokens of one ``generate`` (this thread's CPU time), at
batch 1 and with a left-padded batch of 4 prompts of different lengths, on
``llava-1.5-7b-mini``, in interleaved rounds.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import torch
from bench_harness import _median, _rounds  # beside this script
from transformers import LogitsProcessorList

import vlprune
from vlprune.eval.profiler.presets import PRESETS, build_preset_model, synthetic_inputs


def _padded(inputs: dict[str, torch.Tensor], pad: int) -> dict[str, torch.Tensor]:
    """Row b drops its last 3·b text tokens and is left-padded back to the batch width."""
    ids = inputs["input_ids"]
    batch, width = ids.shape
    new_ids = torch.full_like(ids, pad)
    mask = torch.zeros_like(ids)
    for b in range(batch):
        length = width - 3 * b
        new_ids[b, width - length:] = ids[b, :length]
        mask[b, width - length:] = 1
    return {**inputs, "input_ids": new_ids, "attention_mask": mask}


class _StepClock:
    """A logits processor that stamps this thread's CPU time at every generated token."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.stamps.append(time.thread_time())
        return scores


def _per_token_ms(model: Any, inputs: dict[str, torch.Tensor], new_tokens: int) -> float:
    """Decode CPU time per token: the median interval between consecutive generated tokens of
    one ``generate`` (each a decode step: the prefill is never inside an interval)."""
    clock = _StepClock()
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, logits_processor=LogitsProcessorList([clock]))
    return _median([(b - a) * 1e3 for a, b in itertools.pairwise(clock.stamps)])


def _decode_batch(model: Any, inputs: dict[str, torch.Tensor], methods: list[str], budget: int,
                  new_tokens: int, rounds: int, desc: str) -> list[dict[str, Any]]:
    """Decode ratios of every method on one batch of inputs."""

    def measure(name: str | None) -> dict[str, float]:
        if name is None:
            return {"ms": _per_token_ms(model, inputs, new_tokens)}
        with vlprune.patch(model, name, budget=budget):
            return {"ms": _per_token_ms(model, inputs, new_tokens)}

    configs: list[str | None] = [None, *methods]
    results, loads = _rounds(configs, rounds, measure, desc)
    base = [m["ms"] for m in results[None]]
    out = []
    for name in methods:
        ms = [m["ms"] for m in results[name]]
        out.append({"method": name, "decode_ms": _median(ms), "base_ms": _median(base),
                    "ratio": _median([m / b for m, b in zip(ms, base)]), "loads": loads})
    return out


def decode_ratios(methods: list[str], budget: int, new_tokens: int, rounds: int
                  ) -> list[dict[str, Any]]:
    """Part 3 (see the module docstring)."""
    preset = PRESETS["llava-1.5-7b-mini"]
    model = build_preset_model(preset)
    out = []
    for batch in (1, 4):
        inputs = synthetic_inputs(model.config, preset.family, image_size=preset.image_size,
                                  text_tokens=64, batch=batch)
        if batch > 1:
            inputs = _padded(inputs, int(model.config.pad_token_id))
        rows = _decode_batch(model, inputs, methods, budget, new_tokens, rounds,
                             f"decode b{batch}")
        out += [{**row, "batch": batch} for row in rows]
    return out
