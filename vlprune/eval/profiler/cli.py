"""``vlprune profile``: FLOPs, latency and memory of every method x budget on one model."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from vlprune.cli_args import (
    CommandError,
    SplitList,
    attn_implementation,
    budget_value,
    checkpoint_source,
    int_at_least,
    method_name,
    output_dir,
    torch_device,
)
from vlprune.eval.profiler.presets import PRESETS
from vlprune.options import seed_option

__all__ = ["add_parser", "main", "model_source"]

DESCRIPTION = """\
FLOPs, latency and memory of pruning methods x budgets on one model, next to the unpruned
baseline. --model is a preset (real architecture, random weights, nothing downloaded), a local
checkpoint folder or a hub id. Full-size presets on CPU give FLOPs only (no timing). Lists take
spaces or commas: --budgets 64 128 or --budgets 64,128; 0.25 means ratio 0.25. Exits 1 if a
run fails (its row says why; the outputs are still written). Presets: """

def model_source(text: str) -> str:
    """A preset name, a local checkpoint folder (with ``config.json``), a hub id (``org/name``)
    or ``timm:<name>`` (a timm model, checked when the profile starts)."""
    if text in PRESETS:
        return text
    if text.startswith("timm:") and len(text) > len("timm:"):
        return text
    try:
        return checkpoint_source(text)
    except ValueError as err:
        if "/" in text or Path(text).exists():
            raise argparse.ArgumentTypeError(str(err)) from None
    raise argparse.ArgumentTypeError(
        f"unknown preset {text!r} (presets: {', '.join(PRESETS)}); or give a local checkpoint "
        "folder or a hub id (org/name)"
    )


def _size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)(?:x(\d+))?", text.lower())
    if match is None or int(match[1]) < 1 or int(match[2] or match[1]) < 1:
        raise argparse.ArgumentTypeError(f"--image-size is WxH in pixels (or one side), got "
                                         f"{text!r}")
    return int(match[1]), int(match[2] or match[1])


_SEED = seed_option("seed of the synthetic prompt and pixels")


def _seed(text: str) -> int:
    try:
        return _SEED.check("--seed", int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seed must be {_SEED.allowed()}, got {text!r}"
                                         ) from None


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``profile`` on the ``vlprune`` sub-command parser."""
    parser = sub.add_parser(
        "profile", help="FLOPs, latency and memory of pruning methods on a model",
        description=DESCRIPTION + ", ".join(PRESETS) + ".",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, type=model_source,
                        help="preset name, local checkpoint folder, hub id, or timm:<name> "
                             "(a timm ViT, random weights)")
    parser.add_argument("--methods", action=SplitList, item=method_name, default=None,
                        help="method names (default: every registered method)")
    parser.add_argument("--budgets", action=SplitList, item=budget_value, default=[64, 128, 192],
                        help="visual-token budgets (int ≥ 1) or ratios (in (0, 1]); "
                             "default 64 128 192")
    parser.add_argument("--device", type=torch_device, default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto",
                        choices=["auto", "float32", "bfloat16", "float16"],
                        help="auto: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--attn", type=attn_implementation, default="sdpa",
                        help="attention backend of every run: sdpa (default), eager, "
                             "flash_attention_2 (CUDA, flash-attn installed)")
    parser.add_argument("--new-tokens", type=int_at_least(1), default=16,
                        help="tokens generated per run (default 16)")
    parser.add_argument("--repeats", type=int_at_least(1), default=5,
                        help="timed runs per measurement (default 5)")
    parser.add_argument("--warmup", type=int_at_least(0), default=1,
                        help="untimed runs first (default 1)")
    parser.add_argument("--batch", type=int_at_least(1), default=1,
                        help="prompts per run (default 1)")
    parser.add_argument("--image-size", type=_size, default=None,
                        help="WxH of the image (default: the model's own)")
    parser.add_argument("--text-tokens", type=int_at_least(1), default=64,
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
    parser.add_argument("--out", type=output_dir, default=Path("vlprune-profile"),
                        help="folder for profile.json / .csv / .png (default ./vlprune-profile)")
    parser.add_argument("--threads", type=int_at_least(1), default=None,
                        help="CPU threads for torch (default: torch's own choice)")
    parser.add_argument("--seed", type=_seed, default=0, help=f"{_SEED.help} (default 0)")
    parser.add_argument("--cut-block", type=int, default=None,
                        help="timm models: block after which tokens are cut (default: the last)")
    parser.set_defaults(func=main)
    return parser


def main(args: argparse.Namespace) -> int:
    """Run the profile, print the table and write JSON, CSV and PNG; 1 if a run failed."""
    from vlprune.eval.profiler.report import format_table, write_outputs
    from vlprune.eval.profiler.runner import run_profile
    from vlprune.eval.profiler.target import ProfileSettings

    if args.model.startswith("timm:"):
        from vlprune.timm.profile import main as timm_main

        timm_main(args)
        return 0
    if args.cut_block is not None:
        raise CommandError("--cut-block applies to timm:<name> models only")
    if args.attn == "flash_attention_2" and not args.device.startswith("cuda"):
        raise CommandError(f"--attn flash_attention_2 runs on CUDA only, got --device "
                           f"{args.device}")
    settings = ProfileSettings(
        model=args.model, methods=args.methods, budgets=args.budgets, device=args.device,
        dtype=args.dtype, attn=args.attn, new_tokens=args.new_tokens, warmup=args.warmup,
        repeats=args.repeats, batch=args.batch, image_size=args.image_size,
        text_tokens=args.text_tokens, timing=args.timing, count=not args.no_count,
        progress=not args.no_progress, seed=args.seed, threads=args.threads,
    )
    try:
        result = run_profile(settings)
    except (OSError, ValueError, ImportError, NotImplementedError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CommandError(f"{args.model}: {first}") from None
    info = result.info
    print(f"{info['model']} (runs on {info['runs_on']}) · {info['device_name']} "
          f"({info['threads']} threads) · {info['dtype']} "
          f"· {info['attn_implementation']} · {info['prompt_tokens']} prompt tokens "
          f"({info['image_tokens']} image) · batch {settings.batch} · "
          f"{settings.new_tokens} new tokens")
    print(format_table(result))
    print("TMACs paper: FastV formula (multiply-accumulates, LLM prefill); TFLOPs exact: "
          "prefill FLOPs (2 per MAC; GQA, gated MLP or MoE router + active experts, causal "
          "attention, vision + projector (+ DeepStack mergers) + LM head).")
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
    failed = [f"{r['method']}@{r['budget']}: {r['note']}" for r in result.rows
              if r["status"] == "error"]
    if failed:
        raise CommandError(f"{len(failed)} run(s) failed: " + "; ".join(failed))
    return 0
