"""Performance benchmark: one entry point for every table, with a verdict per goal.

    python benchmarks/bench_performance.py [--parts prefill,official,decode]
        [--llm-layers 4] [--rounds 3] [--sizes 448] [--out bench-performance]

Random weights on CPU, nothing downloaded; one torch thread; every timing a median over
interleaved rounds (each configuration once per round, order rotated, round 0 a warm-up) of
this thread's CPU time, with the load average recorded after every round. Parts:

- ``prefill``, ``official``, ``decode``: ``bench_selection.py`` (selection share of the pruned
  prefill at LLaVA-1.5-7B widths, vlprune against the official MMTok / FlowCut selection on the
  same tensors, decode per token patched ÷ unpatched at batch 1 and a padded batch of 4);
- ``highres``: ``bench_highres.py`` (time and peak memory patched ÷ unpatched on
  ``qwen2.5-vl-7b-mini`` / ``qwen2-vl-7b-mini`` at ``--sizes`` and ``llava-next-7b-mini`` at its
  largest AnyRes grid).

The default parts (``prefill``, ``official`` and ``decode``) run in under 10 minutes on a
shared 2-core machine; ``--parts highres`` adds about 2-3 minutes per (model, size) at 448²,
more at larger sizes (the full grid is ``--sizes 448,896,1344,1792``). Writes
``performance.json`` and ``performance.md`` (the tables, then each goal met or missed per
method) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bench_decode  # beside this script
import bench_harness
import bench_highres
import bench_selection
import torch

import vlprune

GOALS = {"select_share": 0.01, "official_ratio": 1.0, "decode_ratio": 1.02,
         "highres_time": 1.0, "highres_memory": 1.1}


def run(args: argparse.Namespace, write: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Run the chosen parts; the report of each under its name, passed to ``write`` after
    every part (a long run can be read while it goes)."""
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    parts = set(args.parts.split(","))
    report: dict[str, Any] = {"info": {
        "machine": bench_selection.machine(), "threads": 1, "dtype": args.dtype,
        "llm_layers": args.llm_layers, "rounds": args.rounds, "sizes": args.sizes,
        "highres_rounds": args.highres_rounds, "load_start": bench_harness._load()}}
    started = time.perf_counter()
    if parts & {"prefill", "official"}:
        model = bench_harness.build_llava(args.llm_layers, dtype)
        inputs = bench_harness._inputs(model, dtype)
        if "prefill" in parts:
            report["prefill"] = bench_selection.prefill_table(
                model, inputs, bench_selection._runs(args.runs), args.rounds)
            write(report)
        if "official" in parts:
            report["official"] = [bench_selection.mmtok_vs_official(model, inputs, b, args.rounds)
                                  for b in (64, 192)]
            del model
            report["official"].append(bench_selection.flowcut_vs_official(dtype, 64, args.rounds))
            write(report)
    if "decode" in parts:
        report["decode"] = bench_decode.decode_ratios(vlprune.list_methods(), 64,
                                                         args.new_tokens, args.rounds)
        write(report)
    if "highres" in parts:
        sizes = [int(s) for s in args.sizes.split(",")]
        report["highres"] = bench_highres.run_grid(args.models.split(","), sizes,
                                                   vlprune.list_methods(), 64,
                                                   args.highres_rounds)
        write(report)
    report["info"]["seconds"] = time.perf_counter() - started
    write(report)
    return report


def verdicts(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per method and goal: the worst measured value and whether it meets the goal."""
    worst: dict[str, dict[str, float]] = {}

    def note(method: str, goal: str, value: float) -> None:
        table = worst.setdefault(method, {})
        table[goal] = max(table.get(goal, float("-inf")), value)

    for row in (report.get("prefill") or {}).get("rows", []):
        note(row["method"], "select_share", row["select_share"])
    for row in report.get("official") or []:
        note(row["method"], "official_ratio", row["ratio"])
    for row in report.get("decode") or []:
        note(row["method"], "decode_ratio", row["ratio"])
    for row in report.get("highres") or []:
        note(row["method"], "highres_time", row["time_ratio"])
        note(row["method"], "highres_memory", row["peak_ratio"])
    return {method: {goal: {"worst": value, "met": value <= GOALS[goal]}
                     for goal, value in goals.items()} for method, goals in sorted(worst.items())}


def markdown(report: dict[str, Any]) -> str:
    """Every table of the report, then the goal verdicts."""
    parts = ("prefill", "official", "decode")
    text = bench_selection.markdown(report) if any(report.get(p) for p in parts) else ""
    if report.get("highres"):
        loads = [x for row in report["highres"] for x in row["loads"]]
        info = {"cpu": report["info"]["machine"]["cpu"], "threads": 1, "budget": 64,
                "rounds": report["info"]["highres_rounds"], "loads": loads}
        text += "\n" + bench_highres.markdown(report["highres"], info)
    names = list(GOALS)
    lines = ["", "Goals (worst value over the rows measured; ✓ met, ✗ missed): selection share "
             "< 1 %, vlprune ÷ official ≤ 1, decode ≤ 1.02, high-res time < 1 and memory ≤ "
             "1.1 (patched ÷ unpatched).", "",
             "| method | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for method, goals in report["goals"].items():
        cells = []
        for goal in names:
            got = goals.get(goal)
            cells.append("" if got is None else
                         f"{100 * got['worst']:.2f} % {'✓' if got['met'] else '✗'}"
                         if goal == "select_share" else
                         f"{got['worst']:.2f} {'✓' if got['met'] else '✗'}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return text + "\n".join(lines) + "\n"


def main() -> None:
    """Parse the options, run, write ``performance.json`` / ``performance.md``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    methods = vlprune.list_methods()
    parser.add_argument("--parts", default="prefill,official,decode",
                        help="any of prefill, official, decode, highres")
    parser.add_argument("--runs", default=",".join([f"{m}@64" for m in methods]
                                                   + ["todre@192", "mmtok@192"]),
                        help="prefill part: method@budget list")
    parser.add_argument("--llm-layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--new-tokens", type=int, default=32, help="decode part")
    parser.add_argument("--models", default="qwen2.5-vl-7b-mini,qwen2-vl-7b-mini,"
                                            "llava-next-7b-mini", help="highres part")
    parser.add_argument("--sizes", default="448", help="highres part: square image sizes")
    parser.add_argument("--highres-rounds", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench-performance"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    def write(report: dict[str, Any]) -> None:
        report["goals"] = verdicts(report)
        (args.out / "performance.json").write_text(json.dumps(report, indent=1) + "\n")
        (args.out / "performance.md").write_text(markdown(report))

    report = run(args, write)
    print(markdown(report))
    print(f"{report['info']['seconds']:.0f} s; {args.out}/performance.json", file=sys.stderr)


if __name__ == "__main__":
    main()
