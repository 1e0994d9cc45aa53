"""Outputs of ``benchmarks/gpu_suite.py``: markdown tables, a PNG and the JSON record."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

DASH = "—"


def _ms(cell: dict[str, float | None] | None) -> str:
    """``median ±half-IQR`` of a profiler timing cell."""
    if not cell or cell.get("median") is None:
        return DASH
    return f"{cell['median']:.1f} ±{(cell['p75'] - cell['p25']) / 2:.1f}"


def _x(value: float | None, digits: int = 2) -> str:
    return DASH if value is None else f"{value:.{digits}f}×"


def _pct(value: float | None) -> str:
    return DASH if value is None else f"{100 * value:.1f} %"


def _kernel_lines(result: dict[str, Any]) -> list[str]:
    tests = result["kernel_tests"]
    line = f"**Compiled Triton kernel tests** (`pytest tests/kernels`): {tests['status']}"
    detail = tests.get("summary") or tests.get("note")
    lines = [line + (f" — {detail}" if detail else ""), ""]
    timed = [r for r in result["topk"] if r.get("status") == "ok"]
    goal = sum(r["speedup_vs_topk"] >= 2 for r in timed)
    verdict = (" Triton interpreter on CPU: equality only, not a speed figure."
               if result["env"]["triton_interpreter"] else
               f" Goal ≥ 2× over `torch.topk` + sort + gather: met in {goal} of {len(timed)}.")
    lines += ["**`select_and_gather`: fused Triton kernel vs `torch.topk` + sort + gather** "
              "(scores fp32, rows bf16; median ms)." + verdict, "",
              "| B | N | k | D | triton | torch.topk+sort+gather | vlprune reference | "
              "speed-up vs topk | identical |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["topk"]:
        if r.get("status") != "ok":
            lines.append(f"| {r.get('B', '')} | {r.get('N', '')} | {r.get('k', '')} | | "
                         f"{r['status']}: {r['note']} | | | | |")
            continue
        same = r["equal_reference"] and r["equal_topk_sort_gather"]
        lines.append(f"| {r['B']} | {r['N']} | {r['k']} | {r['D']} | {r['triton_ms']:.3f} | "
                     f"{r['topk_sort_gather_ms']:.3f} | {r['reference_ms']:.3f} | "
                     f"{_x(r['speedup_vs_topk'])} | {'yes' if same else 'NO'} |")
    return lines


_COLUMNS = ("method", "budget", "visual kept", "prefill ms", "speed-up", "FLOPs ratio",
            "efficiency", "select ms", "select share", "decode ms/tok", "peak GiB")


def _row(row: dict[str, Any]) -> str:
    budget = DASH if row["budget"] is None else str(row["budget"])
    if row["status"] != "ok":
        note = (row.get("note") or "").splitlines()[0][:90] if row.get("note") else ""
        return f"| {row['method']} | {budget} | {row['status']}: {note} |" + " |" * 8
    peak = row.get("peak_mb")
    cells = [row["method"], budget, str(row["kept_tokens"]), _ms(row.get("prefill_ms")),
             _x(row.get("speedup_prefill")), _x(row.get("flops_speedup")),
             DASH if row.get("efficiency") is None else f"{row['efficiency']:.2f}",
             _ms(row.get("select_ms")), _pct(row.get("select_share")),
             _ms(row.get("decode_ms_per_token")), DASH if peak is None else f"{peak / 1024:.2f}"]
    return "| " + " | ".join(cells) + " |"


def markdown(result: dict[str, Any]) -> str:
    """The whole report as markdown."""
    env, wall = result["env"], result["wall_s"]
    lines = [f"# vlprune GPU suite — {env['device']}", "",
             f"torch {env['torch']} · transformers {env['transformers']} · triton "
             f"{env['triton']} · flash_attention_2 importable: {env['flash_attention_2']} · "
             f"wall {wall.get('total', 0):.0f} s (estimate "
             f"{sum(result['estimate_s'].values()):.0f} s for the sweeps, took "
             f"{wall.get('sweeps', 0):.0f} s)", ""]
    lines += [f"- {note}" for note in result["plan"]["notes"]]
    lines += ["", *_kernel_lines(result), ""]
    for sweep in result["sweeps"]:
        info = sweep["info"]
        shape = (f" · {info['dtype']} · {info['prompt_tokens']} prompt tokens "
                 f"({info['image_tokens']} image)" if info else "")
        lines += [f"## {sweep['model']} · {sweep['attn']} · batch {sweep['batch']}{shape}", "",
                  "| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
        lines += [_row(row) for row in sweep["rows"]]
        lines.append("")
    lines.append("speed-up: unpatched prefill / prefill (same backend and batch); FLOPs ratio: "
                 "exact prefill FLOPs unpatched / run; efficiency: speed-up / FLOPs ratio; "
                 "select share: the method's own selection within the prefill; ms: median "
                 "±half-IQR.")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """Measured prefill speed-up against the FLOPs ratio, one panel per sweep (the diagonal is
    efficiency 1), plus the kernel's speed-up over ``torch.topk`` + sort + gather."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweeps = result["sweeps"]
    panels = len(sweeps) + 1
    cols = min(3, panels)
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 4 * rows), squeeze=False)
    flat = list(axes.flat)
    kernel = [r for r in result["topk"] if r.get("status") == "ok"]
    ax = flat[0]
    ax.bar(range(len(kernel)), [r["speedup_vs_topk"] for r in kernel])
    ax.set_xticks(range(len(kernel)), [f"{r['B']}/{r['N']}/{r['k']}" for r in kernel],
                  rotation=60, fontsize=7)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.axhline(2.0, color="green", linewidth=0.8, linestyle="--", label="goal 2×")
    interpreted = " — interpreter, not a speed" if result["env"]["triton_interpreter"] else ""
    ax.set_title(f"top-k kernel speed-up vs torch.topk+sort+gather (B/N/k){interpreted}",
                 fontsize=9)
    markers = "osD^v<>pPX*h"
    for ax, sweep in zip(flat[1:], sweeps):
        ok = [r for r in sweep["rows"] if r["status"] == "ok" and r["budget"] is not None
              and r.get("speedup_prefill")]
        methods = list(dict.fromkeys(r["method"] for r in ok))
        for i, method in enumerate(methods):
            runs = [r for r in ok if r["method"] == method]
            ax.scatter([r["flops_speedup"] for r in runs], [r["speedup_prefill"] for r in runs],
                       marker=markers[i % len(markers)], s=[20 + r["budget"] / 4 for r in runs],
                       label=method, alpha=0.8)
        top = max([r["flops_speedup"] for r in ok] + [r["speedup_prefill"] for r in ok] + [1.0])
        ax.plot([1, top], [1, top], color="grey", linewidth=0.8, linestyle=":")
        ax.set_xlabel("exact-FLOPs ratio")
        ax.set_ylabel("prefill speed-up")
        ax.set_title(f"{sweep['model']} · {sweep['attn']} · batch {sweep['batch']}", fontsize=9)
        ax.grid(alpha=0.3)
        if methods:
            ax.legend(fontsize=6)
    for ax in flat[panels:]:
        ax.axis("off")
    fig.suptitle(f"vlprune GPU suite — {result['env']['device']} (marker size: budget)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """``gpu_suite.json``, ``gpu_suite.md`` and ``gpu_suite.png`` in ``out_dir``."""
    paths = {"json": out_dir / "gpu_suite.json", "md": out_dir / "gpu_suite.md",
             "png": out_dir / "gpu_suite.png"}
    paths["json"].write_text(json.dumps(result, indent=2, default=str) + "\n")
    paths["md"].write_text(markdown(result))
    plot(result, paths["png"])
    return paths
