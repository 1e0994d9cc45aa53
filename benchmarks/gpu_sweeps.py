"""The model sweeps of ``benchmarks/gpu_suite.py``: which models, what a run costs, and the
profiler runs themselves (``vlprune.eval.profiler``, the code of ``vlprune profile``).

Sizing (:func:`estimate_seconds`): a prefill costs its exact FLOPs at an assumed 400 TFLOP/s
(bf16 on an H100, about 40 % of its dense peak), at least 30 ms (the eager forward's Python
overhead at 7B), plus 40 us per vision attention call (Qwen's sdpa path loops over images and
windows: 1012 calls per 672 px image); a decode step costs 30 ms. A row is 12 prefills (stats
and warm-up, 10 timed, memory) and one ``generate``, costed at the baseline's FLOPs (an upper
bound). LLaVA-1.5-7B (8.8 TFLOPs per 640-token prefill) and Qwen2.5-VL-7B (11.5 TFLOPs) come to
about 315 s for batch 1 and 8 with ``sdpa`` (LLaVA 19 + 81 s, Qwen 28 + 186 s). The suite's
time budget cuts whatever this estimate gets wrong.
"""

from __future__ import annotations

import gc
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gpu_suite import Plan

# --quick: the test suite's tiny random models (vlprune.testing), a few ms per forward on CPU
TINY = "tiny:"
QUICK_MODELS = (f"{TINY}llava", f"{TINY}qwen2_5_vl")
QUICK_IMAGE = {f"{TINY}qwen2_5_vl": (252, 252)}  # 81 visual tokens (LLaVA's tiny CLIP: 36)
PREFILL_TFLOPS_PER_S = 400.0
MIN_FORWARD_S = 0.030
DECODE_STEP_S = 0.030
ATTENTION_CALL_S = 40e-6  # Qwen's vision attention: one sdpa call per image and window


def sweep_order(plan: Plan) -> list[tuple[str, str, int]]:
    """(attention backend, model, batch) in run order, flash last."""
    return [(a, m, b) for a in plan.attns for m in plan.models for b in plan.batches]


def _spec(name: str) -> tuple[Any, str, tuple[int, int]]:
    """(config, family, image size) of a preset or a ``tiny:<family>`` test model."""
    from vlprune.eval.profiler import PRESETS

    if name.startswith(TINY):
        from vlprune.testing import DEFAULT_IMAGE_SIZE, tiny_config

        family = name[len(TINY):]
        return tiny_config(family), family, QUICK_IMAGE.get(name, DEFAULT_IMAGE_SIZE[family])
    preset = PRESETS[name]
    return preset.config(), preset.family, preset.image_size


def _load(name: str, device: str, dtype: Any, attn: str) -> Any:
    """A ``ProfileModel`` of a preset or a ``tiny:<family>`` test model."""
    from vlprune.eval.profiler import load_model
    from vlprune.eval.profiler.presets import ProfileModel

    if not name.startswith(TINY):
        return load_model(name, device=device, dtype=dtype, attn_implementation=attn)
    from vlprune.testing import tiny_model

    _, family, image = _spec(name)
    model = tiny_model(family, attn_implementation=attn).to(device, dtype)
    return ProfileModel(name, family, model.config, model, image)


def estimate_seconds(plan: Plan) -> dict[str, float]:
    """Expected seconds per sweep from the baseline's exact FLOPs (module docstring)."""
    import vlprune
    from vlprune.eval.profiler import RunTokens, arch_from_config, exact_flops
    from vlprune.eval.profiler.presets import image_geometry
    from vlprune.registry import get_method

    methods = plan.methods or vlprune.list_methods()
    out = {}
    for attn, name, batch in sweep_order(plan):
        config, family, image = _spec(name)
        geometry = image_geometry(config, family, image)
        arch = arch_from_config(config, family)
        tokens = RunTokens([geometry.tokens + 64] * arch.text.layers, [geometry])
        flops = batch * exact_flops(arch, tokens).prefill
        calls = batch * _vision_attention_calls(arch.vision, geometry)
        prefill = (max(flops / (PREFILL_TFLOPS_PER_S * 1e12), MIN_FORWARD_S)
                   + calls * ATTENTION_CALL_S)
        generate = prefill + (plan.new_tokens - 1) * DECODE_STEP_S
        per_run = (2 + plan.repeats) * prefill + plan.decode_repeats * generate
        runs = 1 + len(plan.budgets) * sum(
            get_method(m).families is None or family in get_method(m).families for m in methods)
        out[f"{name} {attn} b{batch}"] = generate + runs * per_run
    return out


