"""Profile a model under every requested method and budget: FLOPs, latency, memory.

One row per (method, budget) plus the unpruned baseline, run on the same model object with the
same attention backend. Per-layer token counts always come from the patch's own
``handle.stats`` (``layer_tokens``, and ``vision_layer_tokens`` for methods that cut inside the
vision encoder), whatever the method's stage; the feature rows entering the projector / merger
(which an encoder cut after the last layer changes) are observed by a pre-hook of the profiler.

The settings and the model that runs are prepared in :mod:`~vlprune.eval.profiler.target`;
the runs themselves are in :mod:`~vlprune.eval.profiler.runs`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

import vlprune
from vlprune.eval.profiler.presets import ProfileModel
from vlprune.eval.profiler.runs import _Profiler
from vlprune.eval.profiler.target import ProfileSettings, _prepare, _Target
from vlprune.registry import get_method

__all__ = ["ProfileResult", "ProfileSettings", "run_profile"]


@dataclass
class ProfileResult:
    """Rows (one per baseline / method x budget) and the run's settings and environment."""

    rows: list[dict[str, Any]]
    info: dict[str, Any]


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
