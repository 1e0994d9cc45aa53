"""Measured effects of vlprune's departures from the official code (the docs/methods pages).

    python benchmarks/official_switches.py [--samples 64] [--out switches.json]

Everything runs on the shipped toy LLaVA (CLIP-geometry ViT, 576 visual tokens, trained
offline) at 64 kept tokens on the first ``--samples`` held-out questions (balanced over the four
kinds); a random-weight model would say nothing about which tokens matter.

1. ``switches``: each option that restores an official-code (or paper) behaviour against
   vlprune's default: accuracy of both and the mean share of kept tokens they have in common.
2. ``hired_regions``: HiRED's crop budgets from the toy ViT's layer-0 CLS attention read as a
   LLaVA-NeXT thumbnail, the official flat row bands against 2-D regions, on 2x2 / 1x2 / 2x1
   crop grids: share of the crop budget given to a different crop.
3. ``ties``: share of top-k selections whose k-th and (k+1)-th scores are equal (the tie rule
   decides membership), with vlprune's fp32 scores and with the same scores rounded to fp16.
4. ``positions``: ``positions="renumber"`` (the kept tokens renumbered contiguously after
   every cut: what the official LLaVA code does, splicing the kept tokens into a shorter prompt,
   and TransPrune / FlowCut's language-model step after each decoder cut) against vlprune's
   original positions: accuracy of both, the share of kept tokens in common (decoder cuts
   after the first score renumbered rows), answers changed and the largest change of the
   answer logits.
5. ``precision``: MMTok with its features L2-normalised in fp16 (official) against fp32;
   FlowCut's CLIP scores computed in fp16 (official) against fp32: share of score vectors with
   NaN, and kept-token overlap where they have none.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import vlprune
import vlprune.methods.base as methods_base
from vlprune.adapters import get_adapter
from vlprune.eval.toy.benchmark import accuracy, model_inputs
from vlprune.eval.toy.data import samples
from vlprune.eval.toy.model import load_toy_model, toy_processor
from vlprune.methods import flowcut, globalcom2, hiprune, hired, mmtok, random, todre
from vlprune.methods.hired import crop_content, crop_regions

BUDGET = 64
BATCH = 16


def predict(model: Any, processor: Any, data: list, method: str, **options: Any
            ) -> tuple[torch.Tensor, list[set[int]]]:
    """Answer logits (questions, vocab) and the kept token indices of every question under
    ``method`` (batch 16)."""
    logits, kept = [], []
    with vlprune.patch(model, method, budget=BUDGET, **options) as handle, torch.no_grad():
        for start in range(0, len(data), BATCH):
            inputs = model_inputs(processor, data[start:start + BATCH])
            logits.append(model(**inputs, logits_to_keep=1).logits[:, -1])
            kept += [set(image.kept.tolist()) for image in handle.kept_images()]
    return torch.cat(logits), kept


def answers(processor: Any, logits: torch.Tensor) -> list[str]:
    return processor.tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())


def run(model: Any, processor: Any, data: list, method: str, **options: Any
        ) -> tuple[float, list[set[int]]]:
    """Accuracy and the kept token indices of every question under ``method``."""
    logits, kept = predict(model, processor, data, method, **options)
    return accuracy(answers(processor, logits), data), kept


def overlap(a: list[set[int]], b: list[set[int]]) -> float:
    """Mean share of kept tokens two runs have in common (|A ∩ B| / max(|A|, |B|))."""
    return statistics.mean(len(x & y) / max(len(x), len(y), 1) for x, y in zip(a, b))


def compare(model: Any, processor: Any, data: list, method: str, default: dict,
            official: dict, label: str) -> dict[str, Any]:
    acc_a, kept_a = run(model, processor, data, method, **default)
    acc_b, kept_b = run(model, processor, data, method, **official)
    return {"method": method, "switch": label, "accuracy_default": acc_a,
            "accuracy_switch": acc_b, "overlap": overlap(kept_a, kept_b)}


def switches(model: Any, processor: Any, data: list) -> list[dict[str, Any]]:
    stop = mmtok.mmtok_stopwords(processor.tokenizer)
    cases = [
        ("hiprune", {}, {"wrap_neighbours": True}, "wrap_neighbours=True (official)"),
        ("mmtok", {}, {"stopwords": stop}, "stopwords=mmtok_stopwords(tokenizer) (official)"),
        ("transprune", {}, {"direction": "abs"}, 'direction="abs" (paper Eq. 2)'),
        ("transprune", {"counts": "proportional"}, {}, 'counts="official" (switch) against'
         ' counts="proportional"'),
        ("todre", {}, {"variant": "kcenter"}, 'variant="kcenter" (v1)'),
        ("todre", {}, {"stage2": False}, "stage2=False (stage 1 only)"),
    ]
    return [compare(model, processor, data, *case) for case in cases]


def hired_regions(model: Any, processor: Any, data: list) -> list[dict[str, Any]]:
    """Crop budgets of HiRED's steps 2-3 from each scene's real layer-0 CLS attention."""
    probe = get_adapter(model).vision_probe(0)
    scores: list[torch.Tensor] = []
    hook = probe.install()
    try:
        with torch.no_grad():
            for qa in data:
                model(**model_inputs(processor, [qa]), logits_to_keep=1)
                scores.append(probe.rows(torch.tensor([0]))[0][:, 0, 1:].sum(0))
    finally:
        hook.remove()
    side = int(scores[0].numel() ** 0.5)
    out = []
    for crop_grid in ((2, 2), (1, 2), (2, 1)):
        n = crop_grid[0] * crop_grid[1]
        moved = []
        for init in scores:
            shares = {}
            for region in ("band", "grid"):
                regions = crop_regions((side, side), crop_grid, region)
                content = crop_content(init, regions, n, 0.5, "count")
                shares[region] = content / content.sum()
            moved.append(float((shares["band"] - shares["grid"]).abs().sum() / 2))
        out.append({"crop_grid": list(crop_grid), "budget_share_moved": statistics.mean(moved),
                    "max": max(moved)})
    return out


@contextlib.contextmanager
def patched(module: Any, name: str, value: Any) -> Iterator[None]:
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


def _boundary_tie(scores: torch.Tensor, k: int, mask: torch.Tensor | None) -> list[bool]:
    """Per row: the k-th and (k+1)-th best valid scores are equal."""
    scores = scores.float().reshape(-1, scores.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask.reshape(scores.shape), float("-inf"))
    ranked = scores.sort(dim=-1, descending=True).values
    if k >= ranked.shape[-1]:
        return [False] * ranked.shape[0]
    tie = (ranked[:, k - 1] == ranked[:, k]) & torch.isfinite(ranked[:, k])
    return tie.tolist()


def ties(model: Any, processor: Any, data: list) -> list[dict[str, Any]]:
    """Boundary ties of every ``select_topk`` call the methods make on the toy questions."""
    modules = [methods_base, random, hiprune, hired, globalcom2, mmtok, todre, flowcut]
    original = vlprune.kernels.select_topk
    out = []
    for method in vlprune.list_methods():
        seen = {"fp32": [], "fp16": []}

        def counting(scores: torch.Tensor, k: int, *args: Any, _seen: dict = seen,
                     **kwargs: Any) -> torch.Tensor:
            mask = kwargs.get("mask")
            _seen["fp32"] += _boundary_tie(scores, k, mask)
            _seen["fp16"] += _boundary_tie(scores.float().half(), k, mask)
            return original(scores, k, *args, **kwargs)

        with contextlib.ExitStack() as stack:
            for module in modules:
                stack.enter_context(patched(module, "select_topk", counting))
            run(model, processor, data, method)
        calls = len(seen["fp32"])
        out.append({"method": method, "selections": calls,
                    "tied_fp32": sum(seen["fp32"]) / max(calls, 1),
                    "tied_fp16": sum(seen["fp16"]) / max(calls, 1)})
    return out


def _half_normalize(x: torch.Tensor, dim: int = -1, eps: float = 1e-12) -> torch.Tensor:
    """L2 normalisation in fp16; all-zero rows (padding slots of a batch, which the batch-1
    official code never has) stay zero instead of 0/0."""
    return F.normalize(x.half(), dim=dim, eps=eps).float().nan_to_num(0.0)


class _HalfNormalizeF:
    """``torch.nn.functional`` with ``normalize`` computed in fp16 (the official MMTok)."""

    def __getattr__(self, name: str) -> Callable[..., Any]:
        return _half_normalize if name == "normalize" else getattr(F, name)


def _clip_scores_fp16(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """FlowCut's CLIP scores with every step in fp16, as the official fp16 LLaVA runs them."""
    q, k, v = q.half(), k.half(), v.half()
    attention = ((q[:, :1] @ k.transpose(1, 2)) * scale).softmax(-1).mean(0)[0, 1:]
    semantic = (v[:, :1] @ v.transpose(1, 2)).softmax(-1).mean(0)[0, 1:]
    density = v.mean(0)[1:].abs().sum(-1)
    score = (attention / attention.sum() + semantic / semantic.sum()) * density
    _FP16_SCORES.append(bool(score.isnan().any()))
    return score.float(), attention.float()


