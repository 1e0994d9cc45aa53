"""``vlprune demo``: every pruning method on the shipped toy LLaVA, accuracy next to cost.

Loads the trained toy LLaVA (:mod:`vlprune.eval.toy`, 576 visual tokens per image, offline),
scores the unpruned model and each method at 64 / 128 / 192 kept tokens on held-out synthetic
questions (:func:`~vlprune.eval.toy.benchmark.run_benchmark`), prints a table with a progress
bar and writes ``demo.png`` (accuracy vs kept tokens), ``demo.json`` and ``gallery.png`` (what each
method keeps of one held-out scene at 64 tokens, :func:`vlprune.eval.show.gallery`) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from vlprune.eval.toy.benchmark import BUDGETS, BenchmarkRow, run_benchmark
from vlprune.eval.toy.data import KINDS

__all__ = ["add_parser", "format_table", "main", "plot", "run"]


def format_table(rows: Sequence[BenchmarkRow]) -> str:
    """Markdown table of benchmark rows: accuracy (all questions, then per kind), % of the
    unpruned accuracy, visual tokens into the LLM, prefill GFLOPs and batch-1 prefill time."""
    kinds = list(rows[0].per_kind) if rows else []
    lines = [
        "| method | budget | accuracy | " + "".join(f"{k} | " for k in kinds)
        + "% of unpruned | visual tokens | prefill GFLOPs | prefill ms |",
        "|---|---|---|" + "---|" * len(kinds) + "---|---|---|---|",
    ]
    for r in rows:
        budget = "all (576)" if r.budget is None else str(r.budget)
        if r.error is not None:
            lines.append(f"| {r.method} | {budget} | n/a: {r.error} |" + " |" * (len(kinds) + 4))
            continue
        spread = f" ± {_spread(r.per_seed):.1f}" if r.per_seed else ""
        flops = "n/a" if r.flops is None else f"{r.flops / 1e9:.2f}"
        per_kind = "".join(f"{100 * r.per_kind[k]:.0f} | " for k in kinds)
        lines.append(
            f"| {r.method} | {budget} | {100 * r.accuracy:.1f}{spread} | {per_kind}"
            f"{100 * r.relative:.0f}% | {r.tokens:.0f} | {flops} | {r.prefill_ms:.1f} |"
        )
    return "\n".join(lines)


def _spread(values: Sequence[float]) -> float:
    """Half the range, in accuracy points, of per-seed accuracies."""
    return 50 * (max(values) - min(values))


def plot(rows: Sequence[BenchmarkRow], path: Path) -> Path:
    """Accuracy vs kept visual tokens, one line per method and the unpruned model as a dashed
    line, saved to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    base = next(r for r in rows if r.method == "none")
    ax.axhline(100 * base.accuracy, color="black", linestyle="--", label="unpruned (576)")
    scored = [r for r in rows if r.method != "none" and r.error is None]
    for name in dict.fromkeys(r.method for r in scored):
        points = sorted((r.budget, r.accuracy) for r in scored if r.method == name)
        ax.plot([b for b, _ in points], [100 * a for _, a in points], marker="o", label=name)
    ax.set(xlabel="visual tokens kept (of 576)", ylabel="held-out accuracy (%)",
           title="toy LLaVA: accuracy vs visual-token budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(
    n_samples: int = 64,
    budgets: Sequence[int] = BUDGETS,
    methods: Sequence[str] | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    kinds: Sequence[str] | None = None,
    show_progress: bool = True,
) -> list[BenchmarkRow]:
    """Benchmark rows of the shipped toy model (see the module docstring), with a progress bar
    over the settings (the unpruned model, then each method × budget)."""
    from tqdm.auto import tqdm

    import vlprune

    names = list(vlprune.list_methods() if methods is None else methods)
    bar = tqdm(total=1 + len(names) * len(budgets), desc="toy benchmark", unit="setting",
               disable=not show_progress)

    def progress(label: str) -> None:
        bar.set_postfix_str(label)
        bar.update()

    try:
        return run_benchmark(n_samples=n_samples, budgets=budgets, methods=names, seeds=seeds,
                             kinds=kinds, progress=progress)
    finally:
        bar.close()


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``vlprune demo`` on the ``vlprune`` sub-command parser."""
    demo = sub.add_parser(
        "demo", help="accuracy, tokens, FLOPs and prefill time of every method on the toy VLM",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--samples", type=int, default=64,
                      help="held-out questions to score (default 64; the recorded accuracy "
                           "uses 1000)")
    demo.add_argument("--budgets", type=int, nargs="+", default=list(BUDGETS),
                      help="kept visual tokens of 576 (default 64 128 192)")
    demo.add_argument("--methods", nargs="+", default=None,
                      help="methods to run (default: all registered)")
    demo.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                      help="seeds of `random` (its accuracy is their mean)")
    demo.add_argument("--kinds", nargs="+", default=None, choices=KINDS,
                      help="question kinds to score (default: all)")
    demo.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    demo.add_argument("--out", type=Path, default=Path("vlprune_demo"),
                      help="folder for demo.png, demo.json and gallery.png "
                           "(default ./vlprune_demo)")
    demo.set_defaults(func=main)


def main(args: argparse.Namespace) -> None:
    """Run the demo from parsed ``vlprune demo`` arguments."""
    if args.samples < 1:
        raise SystemExit(f"--samples must be ≥ 1, got {args.samples}")
    if any(b < 1 for b in args.budgets):
        raise SystemExit(f"--budgets must be ≥ 1, got {args.budgets}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows = run(args.samples, args.budgets, args.methods, args.seeds, args.kinds)
    print(f"toy LLaVA (CLIP ViT 336/14 → 576 visual tokens, 4-layer Llama), {args.samples} "
          "held-out questions, CPU, batch 1 prefill time")
    print(format_table(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "demo.json").write_text(json.dumps([r.as_dict() for r in rows], indent=1) + "\n")
    png = plot(rows, args.out / "demo.png")
    from vlprune.eval.show import gallery

    [kept] = gallery(args.out / "gallery.png", methods=args.methods)
    print(f"saved {args.out / 'demo.json'}, {png}, {kept}")
