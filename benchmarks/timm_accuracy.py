"""Accuracy vs kept tokens of every method that runs on a timm ViT, against random and uniform.

    .venv-timm/bin/python benchmarks/timm_accuracy.py [--train 300] [--test 300] [--out DIR]

Model: the shipped toy LLaVA's CLIP tower (336 px, 14 px patches: 576 patch tokens + class
token, 4 blocks, width 64) loaded into a timm ``VisionTransformer`` (``vlprune.timm.toy``),
nothing downloaded. Task: which of the 24 (colour, shape) pairs a toy scene holds (3-6 objects
of 9-16 patches each). A linear head on the unpruned model's pooled features is fitted on
``--train`` scenes of the ``train`` split (seconds), then frozen. Accuracy on ``--test`` scenes of
the held-out ``test`` split: the share of a scene's pairs among its top-m predicted pairs (m = its
number of pairs), in %.

Two settings, one model (class-token pooling):

- output cut at block 2 (LLaVA's feature layer ``-2``, the layer this tower's patch tokens were
  trained to describe their object on): ``forward_intermediates`` returns the kept tokens, a
  linear per-token classifier (pair or background, fitted on the unpruned tokens) reads each,
  and a pair's score is its best probability over the kept tokens (a stand-in for a projector +
  LLM that sees only the kept tokens);
- an encoder-internal cut after block 1 of 4 with the class-token head (blocks 2-3 and the
  pooling run on the kept tokens only).

``random`` is the mean of seeds 0-2. Prints a markdown table and writes ``timm_accuracy.json``
to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

import vlprune
from vlprune.eval.toy import data
from vlprune.eval.toy.model import toy_processor
from vlprune.eval.toy.vision_stage import pixels
from vlprune.timm.toy import toy_vit

FEATURE_BLOCK = 2
SETTINGS = {
    "output cut at block 2, per-token reader": {"cut_block": FEATURE_BLOCK, "reader": "tokens"},
    "cut after block 1, class-token head": {"cut_block": 1, "reader": "cls"},
}
METHODS = ["random", "uniform", "hiprune", "todre", "flowcut", "hired", "globalcom2"]
RANDOM_SEEDS = (0, 1, 2)
N_PAIRS = len(data.COLORS) * len(data.SHAPES)


def scenes(split: str, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scenes 0..n-1 of ``split``: (n, 3, 336, 336) normalised pixels, (n, 24) multi-hot pair
    labels and (n, 576) pair of each patch's object (24: background)."""
    drawn = [data.make_scene(data.generator(split, i)) for i in range(n)]
    images = pixels([data.render(s) for s in drawn], toy_processor())
    labels = torch.from_numpy(np.stack([data.scene_labels(s) for s in drawn]))
    pairs = []
    for scene in drawn:
        owner = data.patch_objects(scene)
        pair = [data.pair_index(scene.objects[o]) if o >= 0 else N_PAIRS for o in owner]
        pairs.append(pair)
    return images, labels, torch.tensor(pairs)


@torch.no_grad()
def run(model: nn.Module, images: torch.Tensor, batch: int, reader: str,
        head: nn.Module | None = None) -> torch.Tensor:
    """(n, 24) pair scores of ``images`` (batched): class-token logits, or with ``head`` the best
    per-token log-probability of each pair over the tokens block 2 returns; without ``head``,
    those (n, k, D) tokens."""
    out = []
    for i in range(0, len(images), batch):
        x = images[i:i + batch]
        if reader == "cls":
            out.append(model(x))
            continue
        tokens = model.forward_intermediates(x, indices=[FEATURE_BLOCK], output_fmt="NLC",
                                             intermediates_only=True, stop_early=True)[0]
        out.append(tokens if head is None else head(tokens).log_softmax(-1)[..., :-1].amax(1))
    return torch.cat(out)