_FP16_SCORES: list[bool] = []


def precision(model: Any, processor: Any, data: list) -> list[dict[str, Any]]:
    out = []
    acc32, kept32 = run(model, processor, data, "mmtok")
    with patched(mmtok, "F", _HalfNormalizeF()):
        acc16, kept16 = run(model, processor, data, "mmtok")
    out.append({"method": "mmtok", "change": "features L2-normalised in fp16",
                "accuracy_fp32": acc32, "accuracy_fp16": acc16,
                "overlap": overlap(kept32, kept16)})
    acc32, kept32 = run(model, processor, data, "flowcut")
    _FP16_SCORES.clear()
    with patched(flowcut, "clip_scores", _clip_scores_fp16):
        acc16, kept16 = run(model, processor, data, "flowcut")
    out.append({"method": "flowcut", "change": "CLIP scores computed in fp16",
                "accuracy_fp32": acc32, "accuracy_fp16": acc16,
                "score_vectors": len(_FP16_SCORES),
                "nan_share": sum(_FP16_SCORES) / max(len(_FP16_SCORES), 1),
                "overlap": overlap(kept32, kept16)})
    return out


def positions(model: Any, processor: Any, data: list) -> list[dict[str, Any]]:
    out = []
    for method in ("hiprune", "hired", "globalcom2", "mmtok", "flowcut", "todre", "fastv",
                   "transprune"):
        original, kept_a = predict(model, processor, data, method)
        renumbered, kept_b = predict(model, processor, data, method, positions="renumber")
        picked = [answers(processor, x) for x in (original, renumbered)]
        out.append({"method": method, "accuracy_original": accuracy(picked[0], data),
                    "accuracy_renumber": accuracy(picked[1], data),
                    "overlap": overlap(kept_a, kept_b),
                    "max_logit_change": float((original - renumbered).abs().max()),
                    "answers_changed": sum(a != b for a, b in zip(*picked))})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--parts", nargs="+", default=None,
                        choices=("switches", "hired_regions", "ties", "positions", "precision"))
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, processor = load_toy_model(), toy_processor()
    data = samples("test", args.samples)
    results = {}
    parts = {"switches": switches, "hired_regions": hired_regions, "ties": ties,
             "positions": positions, "precision": precision}
    for name in args.parts or list(parts):
        fn = parts[name]
        results[name] = fn(model, processor, data)
        print(f"## {name}")
        for row in results[name]:
            print(json.dumps(row))
        sys.stdout.flush()
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
