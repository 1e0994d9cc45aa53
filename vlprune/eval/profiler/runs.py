"""The profiled runs on one prepared target: the baseline and each (method, budget).

Each run counts the prefill's FLOPs (the selection's own apart), reads the token counts from
the patch's ``handle.stats`` and the projector's input rows from a pre-hook, and times prefill,
``generate`` and peak memory when the target is timed.
"""

from __future__ import annotations

import statistics
from typing import Any

import torch

import vlprune
from vlprune.adapters import get_adapter
from vlprune.eval.profiler.flops import (
    FlopsBreakdown,
    RunTokens,
    exact_flops,
    flop_counter,
    paper_macs,
)
from vlprune.eval.profiler.presets import ImageGeometry
from vlprune.eval.profiler.target import ProfileSettings, _Target
from vlprune.eval.profiler.timing import (
    SelectionMeter,
    Spread,
    peak_memory_mb,
    time_generate,
    time_prefill,
)


def _run_tokens(stats: Any, geometry: ImageGeometry, rows: int | None) -> list[RunTokens]:
    """Per-sample token counts from ``handle.stats`` (one image per sample); ``rows``: the
    projector's input rows observed for the whole batch."""
    vision = list(getattr(stats, "vision_layer_tokens", []) or [])
    batch = len(stats.layer_tokens)
    per_sample = None if rows is None else rows // batch
    return [RunTokens(list(layers), [geometry], [vision[i]] if i < len(vision) else [],
                      per_sample) for i, layers in enumerate(stats.layer_tokens)]


