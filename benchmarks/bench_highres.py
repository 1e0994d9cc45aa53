"""High-resolution prefill: time and peak memory of every method ÷ the unpatched model.

    python benchmarks/bench_highres.py [--models qwen2.5-vl-7b-mini,...] [--sizes 448,896]
        [--methods hiprune,random] [--rounds 2] [--out bench-highres]

For each ``-mini`` preset (random weights; full depth, windows and image geometry, small
widths) and square image size (LLaVA-NeXT: its largest AnyRes grid, 672x672 = thumbnail + 2x2
crops, whatever ``--sizes`` says), in interleaved rounds (round 0 a warm-up, the order rotated
between rounds) and with the load average recorded after each round:

- ``time``: the patched prefill's CPU time (``time.thread_time``, one torch thread) ÷ the
  unpatched one of the same round, median over rounds; ``select ms`` / ``select %``: the
  method's own selection (probe work included) and its share of the patched prefill;
- ``memory``: peak of live tensor bytes allocated during the prefill (torch profiler memory
  events, weights excluded; deterministic, measured once) ÷ the unpatched peak;
- ``encoder ms``: the unpatched vision encoder alone (``get_image_features``), the yardstick
  for how selection time grows with the image.

Writes ``highres.json`` and ``highres.md`` to ``--out`` (rows are appended as they finish, so
a long run can be read while it goes).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import vlprune
from vlprune.eval.profiler.presets import PRESETS, build_preset_model, synthetic_inputs
from vlprune.eval.profiler.timing import SelectionMeter, _cpu_peak_bytes
from vlprune.registry import get_method

CPU = torch.device("cpu")
NEXT_LARGEST = 672  # 672x672: LLaVA-NeXT's largest AnyRes grid (2x2 crops + thumbnail)


def _cpu_ms(fn: Callable[[], Any]) -> float:
    start = time.thread_time()
    fn()
    return (time.thread_time() - start) * 1e3


@torch.no_grad()
def _prefill(model: Any, inputs: dict[str, torch.Tensor]) -> None:
    model(**inputs, use_cache=True, logits_to_keep=1)


@torch.no_grad()
def _encoder_ms(model: Any, inputs: dict[str, torch.Tensor]) -> float:
    layout = {k: inputs[k] for k in ("image_sizes", "image_grid_thw") if k in inputs}
    return _cpu_ms(lambda: model.model.get_image_features(inputs["pixel_values"], **layout))


def _peak_mb(model: Any, inputs: dict[str, torch.Tensor]) -> float:
    with torch.no_grad():
        return _cpu_peak_bytes(lambda: _prefill(model, inputs)) / 2**20


def _measure(model: Any, inputs: dict[str, torch.Tensor], method: str | None,
             budget: int) -> dict[str, float]:
    if method is None:
        return {"prefill": _cpu_ms(lambda: _prefill(model, inputs))}
    with vlprune.patch(model, method, budget=budget) as handle:
        meter = SelectionMeter(handle.method, CPU, handle.probes.values(), clock=time.thread_time)
        try:
            return {"prefill": _cpu_ms(lambda: _prefill(model, inputs)), "select": meter.ms}
        finally:
            meter.remove()


def one_size(model: Any, family: str, size: int, methods: list[str], budget: int,
             rounds: int) -> list[dict[str, Any]]:
    """Every method on one image size (see the module docstring)."""
    inputs = synthetic_inputs(model.config, family, image_size=(size, size), text_tokens=64)
    tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    patches = int(inputs["image_grid_thw"].prod()) if "image_grid_thw" in inputs else None
    configs: list[str | None] = [None, *methods]
    results: dict[str | None, list[dict[str, float]]] = {c: [] for c in configs}
    loads = []
    for r in range(rounds + 1):
        shift = r % len(configs)
        for config in configs[shift:] + configs[:shift]:
            result = _measure(model, inputs, config, budget)
            if r:
                results[config].append(result)
        loads.append(os.getloadavg()[0])
    base_peak = _peak_mb(model, inputs)
    base = [m["prefill"] for m in results[None]]
    common = {"size": size, "image_tokens": tokens, "patches": patches, "loads": loads,
              "encoder_ms": _encoder_ms(model, inputs), "base_ms": statistics.median(base),
              "base_peak_mb": base_peak}
    rows = []
    for method in methods:
        ms = results[method]
        with vlprune.patch(model, method, budget=budget):
            peak = _peak_mb(model, inputs)
        rows.append({**common, "method": method,
                     "time_ratio": statistics.median(
                         [m["prefill"] / b for m, b in zip(ms, base)]),
                     "select_ms": statistics.median([m["select"] for m in ms]),
                     "select_share": statistics.median([m["select"] / m["prefill"] for m in ms]),
                     "peak_mb": peak, "peak_ratio": peak / base_peak})
    return rows


def markdown(rows: list[dict[str, Any]], info: dict[str, Any]) -> str:
    """One table over every model and size."""
    lines = [f"{info['cpu']}, {info['threads']} torch thread, float32, budget {info['budget']}; "
             f"{info['rounds']} interleaved rounds (medians of this thread's CPU time), load "
             f"average {min(info['loads'], default=0):.1f}-{max(info['loads'], default=0):.1f}."
             " Time and memory are patched ÷ unpatched (memory: peak live tensor bytes of the "
             "prefill, weights excluded).", "",
             "| model | image | image tokens | unpatched ms | encoder ms | method | time | "
             "select ms | select % | memory |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['size']}² | {r['image_tokens']} | {r['base_ms']:.0f} "
                     f"| {r['encoder_ms']:.0f} | {r['method']} | {r['time_ratio']:.2f}x | "
                     f"{r['select_ms']:.0f} | {100 * r['select_share']:.1f} % | "
                     f"{r['peak_ratio']:.2f}x |")
    return "\n".join(lines) + "\n"


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "cpu"


def run_grid(models: list[str], sizes: list[int], methods: list[str], budget: int,
             rounds: int, on_row: Any = None) -> list[dict[str, Any]]:
    """Rows of every (model, size, supported method); ``on_row(rows)`` after each size."""
    grid = []
    for name in models:
        family = PRESETS[name].family
        grid += [(name, family, size) for size in ([NEXT_LARGEST] if family == "llava_next"
                                                   else sizes)]
    rows: list[dict[str, Any]] = []
    model, built = None, None
    for name, family, size in tqdm(grid, desc="highres", file=sys.stderr):
        if built != name:
            model, built = build_preset_model(PRESETS[name]), name
        supported = [m for m in methods
                     if get_method(m).families is None or family in get_method(m).families]
        rows += [{"model": name, **row}
                 for row in one_size(model, family, size, supported, budget, rounds)]
        if on_row is not None:
            on_row(rows)
    return rows


def main() -> None:
    """Run the grid and write the report (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="qwen2.5-vl-7b-mini,qwen2-vl-7b-mini,"
                                            "llava-next-7b-mini")
    parser.add_argument("--sizes", default="448,896,1344,1792")
    parser.add_argument("--methods", default=",".join(vlprune.list_methods()))
    parser.add_argument("--budget", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench-highres"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    info = {"cpu": _cpu_name(), "threads": args.threads, "budget": args.budget,
            "rounds": args.rounds, "loads": []}

    def write(rows: list[dict[str, Any]]) -> None:
        info["loads"] = [x for r in rows for x in r["loads"]]
        (args.out / "highres.json").write_text(json.dumps({"info": info, "rows": rows},
                                                          indent=1) + "\n")
        (args.out / "highres.md").write_text(markdown(rows, info))

    rows = run_grid(args.models.split(","), [int(s) for s in args.sizes.split(",")],
                    args.methods.split(","), args.budget, args.rounds, write)
    print(markdown(rows, info))


if __name__ == "__main__":
    main()
