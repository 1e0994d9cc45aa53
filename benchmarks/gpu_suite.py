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

Sizing and the time budget: ``gpu_sweeps.estimate_seconds`` costs each sweep from its FLOPs
(about 315 s for both models at batch 1 and 8 with ``sdpa``; start-up, kernel tests, the top-k
grid and model builds add about 70 s). ``--time-budget`` (default 450 s) is checked before
every run: what is left when it is spent gets a ``skipped`` row, so the suite ends in time
whatever the estimate got wrong (``flash_attention_2``, when importable, runs last).
"""

from __future__ import annotations

import argparse
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

from gpu_sweeps import QUICK_MODELS, estimate_seconds, run_sweeps, sweep_order

REPO = Path(__file__).resolve().parents[1]
FULL_PRESETS = ("llava-1.5-7b", "qwen2.5-vl-7b")
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
        try:
            records.append({"status": "ok", **compare_case(device, b, n, k, plan.topk_dim,
                                                            plan.topk_repeats)})
        except Exception as err:  # reported, and the suite goes on
            records.append({"B": b, "N": n, "k": k, "status": "error",
                            "note": f"{type(err).__name__}: {err}"})
    return records


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
    print(f"gpu_suite: {len(sweep_order(plan))} sweeps, estimated {sum(estimate.values()):.0f} s "
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
