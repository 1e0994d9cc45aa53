"""``vlprune show``: what each method keeps, drawn on the image.

Runs one prefill per method on one image and prompt, reads the tokens alive after the method's
last cut (:meth:`vlprune.PatchHandle.kept_images`) and writes a PNG: one cell per method, titled
with the kept count, the image with kept patches in full colour and pruned ones dimmed (one panel
per token grid: LLaVA-NeXT and LLaVA-OneVision show their thumbnail and their high-res
canvas).

Models (:func:`~vlprune.eval.showcase.load_showcase`): ``toy`` (the shipped trained toy LLaVA), a
profiler preset (random weights; a full-size preset runs as its ``-mini`` twin, which has the
same token geometry and depths), or a local directory / hub id of a checkpoint of a supported
family (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE,
Qwen3.5).
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import vlprune
from vlprune.budget import Budget
from vlprune.cli_args import (
    CommandError,
    SplitList,
    budget_value,
    int_at_least,
    method_name,
    torch_device,
)
from vlprune.eval.profiler.cli import model_source
from vlprune.eval.showcase import Showcase, load_showcase
from vlprune.keptmap import FITS, KeptImage
from vlprune.registry import get_method

__all__ = ["add_parser", "gallery", "keep_maps", "main", "overlay", "render", "write_pictures"]

DIM = 0.3
"""Brightness factor of pruned pixels."""
TITLE_H, LABEL_H, GAP = 36, 18, 8


@torch.no_grad()
def keep_maps(
    showcase: Showcase,
    image: Image.Image,
    methods: Sequence[str],
    *,
    text: str | None = None,
    budget: int | None = None,
    ratio: float | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, KeptImage | str]:
    """Per method, the :class:`~vlprune.keptmap.KeptImage` of ``image`` after one prefill of
    ``text`` (default: the showcase's), or why the method could not run on the model or on this
    image (its ``TypeError`` / ``ValueError`` at patch, its ``NotImplementedError`` in the
    prefill). ``options[method]``: that method's keyword options."""
    Budget(tokens=budget, ratio=ratio)  # bad values raise here, not once per method
    for name in methods:
        get_method(name)
    model = showcase.model
    prompt = showcase.prompt(showcase.default_text if text is None else text)
    inputs = showcase.processor(text=[prompt], images=[image.convert("RGB")], return_tensors="pt")
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device))
              for k, v in inputs.items()}
    out: dict[str, KeptImage | str] = {}
    for name in methods:
        try:
            handle = vlprune.patch(model, name, budget=budget, ratio=ratio,
                                   **(options or {}).get(name, {}))
        except (TypeError, ValueError) as err:  # the method does not support this model
            out[name] = str(err)
            continue
        with handle:
            try:
                model(**inputs)
            except NotImplementedError as err:  # nor this image (FlowCut, OneVision anyres_max)
                out[name] = str(err)
                continue
            out[name] = handle.kept_images()[0]
    return out


def overlay(pixels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``pixels`` (H, W, 3) uint8 with the pixels outside ``mask`` (H, W) dimmed to ``DIM``."""
    dimmed = (pixels.astype(np.float32) * DIM).astype(np.uint8)
    return np.where(mask[..., None], pixels, dimmed)


def render(
    image: Image.Image,
    kept: dict[str, KeptImage],
    *,
    fit: str = "stretch",
    size: int = 336,
    columns: int = 5,
) -> tuple[Image.Image, dict[tuple[str, str], tuple[int, int]]]:
    """The PNG grid of :func:`keep_maps`' results: one cell per method (title: method and kept
    count), one panel per token grid of the image, the image scaled so its longer side is
    ``size`` px. Returns the picture and the top-left corner of each (method, view) panel."""
    scale = size / max(image.size)
    width, height = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    pixels = np.asarray(image.convert("RGB").resize((width, height), Image.BILINEAR))
    n_views = max((len(k.views) for k in kept.values()), default=1)
    label = LABEL_H if n_views > 1 else 0
    cell_w, cell_h = width + GAP, TITLE_H + n_views * (label + height) + GAP
    columns = max(1, min(columns, len(kept)))
    rows = -(-len(kept) // columns)
    canvas = Image.new("RGB", (columns * cell_w + GAP, rows * cell_h + GAP), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=13)
    boxes: dict[tuple[str, str], tuple[int, int]] = {}
    for i, (name, image_kept) in enumerate(kept.items()):
        x, y = GAP + (i % columns) * cell_w, GAP + (i // columns) * cell_h
        draw.text((x, y), name, fill="black", font=font)
        draw.text((x, y + 16), f"kept {image_kept.n_kept} of {image_kept.n_tokens}",
                  fill="dimgray", font=font)
        y += TITLE_H
        for view in image_kept.views:
            if label:
                draw.text((x, y + 2), view.name, fill="dimgray", font=font)
                y += label
            mask = view.pixel_mask(width, height, fit).cpu().numpy()
            canvas.paste(Image.fromarray(overlay(pixels, mask)), (x, y))
            boxes[(name, view.name)] = (x, y)
            y += height
    return canvas, boxes


def write_pictures(image: Image.Image, kept: dict[str, KeptImage], out: Path, *,
                   fit: str = "stretch", size: int = 336, columns: int = 5,
                   split: bool = False) -> list[Path]:
    """Save :func:`render`'s grid to ``out`` and, with ``split``, one picture per method to
    ``<out stem>_<method>.png``; returns the paths written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    render(image, kept, fit=fit, size=size, columns=columns)[0].save(out)
    written = [out]
    for name, result in kept.items() if split else ():
        path = out.with_name(f"{out.stem}_{name}.png")
        render(image, {name: result}, fit=fit, size=size)[0].save(path)
        written.append(path)
    return written


