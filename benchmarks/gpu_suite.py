"""One command for a GPU: compiled Triton kernel tests, the fused top-k kernel against
``torch.topk`` + sort + gather, and every pruning method on full-width random-weight
LLaVA-1.5-7B and Qwen2.5-VL-7B in bf16 (``sdpa``, and ``flash_attention_2`` when importable).

    python benchmarks/gpu_suite.py --out DIR                # CUDA: <= 8 min on one H100
    python benchmarks/gpu_suite.py --quick --device cpu     # smoke run (CI): tiny models
    python benchmarks/gpu_suite.py --dry-run                # the plan and its time estimate

Writes ``gpu_suite.json`` (everything), ``gpu_suite.md`` (tables), ``gpu_suite.png`` and
``kernel_tests.log`` into ``--out``. Every method x budget x backend x batch row comes from
``vlprune.eval.profiler`` (the same code as ``vlprune profile``): prefill ms (CUDA events,
median and IQR of 10 runs, each row's first untimed prefill being the warm-up), decode ms per
token (one greedy ``generate`` of 8 tokens; each sweep starts with an untimed ``generate``),
peak memory, the speed-up over the unpatched model on the same backend and batch, the
exact-FLOPs ratio, the efficiency (speed-up / FLOPs ratio) and the selection's own share of
the prefill.

Sizing (``estimate_seconds``): a prefill costs its exact FLOPs at an assumed 400 TFLOP/s
(bf16 on an H100, about 40 % of its dense peak), at least 30 ms (the eager forward's Python
overhead at 7B), plus 40 us per vision attention call (Qwen's sdpa path loops over images and
windows: 1012 calls per 672 px image); a decode step costs 30 ms. A row is 12 prefills (stats
and warm-up, 10 timed, memory) and one ``generate``, costed at the baseline's FLOPs (an upper
bound). LLaVA-1.5-7B (8.8 TFLOPs per 640-token prefill) and Qwen2.5-VL-7B (11.5 TFLOPs) come to
about 315 s for batch 1 and 8 with ``sdpa`` (LLaVA 19 + 81 s, Qwen 28 + 186 s); start-up,
kernel tests, the top-k grid and model builds add about 70 s. ``--time-budget`` (default 450 s) is
checked before every run: what is left when it is spent gets a ``skipped`` row, so the suite
ends in time whatever the estimate got wrong (``flash_attention_2``, when importable, runs
last for that reason).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
FULL_PRESETS = ("llava-1.5-7b", "qwen2.5-vl-7b")
# --quick: the test suite's tiny random models (vlprune.testing), a few ms per forward on CPU
TINY = "tiny:"
QUICK_MODELS = (f"{TINY}llava", f"{TINY}qwen2_5_vl")
QUICK_IMAGE = {f"{TINY}qwen2_5_vl": (252, 252)}  # 81 visual tokens (LLaVA's tiny CLIP: 36)
PREFILL_TFLOPS_PER_S = 400.0
MIN_FORWARD_S = 0.030
DECODE_STEP_S = 0.030
ATTENTION_CALL_S = 40e-6  # Qwen's vision attention: one sdpa call per image and window
KERNEL_TESTS_S = 180.0


@dataclass
class Plan:
    """What one run of the suite does (see the module docstring)."""

    device: str
    quick: bool
    models: list[str]
    attns: list[str]
    batches: list[int]
    budgets: list[int]
    methods: list[str] | None
    repeats: int
    decode_repeats: int
    new_tokens: int
    topk_grid: list[tuple[int, int, int]]
    topk_dim: int
    topk_repeats: int
    time_budget: float
    notes: list[str] = field(default_factory=list)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda[:N] (default) or cpu")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: tiny models, budget 16, batches 1 and 2, few repeats")
    parser.add_argument("--out", type=Path, default=Path("gpu_suite_out"))
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds for the whole run (default 450; --quick 600)")
    parser.add_argument("--methods", default=None, help="comma-separated (default: all)")
    parser.add_argument("--attn", default=None,
                        help="comma-separated backends (default: sdpa, + flash_attention_2 "
                        "when importable)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and estimate")
    return parser.parse_args(argv)


def _flash_available(device: str) -> bool:
    from transformers.utils import is_flash_attn_2_available

    return device.startswith("cuda") and is_flash_attn_2_available()


def make_plan(args: argparse.Namespace) -> Plan:
    """The plan for ``args``: full-width presets, or the tiny test models with ``--quick``."""
    quick = args.quick
    notes = []
    if args.attn:
        attns = [a.strip() for a in args.attn.split(",") if a.strip()]
    else:
        attns = ["sdpa"]
        if _flash_available(args.device):
            attns.append("flash_attention_2")
        else:
            notes.append("flash_attention_2 not run: flash-attn is not importable here")
    grid = ([(b, 576, 64) for b in (1, 2)] if quick else
            [(b, n, k) for b in (1, 8) for n in (576, 2880) for k in (64, 192, 320)])
    return Plan(
        device=args.device, quick=quick,
        models=list(QUICK_MODELS if quick else FULL_PRESETS),
        attns=attns, batches=[1, 2] if quick else [1, 8],
        budgets=[16] if quick else [64, 128, 192],
        methods=args.methods.split(",") if args.methods else None,
        repeats=2 if quick else 10, decode_repeats=1,
        new_tokens=3 if quick else 8, topk_grid=grid, topk_dim=64 if quick else 4096,
        topk_repeats=3 if quick else 50,
        time_budget=args.time_budget or (600.0 if quick else 450.0), notes=notes)


def _sweeps(plan: Plan) -> list[tuple[str, str, int]]:
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
    for attn, name, batch in _sweeps(plan):
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


def run_kernel_tests(plan: Plan, out_dir: Path, seconds: float) -> dict[str, Any]:
    """``pytest tests/kernels`` in a subprocess: on CUDA the compiled Triton kernel runs."""
    if not plan.device.startswith("cuda"):
        return {"status": "skipped", "note": "compiled kernel tests need CUDA (the test suite "
                "runs them under the Triton interpreter on CPU)"}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    env.pop("TRITON_INTERPRET", None)
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
               "tests/kernels"]
    try:
        proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=max(seconds, 1.0))
    except subprocess.TimeoutExpired as err:
        (out_dir / "kernel_tests.log").write_text(str(err.stdout or ""))
        return {"status": "timeout", "note": f"stopped after {seconds:.0f} s"}
    log = proc.stdout + proc.stderr
    (out_dir / "kernel_tests.log").write_text(log)
    counts = {key: int(n) for n, key in re.findall(r"(\d+) (passed|failed|skipped|error)", log)}
    status = "ok" if proc.returncode == 0 and not counts.get("failed") else "failed"
    return {"status": status, "returncode": proc.returncode, **counts,
            "summary": log.strip().splitlines()[-1] if log.strip() else ""}


def run_topk_grid(plan: Plan, deadline: float) -> list[dict[str, Any]]:
    """``bench_topk.compare_case`` over the plan's (B, N, k) grid."""
    import torch
    from bench_topk import compare_case

    if importlib.util.find_spec("triton") is None:
        return [{"status": "skipped", "note": "triton is not installed"}]
    device = torch.device(plan.device)
    records: list[dict[str, Any]] = []
    for b, n, k in plan.topk_grid:
        if time.monotonic() > deadline:
            records.append({"B": b, "N": n, "k": k, "status": "skipped",
                            "note": "time budget spent"})
            continue
        record = compare_case(device, b, n, k, plan.topk_dim, plan.topk_repeats)
        records.append({"status": "ok", **record})
    return records


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
                sweeps += [_skipped(name, attn, batch) for batch in plan.batches]
                continue
            model = _load(name, plan.device, dtype, attn)
            sweeps += [_sweep(plan, model, attn, batch, deadline) for batch in plan.batches]
            del model
            gc.collect()
            if plan.device.startswith("cuda"):
                torch.cuda.empty_cache()
    return sweeps


