"""``vlprune demo``: every pruning method on the shipped toy LLaVA, accuracy next to cost.

Loads the trained toy LLaVA (:mod:`vlprune.eval.toy`, 576 visual tokens per image, offline),
scores the unpruned model and each method at 64 / 128 / 192 kept tokens on held-out synthetic
questions (:func:`~vlprune.eval.toy.benchmark.run_benchmark`), times the batch-1 prefill of every
setting interleaved with the unpruned one (:mod:`vlprune.eval.interleaved`), prints a table with
a progress bar and writes ``demo.png`` (:func:`~vlprune.eval.demo_plot.plot`), ``demo.json`` and
``gallery.png`` (what each method keeps of one held-out scene at 64 tokens,
:func:`vlprune.eval.show.gallery`) to ``--out``. Nothing is written when a setting fails; the
command then exits 1.

Threads: one by default. The toy model's matrices are tiny (widths 64 and 128), so a forward
is a few hundred small ops whose cost is dispatch, not arithmetic; a second intra-op thread
adds a synchronisation per op, and on a busy 2-core machine it waits for a core at each one
(measured: the whole demo 2–10× slower with torch's default thread count than with one).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlprune.cli_args import (
    CommandError,
    SplitList,
    int_at_least,
    method_name,
    output_dir,
)

__all__ = ["DEFAULT_THREADS", "add_parser", "format_table", "main", "run"]

DEFAULT_THREADS = 1
"""torch CPU threads of ``vlprune demo`` (see the module docstring)."""

DESCRIPTION = """\
Every pruning method on the toy LLaVA that ships with vlprune (576 visual tokens per image,
trained offline): held-out accuracy, visual tokens into the LLM, prefill FLOPs and batch-1
prefill time with its speed-up over the unpruned model (timed interleaved), at each budget.
Prints a table and writes demo.json, demo.png and gallery.png to --out; writes nothing and exits
1 if a setting fails. Lists take spaces or commas: --budgets 64 128 or --budgets 64,128."""


def _kind(text: str) -> str:
    from vlprune.eval.toy.data import KINDS

    if text not in KINDS:
        raise ValueError(f"unknown question kind {text!r}; one of {', '.join(KINDS)}")
    return text


def _seed(text: str) -> int:
    from vlprune.methods.random import RandomPrune

    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"a seed is an int, got {text!r}") from None
    return RandomPrune.options["seed"].check("seed", value)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``vlprune demo`` on the ``vlprune`` sub-command parser."""
    demo = sub.add_parser(
        "demo", help="accuracy, tokens, FLOPs and prefill time of every method on the toy VLM",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--samples", type=int_at_least(1), default=64,
                      help="held-out questions to score (default 64; the recorded accuracy "
                           "uses 1000)")
    demo.add_argument("--budgets", action=SplitList, item=int_at_least(1),
                      default=[64, 128, 192], help="kept visual tokens of 576 (default 64 128 192)")
    demo.add_argument("--methods", action=SplitList, item=method_name, default=None,
                      help="methods to run (default: every registered method)")
    demo.add_argument("--seeds", action=SplitList, item=_seed, default=[0, 1, 2],
                      help="seeds of random (its accuracy is their mean; default 0 1 2)")
    demo.add_argument("--kinds", action=SplitList, item=_kind, default=None,
                      help="question kinds to score: color, count, presence, position "
                           "(default: all)")
    demo.add_argument("--repeats", type=int_at_least(1), default=7,
                      help="timed prefill rounds after a warm-up (default 7)")
    demo.add_argument("--threads", type=int_at_least(1), default=DEFAULT_THREADS,
                      help=f"torch CPU threads (default {DEFAULT_THREADS}: the toy model is "
                           "too small to gain from more, and a busy machine makes them wait)")
    demo.add_argument("--out", type=output_dir, default=Path("vlprune_demo"),
                      help="folder for demo.png, demo.json and gallery.png "
                           "(default ./vlprune_demo)")
    demo.set_defaults(func=main)
    return demo


