"""Prefill time of several pruning settings on one model, measured interleaved.

A busy machine drifts: a setting timed a minute after another meets a different load. Here every
round times each setting once, in turn (the unpruned model first), so all settings share the
same drift; a setting's speed-up is the median over rounds of ``t(none) / t(setting)`` within
the round. Round 0 is a warm-up and is not recorded.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

import vlprune
from vlprune.eval.profiler.timing import Spread

__all__ = ["PrefillTiming", "Setting", "time_settings"]

Setting = tuple[str, dict[str, Any]]
"""``(method, patch keywords)``; ``("none", {})`` is the unpruned model."""


@dataclass(frozen=True)
class PrefillTiming:
    """One setting's batch-1 prefill: median and quartiles (ms) over the rounds, and its
    speed-up over the unpruned model (median of per-round ratios; 1 for ``none``)."""

    ms: Spread
    speedup: float

    def as_dict(self) -> dict[str, float]:
        """``prefill_ms`` (median), ``prefill_ms_p25`` / ``_p75`` and ``speedup``."""
        return {"prefill_ms": self.ms.median, "prefill_ms_p25": self.ms.p25,
                "prefill_ms_p75": self.ms.p75, "speedup": self.speedup}


@torch.no_grad()
def _prefill_ms(model: torch.nn.Module, inputs: dict[str, torch.Tensor],
                setting: Setting) -> float:
    method, kwargs = setting
    if method == "none":
        start = time.perf_counter()
        model(**inputs, logits_to_keep=1)
        return (time.perf_counter() - start) * 1e3
    with vlprune.patch(model, method, **kwargs):
        start = time.perf_counter()
        model(**inputs, logits_to_keep=1)
        return (time.perf_counter() - start) * 1e3


def time_settings(
    model: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    settings: Sequence[Setting],
    *,
    repeats: int = 7,
    progress: Callable[[], None] | None = None,
) -> list[PrefillTiming]:
    """Prefill timing of each of ``settings`` (same order) on ``inputs`` (CPU wall time): a
    warm-up round, then ``repeats`` rounds of the unpruned model followed by every other
    setting (``none`` reports the unpruned runs). ``progress()`` is called after each round."""
    if repeats < 1:
        raise ValueError(f"`repeats` must be ≥ 1, got {repeats}")
    base: list[float] = []
    times: list[list[float]] = [[] for _ in settings]
    for r in range(repeats + 1):
        none = _prefill_ms(model, inputs, ("none", {}))
        row = [none if s[0] == "none" else _prefill_ms(model, inputs, s) for s in settings]
        if r:
            base.append(none)
            for column, ms in zip(times, row):
                column.append(ms)
        if progress is not None:
            progress()
    return [
        PrefillTiming(Spread.of(column), statistics.median(b / t for b, t in zip(base, column)))
        for column in times
    ]