def _skipped(name: str, attn: str, batch: int) -> dict[str, Any]:
    return {"model": name, "attn": attn, "batch": batch, "info": None,
            "rows": [{"method": "baseline", "budget": None, "status": "skipped",
                      "note": "time budget spent before the model was built"}]}


def _sweep(plan: Plan, model: Any, attn: str, batch: int, deadline: float) -> dict[str, Any]:
    """One profiler sweep (baseline + every method x budget) of a built model."""
    from vlprune.eval.profiler import ProfileSettings, run_profile

    name = model.name
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


def _environment(plan: Plan) -> dict[str, Any]:
    import torch
    import transformers

    import vlprune

    triton = importlib.util.find_spec("triton")
    cuda = plan.device.startswith("cuda")
    return {
        "device": torch.cuda.get_device_name(plan.device) if cuda else platform.processor()
        or "cpu",
        "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "vlprune": vlprune.__version__,
        "triton": __import__("triton").__version__ if triton else None,
        "flash_attention_2": _flash_available(plan.device),
        "triton_interpreter": os.environ.get("TRITON_INTERPRET") == "1",
    }


def main(argv: list[str] | None = None) -> int:
    """Run the suite; 0 when it ran (failed rows are reported, not raised)."""
    start = time.monotonic()
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before vlprune imports the kernel
    plan = make_plan(args)
    deadline = start + plan.time_budget
    estimate = estimate_seconds(plan)
    print(f"gpu_suite: {len(_sweeps(plan))} sweeps, estimated {sum(estimate.values()):.0f} s "
          f"+ set-up; time budget {plan.time_budget:.0f} s", flush=True)
    if args.dry_run:
        print(json.dumps({"plan": asdict(plan), "estimate_s": estimate}, indent=2))
        return 0
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("gpu_suite: CUDA is not available (use --quick --device cpu)")
    import gpu_report

    args.out.mkdir(parents=True, exist_ok=True)
    wall: dict[str, float] = {}
    result: dict[str, Any] = {"env": _environment(plan), "plan": asdict(plan),
                              "estimate_s": estimate, "wall_s": wall}
    for key, step in (
        ("kernel_tests", lambda: run_kernel_tests(
            plan, args.out, min(KERNEL_TESTS_S, deadline - time.monotonic()))),
        ("topk", lambda: run_topk_grid(plan, deadline)),
        ("sweeps", lambda: run_sweeps(plan, deadline)),
    ):
        began = time.monotonic()
        result[key] = step()
        wall[key] = time.monotonic() - began
        print(f"gpu_suite: {key} done in {wall[key]:.0f} s", flush=True)
    wall["total"] = time.monotonic() - start
    paths = gpu_report.write(result, args.out)
    print(gpu_report.markdown(result))
    for path in paths.values():
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