def _spread(values: Sequence[float]) -> float:
    """Half the range, in accuracy points, of per-seed accuracies."""
    return 50 * (max(values) - min(values))


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of demo rows (:func:`run`): accuracy (all questions, then per kind), % of
    the unpruned accuracy, visual tokens into the LLM, prefill GFLOPs, batch-1 prefill time
    (median and quartiles) and its speed-up over the unpruned model."""
    kinds = list(rows[0]["per_kind"]) if rows else []
    lines = [
        "| method | budget | accuracy | " + "".join(f"{k} | " for k in kinds)
        + "% of unpruned | visual tokens | prefill GFLOPs | prefill ms (p25–p75) | speed-up |",
        "|---|---|---|" + "---|" * len(kinds) + "---|---|---|---|---|",
    ]
    for r in rows:
        budget = "all (576)" if r["budget"] is None else str(r["budget"])
        if r["error"] is not None:
            lines.append(f"| {r['method']} | {budget} | n/a: {r['error']} |"
                         + " |" * (len(kinds) + 5))
            continue
        spread = f" ± {_spread(r['per_seed']):.1f}" if r["per_seed"] else ""
        flops = "n/a" if r["flops"] is None else f"{r['flops'] / 1e9:.2f}"
        per_kind = "".join(f"{100 * r['per_kind'][k]:.0f} | " for k in kinds)
        lines.append(
            f"| {r['method']} | {budget} | {100 * r['accuracy']:.1f}{spread} | {per_kind}"
            f"{100 * r['relative']:.0f}% | {r['tokens']:.0f} | {flops} | "
            f"{r['prefill_ms']:.1f} ({r['prefill_ms_p25']:.1f}–{r['prefill_ms_p75']:.1f}) | "
            f"{r['speedup']:.2f}× |"
        )
    return "\n".join(lines)


def run(
    n_samples: int = 64,
    budgets: Sequence[int] = (64, 128, 192),
    methods: Sequence[str] | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    kinds: Sequence[str] | None = None,
    repeats: int = 7,
    show_progress: bool = True,
) -> list[dict[str, Any]]:
    """Demo rows: each :class:`~vlprune.eval.toy.benchmark.BenchmarkRow` as a dict, with its
    interleaved prefill timing (``prefill_ms``, ``prefill_ms_p25`` / ``_p75``, ``speedup``;
    ``random`` timed with the first seed). A progress bar runs over the settings, then over the
    timing rounds. ``CommandError`` when a setting fails."""
    from tqdm.auto import tqdm

    import vlprune
    from vlprune.eval.interleaved import time_settings
    from vlprune.eval.toy.benchmark import model_inputs, run_benchmark
    from vlprune.eval.toy.data import samples
    from vlprune.eval.toy.model import load_toy_model, toy_processor

    names = list(vlprune.list_methods() if methods is None else methods)
    bar = tqdm(total=1 + len(names) * len(budgets) + repeats + 1, desc="vlprune demo",
               unit="step", disable=not show_progress)

    def progress(label: str = "timing") -> None:
        bar.set_postfix_str(label)
        bar.update()

    try:
        model, processor = load_toy_model(), toy_processor()
        rows = run_benchmark(model, processor, n_samples=n_samples, budgets=budgets,
                             methods=names, seeds=seeds, kinds=kinds, repeats=0,
                             progress=progress)
        failed = [f"{r.method}@{r.budget}: {r.error}" for r in rows if r.error is not None]
        if failed:
            raise CommandError("; ".join(failed))
        settings = [
            (r.method, {"budget": r.budget, **({"seed": seeds[0]} if r.method == "random" else {})})
            if r.budget is not None else ("none", {})
            for r in rows
        ]
        one = model_inputs(processor, samples("test", 1, kinds=kinds))
        timings = time_settings(model, one, settings, repeats=repeats, progress=progress)
    finally:
        bar.close()
    return [{**r.as_dict(), **t.as_dict()} for r, t in zip(rows, timings)]


def main(args: argparse.Namespace) -> int:
    """Run the demo from parsed ``vlprune demo`` arguments; 0 on success."""
    import torch

    from vlprune.eval.demo_plot import plot

    torch.set_num_threads(args.threads)
    rows = run(args.samples, args.budgets, args.methods, args.seeds, args.kinds, args.repeats)
    print(f"toy LLaVA (CLIP ViT 336/14 → 576 visual tokens, 4-layer Llama), {args.samples} "
          f"held-out questions, CPU ({args.threads} thread{'s' if args.threads > 1 else ''}), "
          f"batch-1 prefill: median of {args.repeats} interleaved rounds")
    print(format_table(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "demo.json").write_text(json.dumps(rows, indent=1) + "\n")
    png = plot(rows, args.out / "demo.png")
    from vlprune.eval.show import gallery

    [kept] = gallery(args.out / "gallery.png", methods=args.methods)
    print(f"saved {args.out / 'demo.json'}, {png}, {kept}")
    return 0