def _vision_attention_calls(vision: Any, geometry: Any) -> int:
    """Attention calls of one image's vision tower: Qwen runs sdpa once per image or window
    (a Python loop over ``cu_seqlens``), CLIP once per layer."""
    if vision.kind == "clip":
        return vision.layers
    from vlprune.eval.profiler.flops import qwen_window_sizes

    windows = (len(qwen_window_sizes(geometry.grid_thw, vision.window, vision.merge_side))
               if vision.window else 1)
    return sum(1 if i in vision.full_blocks or not vision.window else windows
               for i in range(vision.layers))


def _derive(rows: list[dict[str, Any]]) -> None:
    """Efficiency (speed-up / FLOPs ratio) and the selection's share of the prefill."""
    for row in rows:
        speed, ratio = row.get("speedup_prefill"), row.get("flops_speedup")
        row["efficiency"] = speed / ratio if speed and ratio else None
        prefill, select = row.get("prefill_ms"), row.get("select_ms")
        row["select_share"] = (select["median"] / prefill["median"]
                               if prefill and select and select.get("median") is not None
                               and prefill.get("median") else None)


def run_sweeps(plan: Plan, deadline: float) -> list[dict[str, Any]]:
    """Every (backend, model, batch) sweep of the profiler. One model is resident at a time, so
    peak memory counts only its own weights."""
    import torch

    dtype = torch.float32 if plan.device == "cpu" else torch.bfloat16
    sweeps = []
    for attn in plan.attns:
        for name in plan.models:
            if time.monotonic() > deadline:
                note = "time budget spent before the model was built"
                sweeps += [_unrun(name, attn, b, "skipped", note) for b in plan.batches]
                continue
            model = None
            for batch in plan.batches:
                try:  # a failure is a row of the report, not the end of the suite
                    model = model or _load(name, plan.device, dtype, attn)
                    sweeps.append(_sweep(plan, model, attn, batch, deadline))
                except Exception as err:
                    note = f"{type(err).__name__}: {err}"
                    sweeps.append(_unrun(name, attn, batch, "error", note))
            del model
            gc.collect()
            if plan.device.startswith("cuda"):
                torch.cuda.empty_cache()
    return sweeps


def _unrun(name: str, attn: str, batch: int, status: str, note: str) -> dict[str, Any]:
    """A sweep that did not run: one baseline row saying why."""
    return {"model": name, "attn": attn, "batch": batch, "info": None,
            "rows": [{"method": "baseline", "budget": None, "status": status, "note": note}]}


def _sweep(plan: Plan, model: Any, attn: str, batch: int, deadline: float) -> dict[str, Any]:
    """One profiler sweep (baseline + every method x budget) of a built model."""
    from vlprune.eval.profiler import ProfileSettings, run_profile

    name = model.name
    if time.monotonic() < deadline:
        _warm_up(model, plan, batch)
    settings = ProfileSettings(
        model=name, methods=plan.methods, budgets=list(plan.budgets), device=plan.device,
        dtype="float32" if plan.device == "cpu" else "bfloat16", attn=attn,
        new_tokens=plan.new_tokens, warmup=0, repeats=plan.repeats,
        decode_repeats=plan.decode_repeats, batch=batch, image_size=model.image_size,
        timing=True, count=False, threads=1 if plan.device == "cpu" else None)
    result = run_profile(settings, model=model, deadline=deadline)
    _derive(result.rows)
    return {"model": name, "attn": attn, "batch": batch, "info": result.info,
            "rows": result.rows}


def _warm_up(model: Any, plan: Plan, batch: int) -> None:
    """One untimed ``generate`` on the sweep's inputs (its first timed one then runs warm)."""
    import torch

    from vlprune.eval.profiler import synthetic_inputs

    dtype = next(model.model.parameters()).dtype
    inputs = synthetic_inputs(model.config, model.family, image_size=model.image_size,
                              batch=batch, device=plan.device, dtype=dtype)
    with torch.no_grad():
        model.model.generate(**inputs, max_new_tokens=plan.new_tokens,
                             min_new_tokens=plan.new_tokens, do_sample=False)
