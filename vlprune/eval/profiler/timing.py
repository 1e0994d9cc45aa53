"""Latency and memory of one model call, measured the same way for the baseline and each method.

- Prefill (the forward over the prompt with ``use_cache=True`` and ``logits_to_keep=1``): CUDA
  events around the call on GPU, ``time.perf_counter`` on CPU.
- Generation of ``N`` tokens (greedy, exactly ``N`` via ``min_new_tokens``): a streamer stamps
  each new token; ``generate`` copies every token to the host before handing it over, so the
  device is synchronised at each stamp. Time to first token is the first stamp, decode time per
  token the mean gap between the first and the last stamp, end to end the whole call.
- Selection overhead: the method's own ``encoder_choose`` / ``select`` / ``choose`` (probe
  computations included, also those a probe runs inside the forward's hooks), timed inside the
  prefill by wrapping the handle's method and probe instances (CUDA events on GPU).
- Peak memory of the prefill: ``torch.cuda.max_memory_allocated`` on GPU; on CPU the model's
  parameters and buffers plus the peak of live tensor bytes allocated during the call, read
  from ``torch.profiler`` memory events (the profiled call is not one of the timed ones).

Every measurement has warm-up runs first and reports the median and the 25th / 75th
percentiles of its repeats.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.generation.streamers import BaseStreamer

from vlprune.eval.profiler.flops import flop_counter

__all__ = [
    "SelectionMeter",
    "Spread",
    "TokenClock",
    "peak_memory_mb",
    "time_generate",
    "time_prefill",
]


@dataclass(frozen=True)
class Spread:
    """Median and 25th / 75th percentiles of ``n`` samples (milliseconds)."""

    median: float
    p25: float
    p75: float
    n: int

    @classmethod
    def of(cls, samples: list[float]) -> Spread:
        """Summarise ``samples`` (at least one)."""
        if len(samples) == 1:
            return cls(samples[0], samples[0], samples[0], 1)
        q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
        return cls(statistics.median(samples), q1, q3, len(samples))


def _is_cuda(device: torch.device) -> bool:
    return device.type == "cuda"


def _sync(device: torch.device) -> None:
    if _is_cuda(device):
        torch.cuda.synchronize(device)


@contextmanager
def _timer(device: torch.device, out: list[float]) -> Iterator[None]:
    """Appends the wall time (ms) of the block to ``out``: CUDA events on GPU."""
    if _is_cuda(device):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        torch.cuda.synchronize(device)
        out.append(start.elapsed_time(end))
    else:
        start_s = time.perf_counter()
        yield
        out.append((time.perf_counter() - start_s) * 1e3)


class SelectionMeter:
    """Times (and optionally counts the FLOPs of) a method's own work: ``encoder_choose``,
    ``select`` and ``choose``, probe computations included (those run on request inside them,
    and the ``work`` of ``probes`` that compute inside the forward's hooks).

    Shadows them on the method and probe *instances* of one patch handle (nothing global) and
    restores them in :meth:`remove`; a call inside another timed call is not counted twice.
    ``ms`` / ``flops`` accumulate until :meth:`reset`. On CPU, ``clock`` (seconds) is
    ``time.perf_counter``; ``time.thread_time`` counts only this thread's CPU time (steadier on
    a busy machine when torch runs one thread).
    """

    def __init__(self, method: Any, device: torch.device, probes: Iterable[Any] = (),
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.device = device
        self.clock = clock
        self.count = False
        self.flops = 0.0
        self._events: list[tuple[Any, Any]] = []
        self._host_ms = 0.0
        self._depth = 0
        targets = [(method, ("encoder_choose", "select", "choose"))]
        targets += [(probe, type(probe).work) for probe in probes]
        self._shadowed = [(obj, name) for obj, names in targets for name in names
                          if name not in vars(obj)]
        for obj, name in self._shadowed:
            setattr(obj, name, self._wrap(getattr(obj, name)))

    def _wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if self._depth:
                return fn(*args, **kwargs)
            self._depth += 1
            try:
                if self.count:
                    with flop_counter() as counter:
                        result = self._timed(fn, args, kwargs)
                    self.flops += counter.get_total_flops()
                    return result
                return self._timed(fn, args, kwargs)
            finally:
                self._depth -= 1

        return timed

    def _timed(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        if _is_cuda(self.device):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = fn(*args, **kwargs)
            end.record()
            self._events.append((start, end))
            return result
        start_s = self.clock()
        result = fn(*args, **kwargs)
        self._host_ms += (self.clock() - start_s) * 1e3
        return result

    @property
    def ms(self) -> float:
        """Selection time since the last reset (synchronises on GPU)."""
        _sync(self.device)
        return self._host_ms + sum(s.elapsed_time(e) for s, e in self._events)

    def reset(self) -> None:
        """Zero the time and FLOPs."""
        self._events.clear()
        self._host_ms = 0.0
        self.flops = 0.0

    def remove(self) -> None:
        """Restore the method's and probes' own functions."""
        for obj, name in self._shadowed:
            vars(obj).pop(name, None)


class TokenClock(BaseStreamer):
    """Streamer that stamps each ``put`` (the prompt first, then every new token)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        """Record the time (tokens arrive on the host, so the device is synchronised)."""
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        """Nothing to flush."""