def fit(head: nn.Module, features: torch.Tensor, targets: torch.Tensor, multi_label: bool) -> None:
    """Fit a linear ``head`` on frozen features: multi-label (class token, BCE) or per-token
    classes (cross-entropy)."""
    head.requires_grad_(True)
    optimiser = torch.optim.Adam(head.parameters(), lr=1e-2)
    loss_fn = (nn.functional.binary_cross_entropy_with_logits if multi_label
               else nn.functional.cross_entropy)
    for _ in range(600):
        optimiser.zero_grad()
        loss_fn(head(features), targets).backward()
        optimiser.step()
    head.requires_grad_(False)


def fit_heads(model: nn.Module, train: tuple[torch.Tensor, ...], batch: int) -> nn.Module:
    """Fit the class-token head (``model.head``) and return the per-token head, both on the
    unpruned model."""
    images, labels, pairs = train
    with torch.no_grad():
        pooled = torch.cat([model.forward_head(model.forward_features(images[i:i + batch]),
                                               pre_logits=True)
                            for i in range(0, len(images), batch)])
    fit(model.head, pooled, labels, multi_label=True)
    tokens = run(model, images, batch, "tokens")
    token_head = nn.Linear(tokens.shape[-1], N_PAIRS + 1)
    fit(token_head, tokens.flatten(0, 1), pairs.flatten(), multi_label=False)
    return token_head


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over scenes of the share of its m pairs among its m best-scored pairs, in %."""
    hits = []
    for row, truth in zip(logits, labels):
        m = int(truth.sum())
        hits.append(float(truth[row.topk(m).indices].sum()) / m)
    return 100.0 * statistics.fmean(hits)


def evaluate(model: nn.Module, test: tuple[torch.Tensor, ...], method: str, budget: int,
             setting: dict, token_head: nn.Module, batch: int) -> float:
    """Accuracy with ``method`` at ``budget`` (mean over seeds for ``random``)."""
    seeds = RANDOM_SEEDS if method == "random" else (None,)
    scores = []
    for seed in seeds:
        options = {} if seed is None else {"seed": seed}
        with vlprune.patch(model, method, budget=budget, cut_block=setting["cut_block"],
                           **options):
            scores.append(accuracy(run(model, test[0], batch, setting["reader"], token_head),
                                   test[1]))
    return statistics.fmean(scores)


def main() -> None:
    """Fit the heads, score every method x budget x setting, print and save the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=300, help="scenes to fit the head on")
    parser.add_argument("--test", type=int, default=300, help="held-out scenes scored")
    parser.add_argument("--budgets", type=lambda t: [int(b) for b in t.split(",")],
                        default=[32, 64, 128], help="patch tokens kept of 576")
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("vlprune-timm-accuracy"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    train, test = scenes("train", args.train), scenes("test", args.test)
    model = toy_vit(global_pool="token", num_classes=N_PAIRS)
    token_head = fit_heads(model, train, args.batch)
    results: dict[str, dict[str, dict[str, float]]] = {}
    jobs = len(SETTINGS) * len(METHODS) * len(args.budgets)
    with tqdm(total=jobs, desc="timm accuracy", unit="run") as bar:
        for name, setting in SETTINGS.items():
            unpruned = run(model, test[0], args.batch, setting["reader"], token_head)
            rows = {"none": {"576": accuracy(unpruned, test[1])}}
            for method in METHODS:
                rows[method] = {}
                for budget in args.budgets:
                    rows[method][str(budget)] = evaluate(model, test, method, budget, setting,
                                                         token_head, args.batch)
                    bar.update()
            results[name] = rows
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"train": args.train, "test": args.test, "budgets": args.budgets, "results": results}
    (args.out / "timm_accuracy.json").write_text(json.dumps(record, indent=1) + "\n")
    budgets = " | ".join(str(b) for b in args.budgets)
    print(f"| setting | method | {budgets} |\n|---|---|" + "---|" * len(args.budgets))
    for name, rows in results.items():
        print(f"| {name} | none (all 576) | " + " | ".join(
            f"{rows['none']['576']:.1f}" for _ in args.budgets) + " |")
        for method in METHODS:
            cells = " | ".join(f"{rows[method][str(b)]:.1f}" for b in args.budgets)
            print(f"| {name} | {method} | {cells} |")


if __name__ == "__main__":
    main()
