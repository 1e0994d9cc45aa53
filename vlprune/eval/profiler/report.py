"""Outputs of ``vlprune profile``: a printed table, JSON, CSV and a PNG plot."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vlprune.eval.profiler.runner import ProfileResult

__all__ = ["flatten", "format_table", "plot", "write_csv", "write_json", "write_outputs"]

DASH = "—"


def _num(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return DASH
    return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"


def _ms(cell: dict[str, float | None] | None) -> str:
    """``median ±half-IQR`` of a timing cell."""
    if not cell or cell.get("median") is None:
        return DASH
    spread = (cell["p75"] - cell["p25"]) / 2
    return f"{cell['median']:.1f} ±{spread:.1f}"


def _budget(row: dict[str, Any]) -> str:
    budget = row["budget"]
    if budget is None:
        return DASH
    return f"r={budget:g}" if isinstance(budget, float) else str(budget)


Column = tuple[str, Callable[[dict[str, Any]], str]]

_FLOPS_COLUMNS: list[Column] = [
    ("visual kept", lambda r: str(r["kept_tokens"])),
    ("LLM tokens in / avg", lambda r: f"{r['llm_input_tokens']} / {r['mean_layer_tokens']:.0f}"),
    ("TMACs paper", lambda r: _num(r["paper_tmacs"])),
    ("TFLOPs exact", lambda r: _num(r["exact_tflops_prefill"])),
]
_TIMED_COLUMNS: list[Column] = [
    ("prefill ms", lambda r: _ms(r.get("prefill_ms"))),
    ("select ms", lambda r: _ms(r.get("select_ms"))),
    ("select %", lambda r: DASH if r.get("select_share") is None
     else f"{100 * r['select_share']:.1f} %"),
    ("decode ms/tok", lambda r: _ms(r.get("decode_ms_per_token"))),
    ("peak MB", lambda r: _num(r.get("peak_mb"), 4)),
    ("speed-up", lambda r: DASH if r.get("speedup_prefill") is None
     else f"{r['speedup_prefill']:.2f}×"),
]
_FLOPS_RATIO: Column = ("FLOPs ratio", lambda r: f"{r['flops_speedup']:.2f}×")


def format_table(result: ProfileResult) -> str:
    """Markdown table: one line per run; ``n/a`` / ``error`` rows carry their reason. Without
    timings the latency columns give way to the baseline / run FLOPs ratio."""
    columns = _FLOPS_COLUMNS + (_TIMED_COLUMNS if result.info["timing"] else [_FLOPS_RATIO])
    lines = ["| method | budget | " + " | ".join(name for name, _ in columns) + " |",
             "|" + "---|" * (len(columns) + 2)]
    for row in result.rows:
        if row["status"] == "ok":
            cells = [cell(row) for _, cell in columns]
        else:
            reason = row["note"].splitlines()[0][:80] if row["note"] else ""
            cells = [row["status"], reason] + [""] * (len(columns) - 2)
        lines.append("| " + " | ".join([row["method"], _budget(row), *cells]) + " |")
    return "\n".join(lines)


def flatten(row: dict[str, Any]) -> dict[str, Any]:
    """One CSV record: timing cells become ``x`` (median), ``x_p25``, ``x_p75``; per-layer
    lists stay in the JSON only."""
    flat: dict[str, Any] = {}
    for key, value in row.items():
        if isinstance(value, list):
            continue
        if isinstance(value, dict):
            flat[key] = value.get("median")
            flat[f"{key}_p25"] = value.get("p25")
            flat[f"{key}_p75"] = value.get("p75")
        else:
            flat[key] = value
    return flat


def write_json(result: ProfileResult, path: Path) -> None:
    """``{"info": ..., "rows": [...]}``."""
    path.write_text(json.dumps({"info": result.info, "rows": result.rows}, indent=2,
                               default=str) + "\n")


def write_csv(result: ProfileResult, path: Path) -> None:
    """Flat rows (see :func:`flatten`), union of all columns."""
    records = [flatten(row) for row in result.rows]
    columns: list[str] = []
    for record in records:
        columns += [k for k in record if k not in columns]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(records)


def plot(result: ProfileResult, path: Path) -> None:
    """Speed-up and exact prefill TFLOPs vs budget, one line per method.

    Measured prefill speed-up where latency was timed, otherwise the FLOPs ratio (dashed).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result.rows if r["status"] == "ok"]
    base = rows[0]
    fig, (ax_speed, ax_flops) = plt.subplots(1, 2, figsize=(11, 4.2))
    timed = base.get("prefill_ms") is not None
    methods = list(dict.fromkeys(r["method"] for r in rows[1:]))
    for method in methods:
        runs = sorted((r for r in rows if r["method"] == method), key=lambda r: r["budget"])
        budgets = [r["budget"] for r in runs]
        speed = [(r.get("speedup_prefill") if timed else r["flops_speedup"]) or math.nan
                 for r in runs]
        ax_speed.plot(budgets, speed, marker="o", linestyle="-" if timed else "--", label=method)
        ax_flops.plot(budgets, [r["exact_tflops_prefill"] for r in runs], marker="o",
                      label=method)
    ax_speed.axhline(1.0, color="grey", linewidth=0.8)
    ax_speed.set_ylabel("prefill speed-up vs baseline" if timed else "FLOPs ratio vs baseline")
    ax_flops.axhline(base["exact_tflops_prefill"], color="grey", linestyle=":",
                     label="baseline")
    ax_flops.set_ylabel("prefill TFLOPs (exact)")
    for ax in (ax_speed, ax_flops):
        ax.set_xlabel("budget (visual tokens)")
        ax.grid(alpha=0.3)
    ax_flops.legend(fontsize=8)
    info = result.info
    fig.suptitle(f"{info['model']} · {info['device']} · {info['dtype']} · "
                 f"{info['attn_implementation']} · {info['image_tokens']} image tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(result: ProfileResult, out_dir: Path, *, png: bool = True) -> dict[str, Path]:
    """Write ``profile.json``, ``profile.csv`` and (``png``) ``profile.png`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "profile.json", "csv": out_dir / "profile.csv"}
    write_json(result, paths["json"])
    write_csv(result, paths["csv"])
    if png:
        paths["png"] = out_dir / "profile.png"
        plot(result, paths["png"])
    return paths