@torch.no_grad()
def time_prefill(model: nn.Module, inputs: dict[str, torch.Tensor], *, warmup: int, repeats: int,
                 meter: SelectionMeter | None = None) -> tuple[Spread, Spread | None]:
    """(prefill ms, selection ms within it) over ``repeats`` runs after ``warmup`` runs."""
    device = inputs["input_ids"].device
    for _ in range(warmup):
        model(**inputs, use_cache=True, logits_to_keep=1)
    times: list[float] = []
    select: list[float] = []
    for _ in range(repeats):
        if meter is not None:
            meter.reset()
        with _timer(device, times):
            model(**inputs, use_cache=True, logits_to_keep=1)
        if meter is not None:
            select.append(meter.ms)
    return Spread.of(times), (Spread.of(select) if meter is not None else None)


@dataclass
class GenerateTiming:
    """Time to first token, decode time per token and end-to-end time of ``new_tokens``."""

    ttft: Spread
    decode_per_token: Spread | None
    end_to_end: Spread
    new_tokens: int
    samples: list[dict[str, float]] = field(default_factory=list)


@torch.no_grad()
def time_generate(model: nn.Module, inputs: dict[str, torch.Tensor], *, new_tokens: int,
                  warmup: int, repeats: int) -> GenerateTiming:
    """Greedy ``generate`` of exactly ``new_tokens`` tokens, timed per token (module doc)."""
    device = inputs["input_ids"].device
    kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
    for _ in range(warmup):
        model.generate(**inputs, **kwargs)
    ttft, decode, total = [], [], []
    for _ in range(repeats):
        clock = TokenClock()
        _sync(device)
        start = time.perf_counter()
        model.generate(**inputs, **kwargs, streamer=clock)
        _sync(device)
        end = time.perf_counter()
        tokens = clock.stamps[1:]
        ttft.append((tokens[0] - start) * 1e3)
        total.append((end - start) * 1e3)
        if len(tokens) > 1:
            decode.append((tokens[-1] - tokens[0]) * 1e3 / (len(tokens) - 1))
    return GenerateTiming(Spread.of(ttft), Spread.of(decode) if decode else None,
                          Spread.of(total), new_tokens)


def _model_bytes(model: nn.Module) -> int:
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (the profiler's C++ side logs two lines per session)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _cpu_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak of live CPU tensor bytes allocated during ``fn()`` (profiler memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    changes = []
    for event in prof.events():
        change = event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage
        if change:
            changes.append((event.time_range.start, change))
    live = peak = 0
    for _, change in sorted(changes):
        live += change
        peak = max(peak, live)
    return peak


@torch.no_grad()
def peak_memory_mb(model: nn.Module, inputs: dict[str, torch.Tensor]) -> float:
    """Peak memory (MiB) of one prefill, weights included (module doc)."""
    device = inputs["input_ids"].device

    def prefill() -> None:
        model(**inputs, use_cache=True, logits_to_keep=1)

    if _is_cuda(device):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        prefill()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    return (_model_bytes(model) + _cpu_peak_bytes(prefill)) / 2**20
