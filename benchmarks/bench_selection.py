"""Selection overhead at LLaVA-1.5-7B width on CPU, against the official codes, and decode.

    python benchmarks/bench_selection.py [--llm-layers 4] [--rounds 5] [--out bench-selection]

Random weights, nothing downloaded. Three parts, each in interleaved rounds (every
configuration once per round, the order rotated between rounds; round 0 is a warm-up), medians
over rounds, the machine's load average recorded after every round:

1. **prefill**: LLaVA-1.5-7B widths (CLIP ViT-L/336, 24 layers; LLM hidden 4096, MLP 11008,
   ``--llm-layers`` decoder layers), one 336 px image and 64 text tokens (640 prompt tokens).
   Per method x budget: the method's own selection time inside the pruned prefill (probe work
   included, ``SelectionMeter``), its share of that prefill, the prefill speed-up over the
   unpatched model of the same round, and the speed-up the selection costs
   (``base / (prefill - selection) - base / prefill``).
2. **official**: MMTok's selection against the official one (``official_selection.py``) on the
   tensors captured from the run (bf16 as the model: the prompt's input embeddings, from which
   each takes its text rows, and the image's features before and after the projector);
   FlowCut's pruned vision tower (sdpa, scores from the layers' own q / k / v) against the
   official eager forward that scores every layer, on a model with the same vision tower and a
   three-layer, 64-wide LLM (the prefill is then the vision tower). Both also check that the kept
   indices are equal, in float32 (the official codes compute in the model's dtype).
3. **decode** (``bench_decode.py``): per-token decode time patched / unpatched (median
   interval between consecutive tokens of one ``generate``) at batch 1 and with a left-padded
   batch of 4 prompts of different lengths, on ``llava-1.5-7b-mini`` (small widths: hook
   overhead shows most there).

Times are this thread's CPU time (``time.thread_time``; torch runs one thread, so every kernel
runs in it): waiting for a core on a shared machine is not counted (the shared harness is
``bench_harness.py``). Writes ``selection.json`` and ``selection.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from bench_decode import decode_ratios  # beside this script
from bench_harness import _cpu_ms, _inputs, _load, _median, _prefill, _rounds, build_llava
from official_selection import flowcut_official_clip, mmtok_official

import vlprune
from vlprune.eval.profiler.timing import SelectionMeter
from vlprune.methods.base import VisionBatch

CPU = torch.device("cpu")
RunSpec = tuple[str, int]


# ------------------------------------------------------------------------------ 1. prefill


def prefill_table(model: Any, inputs: dict[str, torch.Tensor], runs: list[RunSpec],
                  rounds: int) -> dict[str, Any]:
    """Part 1 (see the module docstring)."""

    def measure(config: RunSpec | None) -> dict[str, float]:
        if config is None:
            return {"prefill": _cpu_ms(lambda: _prefill(model, inputs))}
        handle = vlprune.patch(model, config[0], budget=config[1])
        meter = SelectionMeter(handle.method, CPU, handle.probes.values(), clock=time.thread_time)
        try:
            prefill = _cpu_ms(lambda: _prefill(model, inputs))
            return {"prefill": prefill, "select": meter.ms}
        finally:
            meter.remove()
            handle.unpatch()

    configs: list[RunSpec | None] = [None, *runs]
    results, loads = _rounds(configs, rounds, measure, "prefill")
    base = [m["prefill"] for m in results[None]]
    rows = []
    for name, budget in runs:
        ms = results[(name, budget)]
        speed = [b / m["prefill"] for b, m in zip(base, ms)]
        rows.append({
            "method": name, "budget": budget,
            "select_ms": _median([m["select"] for m in ms]),
            "prefill_ms": _median([m["prefill"] for m in ms]),
            "select_share": _median([m["select"] / m["prefill"] for m in ms]),
            "speedup": _median(speed),
            "speedup_lost": _median([b / (m["prefill"] - m["select"]) - s
                                     for b, m, s in zip(base, ms, speed)]),
        })
    return {"baseline_prefill_ms": _median(base), "rows": rows, "loads": loads}


# ----------------------------------------------------------------------------- 2. official


def _capture_vision_batch(model: Any, inputs: dict[str, torch.Tensor], budget: int
                          ) -> tuple[Any, VisionBatch]:
    """MMTok's method instance and the VisionBatch it saw in one prefill (probes frozen)."""
    handle = vlprune.patch(model, "mmtok", budget=budget)
    seen: dict[str, VisionBatch] = {}
    method = handle.method
    select = method.select

    def spy(batch: VisionBatch) -> Any:
        frozen = {"vision": SimpleNamespace(value=batch.probes["vision"].value)}
        seen["batch"] = VisionBatch(**{**vars(batch), "probes": frozen})
        return select(batch)

    method.select = spy
    try:
        _prefill(model, inputs)
    finally:
        del method.select
        handle.unpatch()
    return method, seen["batch"]


