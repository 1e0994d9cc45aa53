"""``vlprune profile``: FLOPs, latency and memory of every method x budget on one model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vlprune.eval.profiler.presets import PRESETS
from vlprune.eval.profiler.report import format_table, write_outputs
from vlprune.eval.profiler.runner import ProfileSettings, parse_budget, run_profile

__all__ = ["add_parser", "main"]


def _size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    return int(width), int(height or width)


def _list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``profile`` on the ``vlprune`` sub-command parser."""
    parser = sub.add_parser(
        "profile", help="FLOPs, latency and memory of pruning methods on a model",
        description=__doc__ + " Presets (random weights, nothing downloaded): "
        + ", ".join(PRESETS) + ". Full-size presets on CPU give FLOPs only (no timing).",
    )
    parser.add_argument("--model", required=True, help="preset name, local path or hub id")
    parser.add_argument("--methods", type=_list, default=None,
                        help="comma-separated method names (default: all registered)")
    parser.add_argument("--budgets", type=lambda t: [parse_budget(b) for b in _list(t)],
                        default=[64, 128, 192],
                        help="comma-separated visual-token budgets; 0.25 means ratio 0.25")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--dtype", default="auto",
                        choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--attn", default="sdpa", help="attention backend of every run")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens generated per run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--image-size", type=_size, default=None, help="WxH of the image")
    parser.add_argument("--text-tokens", type=int, default=64,
                        help="non-image prompt tokens (64: LLaVA-1.5 prompt of 640 tokens)")
    timing = parser.add_mutually_exclusive_group()
    timing.add_argument("--timing", dest="timing", action="store_true", default=None,
                        help="force latency measurements (a full-size preset then runs itself)")
    timing.add_argument("--no-timing", dest="timing", action="store_false",
                        help="FLOPs only")
    parser.add_argument("--no-count", action="store_true",
                        help="skip the FlopCounterMode cross-check")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--out", type=Path, default=Path("vlprune-profile"),
                        help="directory for profile.json / .csv / .png")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's own choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=main)
    return parser


def main(args: argparse.Namespace) -> None:
    """Run the profile, print the table and write JSON, CSV and PNG."""
    settings = ProfileSettings(
        model=args.model, methods=args.methods, budgets=args.budgets, device=args.device,
        dtype=args.dtype, attn=args.attn, new_tokens=args.new_tokens, warmup=args.warmup,
        repeats=args.repeats, batch=args.batch, image_size=args.image_size,
        text_tokens=args.text_tokens, timing=args.timing, count=not args.no_count,
        progress=not args.no_progress, seed=args.seed, threads=args.threads,
    )
    try:
        result = run_profile(settings)
    except ValueError as err:
        raise SystemExit(f"vlprune profile: {err}") from None
    info = result.info
    print(f"{info['model']} (runs on {info['runs_on']}) · {info['device_name']} "
          f"({info['threads']} threads) · {info['dtype']} "
          f"· {info['attn_implementation']} · {info['prompt_tokens']} prompt tokens "
          f"({info['image_tokens']} image) · batch {settings.batch} · "
          f"{settings.new_tokens} new tokens")
    print(format_table(result))
    print("TMACs paper: FastV formula (multiply-accumulates, LLM prefill); TFLOPs exact: "
          "prefill FLOPs (2 per MAC; GQA, gated MLP, causal attention, vision + projector + "
          "LM head).")
    if info["timing"]:
        print("ms: median ±half-IQR; select ms: the method's own selection inside the prefill "
              "(select %: its share of the prefill, medians); peak MB: prefill, weights "
              "included; speed-up: baseline prefill / prefill.")
    else:
        print("FLOPs ratio: baseline / run exact TFLOPs. Latency not measured (a full-size "
              "preset on CPU runs its -mini twin for token counts only; use --device cuda).")
    paths = write_outputs(result, args.out, png=not args.no_plot)
    for kind, path in paths.items():
        print(f"{kind}: {path}", file=sys.stderr)