def gallery(out: Path, *, budget: int = 64, index: int = 0,
            methods: Sequence[str] | None = None, split: bool = False) -> list[Path]:
    """Every method (default: all registered) at ``budget`` tokens on held-out toy scene
    ``index`` and its question, on the shipped toy model; :func:`write_pictures` to ``out``."""
    from vlprune.eval.toy.data import sample
    from vlprune.eval.toy.model import prompt

    showcase = load_showcase("toy")
    qa = sample("test", index)
    showcase.prompt = functools.partial(prompt, subject=qa.subject)
    kept = keep_maps(showcase, qa.image, methods or vlprune.list_methods(), text=qa.question,
                     budget=budget)
    return write_pictures(qa.image, _shown(kept), out, fit=showcase.fit, split=split)


def _shown(kept: dict[str, KeptImage | str]) -> dict[str, KeptImage]:
    """The methods that ran; the others are reported on stdout."""
    for name, result in kept.items():
        if isinstance(result, str):
            print(f"{name}: not shown ({result})")
    return {name: result for name, result in kept.items() if not isinstance(result, str)}


def _image_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no image file {text!r}")
    return path


def _ratio(text: str) -> float:
    value = budget_value(text)
    if not isinstance(value, float):
        raise argparse.ArgumentTypeError(f"--ratio is a kept fraction in (0, 1], got {text!r}")
    return value


def _model(text: str) -> str:
    if text.startswith("timm:"):
        raise argparse.ArgumentTypeError("vlprune show draws what a VLM keeps; timm models are "
                                         "patched from Python (handle.kept_indices)")
    return "toy" if text == "toy" else model_source(text)


def _png(text: str) -> Path:
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"--out {text!r} is a folder; give a .png file name")
    return path


DESCRIPTION = """\
What each pruning method keeps of one image, drawn on the image: one prefill per method, then a
PNG with one cell per method, titled with the kept count; kept patches in full colour, pruned
ones dimmed (LLaVA-NeXT shows its thumbnail and its high-res canvas). For decoder-side methods
the tokens alive after the last cut are shown. --model: toy (the shipped trained toy LLaVA), a
profiler preset (random weights; a full-size preset runs as its -mini twin, same token geometry
and depths), or a checkpoint folder / hub id. Lists take spaces or commas."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``vlprune show`` on the ``vlprune`` sub-command parser; every argument is
    checked while parsing."""
    show = sub.add_parser(
        "show", help="draw the image patches each method keeps (one PNG, one cell per method)",
        description=DESCRIPTION,
    )
    show.add_argument("image", type=_image_file, help="image file")
    show.add_argument("--model", type=_model, default="toy",
                      help="toy (default), a profiler preset, or a checkpoint folder / hub id")
    show.add_argument("--methods", action=SplitList, item=method_name, default=None,
                      help="methods to draw (default: every registered method)")
    amount = show.add_mutually_exclusive_group()
    amount.add_argument("--budget", type=int_at_least(1), default=None,
                        help="visual tokens kept per image (default 64)")
    amount.add_argument("--ratio", type=_ratio, default=None,
                        help="kept fraction in (0, 1] instead of --budget")
    show.add_argument("--prompt", default=None, help="the text after the image")
    show.add_argument("--fit", choices=("auto", *FITS), default="auto",
                      help="how the processor lays the image onto the token grid "
                           "(default: read from the processor)")
    show.add_argument("--size", type=int_at_least(8), default=336,
                      help="longer side of a panel in px (default 336)")
    show.add_argument("--columns", type=int_at_least(1), default=5,
                      help="cells per row (default 5)")
    show.add_argument("--split", action="store_true",
                      help="also write one PNG per method (OUT_<method>.png)")
    show.add_argument("--device", type=torch_device, default="cpu", help="cpu, cuda or cuda:N")
    show.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                      help="auto: the checkpoint's dtype on CUDA, float32 on CPU")
    show.add_argument("--out", type=_png, default=Path("vlprune_show.png"),
                      help="PNG to write (default ./vlprune_show.png)")
    show.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Run ``vlprune show`` from parsed arguments; 0 on success."""
    budget = 64 if args.budget is None and args.ratio is None else args.budget
    image = Image.open(args.image).convert("RGB")
    showcase = load_showcase(args.model, device=args.device, dtype=args.dtype)
    fit = showcase.fit if args.fit == "auto" else args.fit
    kept = _shown(keep_maps(showcase, image, args.methods or vlprune.list_methods(),
                            text=args.prompt, budget=budget, ratio=args.ratio))
    if not kept:
        raise CommandError(f"no method could run on {args.model}")
    written = write_pictures(image, kept, args.out, fit=fit, size=args.size,
                             columns=args.columns, split=args.split)
    for name, result in kept.items():
        print(f"{name}: kept {result.n_kept} of {result.n_tokens} tokens")
    print("saved " + ", ".join(map(str, written)))
    return 0