def _official_inputs(batch: VisionBatch) -> tuple[torch.Tensor, ...]:
    """What both selections start from: the prompt's input embeddings (1, L, D), which of its
    rows are text, the image's post- and pre-projector features."""
    text_rows = torch.ones(batch.text_embeds.shape[1], dtype=torch.bool)
    text_rows[batch.positions[0]] = False
    return batch.text_embeds, text_rows, batch.features[0], batch.probes["vision"].value[0]


def _ab(a: Callable[[], Any], b: Callable[[], Any], rounds: int, desc: str
        ) -> dict[str, float]:
    results, loads = _rounds(["a", "b"], rounds, lambda c: {"ms": _cpu_ms(a if c == "a" else b)},
                             desc)
    ratios = [x["ms"] / y["ms"] for x, y in zip(results["a"], results["b"])]
    return {"ours_ms": _median([x["ms"] for x in results["a"]]),
            "official_ms": _median([y["ms"] for y in results["b"]]),
            "ratio": _median(ratios), "loads": loads}


def mmtok_vs_official(model: Any, inputs: dict[str, torch.Tensor], budget: int,
                      rounds: int) -> dict[str, Any]:
    """Part 2, MMTok: ``select`` on the captured batch against the official selection."""
    method, batch = _capture_vision_batch(model, inputs, budget)
    embeds, text_rows, features, pre = _official_inputs(batch)
    tau = method.tv_temperature
    timing = _ab(lambda: method.select(batch),
                 lambda: mmtok_official(embeds[0, text_rows], features, pre, budget, tau),
                 rounds * 3, f"mmtok {budget}")
    fp32 = VisionBatch(**{**vars(batch), "features": [f.float() for f in batch.features],
                          "text_embeds": batch.text_embeds.float(),
                          "probes": {"vision": SimpleNamespace(
                              value=batch.probes["vision"].value.float())}})
    ours = method.select(fp32)[0]
    theirs = mmtok_official(embeds[0, text_rows].float(), features.float(), pre.float(), budget,
                            tau)
    return {"method": "mmtok", "budget": budget, **timing,
            "same_selection_fp32": bool(torch.equal(ours, theirs))}


def flowcut_vs_official(dtype: torch.dtype, budget: int, rounds: int) -> dict[str, Any]:
    """Part 2, FlowCut: the pruned vision tower, vlprune against the official eager forward
    (timed in ``dtype``; kept patches compared in float32, where both compute alike)."""
    model = build_llava(3, dtype, narrow_llm=True)
    inputs = _inputs(model, dtype)
    tower, pixels = model.model.vision_tower, inputs["pixel_values"]
    with vlprune.patch(model, "flowcut", budget=budget) as handle:
        timing = _ab(lambda: _prefill(model, inputs),
                     lambda: flowcut_official_clip(tower, pixels, budget), rounds, "flowcut")
        model.float()
        _prefill(model, {**inputs, "pixel_values": pixels.float()})
        ours = handle._vision.last.encode.encoder.units()[0]
    _, theirs = flowcut_official_clip(tower, pixels.float(), budget)
    return {"method": "flowcut", "budget": budget, **timing,
            "same_selection_fp32": bool(torch.equal(ours, theirs[0]))}


# ------------------------------------------------------------------------------- reporting


def machine() -> dict[str, Any]:
    """What ran the benchmark."""
    name = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return {"cpu": name, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}