class _ProjectorRows:
    """Counts the feature rows entering the projector / merger while installed."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.rows = 0
        self._handle = get_adapter(model).projector.register_forward_pre_hook(
            self._count, with_kwargs=True)

    def _count(self, module: Any, args: tuple, kwargs: dict) -> None:
        features = args[0] if args else next(iter(kwargs.values()))
        self.rows += features.numel() // features.shape[-1]

    def remove(self) -> None:
        """Remove the hook."""
        self._handle.remove()


def _sum(parts: list[FlopsBreakdown]) -> FlopsBreakdown:
    return FlopsBreakdown(*(sum(getattr(p, k) for p in parts) for k in
                            ("vision", "projector", "llm", "lm_head", "decode")),
                          new_tokens=parts[0].new_tokens)


def _ms(spread: Spread | None) -> dict[str, float | None]:
    if spread is None:
        return {"median": None, "p25": None, "p75": None}
    return {"median": spread.median, "p25": spread.p25, "p75": spread.p75}


class _Profiler:
    """Runs the baseline and each (method, budget) on one prepared target."""

    def __init__(self, settings: ProfileSettings, target: _Target) -> None:
        self.s = settings
        self.t = target
        self.model = target.runner.model

    @torch.no_grad()
    def _prefill(self) -> None:
        self.model(**self.t.inputs, use_cache=True, logits_to_keep=1)

    def _flops(self, runs: list[RunTokens], counted: float | None,
               select_flops: float | None) -> dict[str, Any]:
        text = self.t.arch.text
        new = self.s.new_tokens
        exact = _sum([exact_flops(self.t.arch, r, new_tokens=new) for r in runs])
        full_n2 = _sum([exact_flops(self.t.arch, r, new_tokens=new, causal=False) for r in runs])
        if self.t.meta is not None:
            counted = _sum([self.t.meta.count(r, new_tokens=1) for r in runs]).prefill
        paper = sum(paper_macs(r.layer_tokens, text.hidden, text.intermediate) for r in runs)
        first = runs[0].layer_tokens
        return {
            "llm_input_tokens": first[0],
            "mean_layer_tokens": statistics.fmean(first),
            "paper_tmacs": paper / 1e12,
            "exact_tflops_prefill": exact.prefill / 1e12,
            "exact_tflops_vision": (exact.vision + exact.projector) / 1e12,
            "exact_tflops_llm": (exact.llm + exact.lm_head) / 1e12,
            "exact_gflops_decode_per_token": exact.decode_per_token / 1e9,
            "exact_tflops_total": exact.total / 1e12,
            "analytic_full_attn_tflops_prefill": full_n2.prefill / 1e12,
            "counted_tflops_prefill": None if counted is None else counted / 1e12,
            "counted_vs_analytic": None if counted is None else counted / full_n2.prefill,
            "select_gflops": None if select_flops is None else select_flops / 1e9,
            "layer_tokens": list(first),
            "vision_layer_tokens": [list(v) for v in runs[0].vision_layer_tokens],
            "projector_rows": runs[0].projector_rows,
        }

    def _measure(self, meter: SelectionMeter | None) -> dict[str, Any]:
        if not self.t.timing:
            return {}
        s = self.s
        prefill, select = time_prefill(self.model, self.t.inputs, warmup=s.warmup,
                                       repeats=s.repeats, meter=meter)
        gen = time_generate(self.model, self.t.inputs, new_tokens=s.new_tokens, warmup=s.warmup,
                            repeats=s.repeats if s.decode_repeats is None else s.decode_repeats)
        share = None if select is None else select.median / prefill.median
        return {
            "prefill_ms": _ms(prefill), "select_ms": _ms(select), "select_share": share,
            "ttft_ms": _ms(gen.ttft),
            "decode_ms_per_token": _ms(gen.decode_per_token), "e2e_ms": _ms(gen.end_to_end),
            "peak_mb": peak_memory_mb(self.model, self.t.inputs),
        }

    def _counted_prefill(self, meter: SelectionMeter | None) -> tuple[float | None, int]:
        """Prefill run that fills ``handle.stats``: (counted FLOPs when the real model runs,
        less the selection's own; feature rows the projector received)."""
        rows = _ProjectorRows(self.model)
        try:
            if not self.s.count or self.t.meta is not None:
                self._prefill()
                return None, rows.rows
            if meter is not None:
                meter.count = True
                meter.reset()
            with flop_counter() as counter:
                self._prefill()
            if meter is not None:
                meter.count = False
            return counter.get_total_flops() - (meter.flops if meter else 0.0), rows.rows
        finally:
            rows.remove()

    def baseline(self) -> dict[str, Any]:
        """The unpatched model."""
        counted, rows = self._counted_prefill(None)
        length = self.t.inputs["input_ids"].shape[1]
        layers = self.t.arch.text.layers
        runs = [RunTokens([length] * layers, [self.t.geometry], [], rows // self.s.batch)
                for _ in range(self.s.batch)]
        row = {"method": "baseline", "budget": None, "status": "ok", "note": "",
               "visual_tokens": self.t.geometry.tokens, "kept_tokens": self.t.geometry.tokens}
        row.update(self._flops(runs, counted, None))
        row.update(self._measure(None))
        return row

    def method(self, name: str, budget: int | float) -> dict[str, Any]:
        """One patched run; ``n/a`` when the method refuses the model at patch time."""
        row: dict[str, Any] = {"method": name, "budget": budget, "status": "ok", "note": ""}
        amount = {"ratio": budget} if isinstance(budget, float) else {"budget": budget}
        try:
            handle = vlprune.patch(self.model, name, **amount)
        except (TypeError, ValueError) as err:
            return {**row, "status": "n/a", "note": str(err)}
        meter = SelectionMeter(handle.method, self.t.inputs["input_ids"].device,
                               handle.probes.values())
        try:
            counted, rows = self._counted_prefill(meter)
            stats = handle.stats
            row["visual_tokens"] = stats.visual_tokens[0]
            row["kept_tokens"] = stats.kept_tokens[0]
            select = meter.flops if self.s.count and self.t.meta is None else None
            row.update(self._flops(_run_tokens(stats, self.t.geometry, rows), counted, select))
            row.update(self._measure(meter))
        except Exception as err:  # one failing method must not end the sweep
            return {**row, "status": "error", "note": f"{type(err).__name__}: {err}"}
        finally:
            meter.remove()
            handle.unpatch()
        return row

