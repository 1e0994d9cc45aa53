"""Profile a model under every requested method and budget: FLOPs, latency, memory.

One row per (method, budget) plus the unpruned baseline, run on the same model object with the
same attention backend. Per-layer token counts always come from the patch's own
``handle.stats`` (``layer_tokens``, and ``vision_layer_tokens`` for methods that cut inside the
vision encoder), whatever the method's stage; the feature rows entering the projector / merger
(which an encoder cut after the last layer changes) are observed by a pre-hook of the profiler.

Where the model runs:

- mini presets, real checkpoints, and full-size presets on CUDA: the model itself; counted
  FLOPs from ``FlopCounterMode`` on its prefill (selection FLOPs counted apart).
- full-size presets on CPU (a 7B forward is out of reach), unless timing is forced: the
  preset's ``-mini`` twin, which has the same token geometry and depth, runs the method to
  obtain the token counts; analytic FLOPs use the full-size sizes, counted FLOPs come from the
  full-size modules on the ``meta`` device (:mod:`~vlprune.eval.profiler.meta`), and latency is
  not measured.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

import vlprune
from vlprune.adapters import get_adapter
from vlprune.eval.profiler.flops import (
    Arch,
    FlopsBreakdown,
    RunTokens,
    arch_from_config,
    exact_flops,
    flop_counter,
    paper_macs,
)
from vlprune.eval.profiler.meta import MetaCounter
from vlprune.eval.profiler.presets import (
    PRESETS,
    ImageGeometry,
    ProfileModel,
    build_preset_model,
    image_geometry,
    load_model,
    synthetic_inputs,
)
from vlprune.eval.profiler.timing import (
    SelectionMeter,
    Spread,
    peak_memory_mb,
    time_generate,
    time_prefill,
)
from vlprune.registry import get_method

__all__ = ["ProfileResult", "ProfileSettings", "parse_budget", "run_profile"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_budget(text: str) -> int | float:
    """``"64"`` → 64 tokens; ``"0.25"`` → ratio 0.25."""
    return float(text) if "." in text else int(text)


@dataclass
class ProfileSettings:
    """What to profile and how (the ``vlprune profile`` options).

    ``methods=None``: every registered method. ``dtype="auto"``: float32 on CPU, bfloat16 on
    CUDA. ``timing=None``: on, except for full-size presets on CPU (FLOPs only, from the mini
    twin's token counts); ``timing=True`` builds and times even a full-size preset on CPU.
    ``threads``: ``torch.set_num_threads`` for the run (CPU timings on a busy machine are far
    steadier with 1). ``decode_repeats``: timed ``generate`` calls (None: ``repeats``).
    """

    model: str
    methods: list[str] | None = None
    budgets: list[int | float] = field(default_factory=lambda: [64, 128, 192])
    device: str = "cpu"
    dtype: str = "auto"
    attn: str = "sdpa"
    new_tokens: int = 16
    warmup: int = 1
    repeats: int = 5
    batch: int = 1
    image_size: tuple[int, int] | None = None
    text_tokens: int = 64
    timing: bool | None = None
    count: bool = True
    progress: bool = True
    seed: int = 0
    threads: int | None = None
    decode_repeats: int | None = None

    def torch_dtype(self) -> torch.dtype:
        """The dtype to build the model in."""
        if self.dtype == "auto":
            return torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        if self.dtype not in DTYPES:
            raise ValueError(f"`dtype` must be auto or one of {', '.join(DTYPES)}")
        return DTYPES[self.dtype]


@dataclass
class ProfileResult:
    """Rows (one per baseline / method x budget) and the run's settings and environment."""

    rows: list[dict[str, Any]]
    info: dict[str, Any]


@dataclass
class _Target:
    """The model that runs, the sizes FLOPs are reported for, and how FLOPs are counted."""

    runner: ProfileModel
    arch: Arch
    geometry: ImageGeometry
    inputs: dict[str, torch.Tensor]
    timing: bool
    meta: MetaCounter | None
    counted_source: str | None


def _prepare(settings: ProfileSettings, model: ProfileModel | None) -> _Target:
    dtype = settings.torch_dtype()
    preset = PRESETS.get(settings.model)
    on_cpu = not settings.device.startswith("cuda")
    twin = (model is None and preset is not None and not preset.mini and on_cpu
            and settings.timing is not True)
    image = settings.image_size or (preset.image_size if preset else None)
    meta = None
    if twin:
        runner = load_model(preset.twin, device=settings.device, dtype=dtype,
                            attn_implementation=settings.attn)
        full = build_preset_model(preset, device="meta", attn_implementation=settings.attn)
        config, family = full.config, preset.family
        meta = MetaCounter(full, family) if settings.count else None
        source = "meta device (full-size modules)" if meta else None
    else:
        runner = model or load_model(settings.model, device=settings.device, dtype=dtype,
                                     attn_implementation=settings.attn)
        config, family = runner.config, runner.family
        source = "FlopCounterMode on the prefill" if settings.count else None
    image = image or runner.image_size
    inputs = synthetic_inputs(runner.config, family, image_size=image,
                              text_tokens=settings.text_tokens, batch=settings.batch,
                              seed=settings.seed, device=settings.device, dtype=dtype)
    timing = settings.timing if settings.timing is not None else not twin
    return _Target(runner, arch_from_config(config, family), image_geometry(config, family, image),
                   inputs, timing, meta, source)


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


def _speedups(rows: list[dict[str, Any]]) -> None:
    base = rows[0]
    if base["status"] != "ok":
        return
    for row in rows:
        if row["status"] != "ok":
            continue
        row["flops_speedup"] = base["exact_tflops_prefill"] / row["exact_tflops_prefill"]
        for key, out in (("prefill_ms", "speedup_prefill"), ("e2e_ms", "speedup_e2e")):
            if row.get(key) and base.get(key):
                row[out] = base[key]["median"] / row[key]["median"]


def _progress(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="vlprune profile", unit="run", file=sys.stderr,
                disable=not enabled)


def run_profile(settings: ProfileSettings,
                on_row: Callable[[dict[str, Any]], None] | None = None, *,
                model: ProfileModel | None = None,
                deadline: float | None = None) -> ProfileResult:
    """Profile ``settings.model``: the baseline, then every method x budget (see module doc);
    ``on_row`` sees each row as soon as it is done.

    ``model``: an already built model to run (its device, dtype and attention implementation
    are used as they are) instead of loading ``settings.model``. ``deadline``: a
    ``time.monotonic()`` value; runs not started by then get a ``skipped`` row.
    """
    methods = settings.methods if settings.methods is not None else vlprune.list_methods()
    for name in methods:
        get_method(name)  # unknown names fail before any model is built
    threads = torch.get_num_threads()
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    try:
        target = _prepare(settings, model)
        profiler = _Profiler(settings, target)
        jobs: list[tuple[str, Any]] = [("baseline", None)]
        jobs += [(m, b) for m in methods for b in settings.budgets]
        rows: list[dict[str, Any]] = []
        with _progress(len(jobs), settings.progress) as bar:
            for name, budget in jobs:
                bar.set_postfix_str(f"{name} {budget if budget is not None else ''}".strip())
                if deadline is not None and time.monotonic() > deadline:
                    row = {"method": name, "budget": budget, "status": "skipped",
                           "note": "time budget spent"}
                elif budget is None:
                    row = profiler.baseline()
                else:
                    row = profiler.method(name, budget)
                rows.append(row)
                if on_row is not None:
                    on_row(row)
                bar.update()
        _speedups(rows)
        return ProfileResult(rows, _info(settings, target))
    finally:
        torch.set_num_threads(threads)


def _info(settings: ProfileSettings, target: _Target) -> dict[str, Any]:
    import transformers

    model = target.runner.model
    return {
        "settings": asdict(settings),
        "model": settings.model,
        "runs_on": target.runner.name,
        "family": target.runner.family,
        "attn_implementation": model.config._attn_implementation,
        "dtype": str(next(model.parameters()).dtype),
        "device": settings.device,
        "device_name": (torch.cuda.get_device_name() if settings.device.startswith("cuda")
                        else "cpu"),
        "threads": torch.get_num_threads(),
        "image_tokens": target.geometry.tokens,
        "prompt_tokens": int(target.inputs["input_ids"].shape[1]),
        "timing": target.timing,
        "counted_flops": target.counted_source,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "vlprune": vlprune.__version__,
        "units": {"paper_tmacs": "1e12 multiply-accumulates (FastV formula, LLM prefill)",
                  "exact_tflops": "1e12 FLOPs (2 per MAC), causal attention",
                  "counted_tflops": "1e12 FLOPs, FlopCounterMode (full n^2 attention)"},
    }