def markdown(report: dict[str, Any]) -> str:
    """The report's tables."""
    info = report["info"]
    loads = [x for part in ("prefill", "official", "decode") for x in _loads(report.get(part))]
    lines = [f"Machine: {info['machine']['cpu']} ({info['machine']['cores']} cores), torch "
             f"{info['machine']['torch']}, {info['threads']} thread, {info['dtype']}; "
             f"LLaVA-1.5-7B widths with {info['llm_layers']} LLM layers; {info['rounds']} "
             f"interleaved rounds, medians of this thread's CPU time; load average "
             f"{min(loads, default=0):.1f}-{max(loads, default=0):.1f} over the rounds."]
    prefill = report.get("prefill")
    if prefill:
        lines += ["", f"Unpatched prefill: {prefill['baseline_prefill_ms']:.0f} ms.", "",
                  "| method @ budget | selection ms | share of pruned prefill | "
                  "prefill speed-up | speed-up lost to selection |", "|---|---|---|---|---|"]
        for row in prefill["rows"]:
            lines.append(f"| {row['method']} @ {row['budget']} | {row['select_ms']:.1f} | "
                         f"{100 * row['select_share']:.2f} % | {row['speedup']:.2f}x | "
                         f"{row['speedup_lost']:.3f}x |")
    if report.get("official"):
        lines += ["", "| method @ budget | vlprune ms | official ms | vlprune / official | "
                  "same kept tokens (float32) |", "|---|---|---|---|---|"]
        for row in report["official"]:
            same = row["same_selection_fp32"]
            lines.append(f"| {row['method']} @ {row['budget']} | {row['ours_ms']:.1f} | "
                         f"{row['official_ms']:.1f} | {row['ratio']:.3f} | "
                         f"{'yes' if same else 'no'} |")
    if report.get("decode"):
        lines += ["", "| method | batch | decode ms / token | unpatched ms / token | "
                  "patched / unpatched |", "|---|---|---|---|---|"]
        for row in report["decode"]:
            lines.append(f"| {row['method']} | {row['batch']} | {row['decode_ms']:.2f} | "
                         f"{row['base_ms']:.2f} | {row['ratio']:.3f} |")
    return "\n".join(lines) + "\n"


def _loads(part: Any) -> list[float]:
    """Load averages recorded in one part of the report."""
    if isinstance(part, dict):
        return list(part.get("loads", []))
    if isinstance(part, list):
        return [x for row in part for x in row.get("loads", [])]
    return []


def _runs(text: str) -> list[RunSpec]:
    out = []
    for item in text.split(","):
        name, _, budget = item.strip().partition("@")
        out.append((name, int(budget or 64)))
    return out


def main() -> None:
    """Run the three parts and write the report (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    methods = vlprune.list_methods()
    default_runs = ",".join([f"{m}@64" for m in methods] + ["todre@192", "mmtok@192"])
    parser.add_argument("--runs", type=_runs, default=_runs(default_runs),
                        help="method@budget list (default: every method at 64, todre and mmtok "
                             "also at 192)")
    parser.add_argument("--llm-layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=16, help="decode part")
    parser.add_argument("--parts", default="prefill,official,decode")
    parser.add_argument("--out", type=Path, default=Path("bench-selection"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    parts = set(args.parts.split(","))
    started = time.perf_counter()
    report: dict[str, Any] = {"info": {
        "machine": machine(), "threads": args.threads, "dtype": args.dtype,
        "llm_layers": args.llm_layers, "rounds": args.rounds, "load_start": _load()}}
    if parts & {"prefill", "official"}:
        model = build_llava(args.llm_layers, dtype)
        inputs = _inputs(model, dtype)
        if "prefill" in parts:
            report["prefill"] = prefill_table(model, inputs, args.runs, args.rounds)
        if "official" in parts:
            report["official"] = [mmtok_vs_official(model, inputs, budget, args.rounds)
                                  for budget in (64, 192)]
            del model
            report["official"].append(flowcut_vs_official(dtype, 64, args.rounds))
    if "decode" in parts:
        report["decode"] = decode_ratios(methods, 64, args.new_tokens, args.rounds)
    report["info"]["seconds"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "selection.json").write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(report)
    (args.out / "selection.md").write_text(text)
    print(text)
    print(f"{report['info']['seconds']:.0f} s; {args.out}/selection.json", file=sys.stderr)


if __name__ == "__main__":
    main()
