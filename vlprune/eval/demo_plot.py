"""``demo.png``: accuracy vs kept visual tokens, one small panel per method.

Several methods often score the same accuracy; drawn on one axis their lines hide each other.
Each method gets its own panel instead, on shared axes, with the unpruned accuracy (dashed) and
``random``'s seed range (grey band: lowest to highest seed, line: mean) as references; the
``random`` panel draws its seed range as error bars.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot"]


def _points(rows: Sequence[dict[str, Any]], method: str) -> list[dict[str, Any]]:
    return sorted((r for r in rows if r["method"] == method), key=lambda r: r["budget"])


def _seed_range(row: dict[str, Any]) -> tuple[float, float]:
    seeds = row["per_seed"] or [row["accuracy"]]
    return 100 * min(seeds), 100 * max(seeds)


def plot(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Save the panels of the demo ``rows`` (``method``, ``budget``, ``accuracy``,
    ``per_seed``; ``method="none"`` is the unpruned model) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next(r for r in rows if r["method"] == "none")
    scored = [r for r in rows if r["method"] != "none" and r["error"] is None]
    names = list(dict.fromkeys(r["method"] for r in scored))
    cols = max(1, min(5, len(names)))
    nrows = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(2.5 * cols + 0.6, 2.2 * nrows + 0.9),
                             sharex=True, sharey=True, squeeze=False)
    random = _points(scored, "random")
    for ax, name in zip(axes.flat, names):
        ax.axhline(100 * base["accuracy"], color="black", linestyle="--", linewidth=1)
        points = _points(scored, name)
        x = [r["budget"] for r in points]
        y = [100 * r["accuracy"] for r in points]
        if name == "random":
            low, high = zip(*map(_seed_range, points))
            ax.errorbar(x, y, yerr=[[v - lo for v, lo in zip(y, low)],
                                    [hi - v for v, hi in zip(y, high)]],
                        color="grey", marker="o", capsize=3)
        else:
            if random:
                low, high = zip(*map(_seed_range, random))
                rx = [r["budget"] for r in random]
                ax.fill_between(rx, low, high, color="grey", alpha=0.25, linewidth=0)
                ax.plot(rx, [100 * r["accuracy"] for r in random], color="grey", linewidth=1)
            ax.plot(x, y, color="tab:blue", marker="o")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    fig.supxlabel("visual tokens kept (of 576)")
    fig.supylabel("held-out accuracy (%)")
    fig.suptitle(f"toy LLaVA: accuracy vs budget (dashed: unpruned, "
                 f"{100 * base['accuracy']:.1f} %; grey: random, seed range)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
