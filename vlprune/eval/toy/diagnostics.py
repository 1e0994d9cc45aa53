"""Diagnostics of the toy LLaVA, during training and on the shipped checkpoint.

- :func:`evaluate`: held-out accuracy, overall and per question kind (the validation points of
  stage 2 and the record ``accuracy.json`` of :mod:`~vlprune.eval.toy.train`);
- :func:`cls_attention_on_objects`: how much of the ViT's CLS attention falls on patches that
  touch an object (what vision pretraining aims for, as in CLIP).
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import LlavaForConditionalGeneration

from vlprune.adapters import get_adapter
from vlprune.eval.toy import data
from vlprune.eval.toy.benchmark import accuracy, accuracy_by_kind, predict
from vlprune.eval.toy.drawing import touched_patches
from vlprune.eval.toy.model import PATCH_SIZE, toy_processor
from vlprune.eval.toy.vision_stage import pixels

__all__ = ["CLS_LAYERS", "cls_attention_on_objects", "evaluate"]

CLS_LAYERS = (-2, -1)


def evaluate(model: LlavaForConditionalGeneration, split: str, n: int) -> dict[str, float]:
    """Accuracy on the first ``n`` samples of ``split``: overall and per question kind."""
    model.eval()
    samples = data.samples(split, n)
    answers = predict(model, toy_processor(), samples)
    return {"all": accuracy(answers, samples), **accuracy_by_kind(answers, samples)}


@torch.no_grad()
def cls_attention_on_objects(
    model: LlavaForConditionalGeneration, n: int = 64, layers: tuple[int, ...] = CLS_LAYERS
) -> dict[str, float]:
    """Share of the CLS token's attention (head mean, over the 576 patch keys) that falls on
    patches touching an object, at each of ``layers``, over ``n`` test images; ``"patches"`` is
    the share of such patches (what uniform attention would give)."""
    adapter = get_adapter(model)
    depth = len(adapter.vision_layers)
    probes = {layer: adapter.vision_probe(layer % depth) for layer in layers}
    handles = [p.install() for p in probes.values()]
    processor = toy_processor()
    shares: dict[int, list[float]] = {layer: [] for layer in layers}
    patch_share = []
    try:
        for s in data.samples("test", n):
            on = touched_patches(s.scene, PATCH_SIZE)
            on_t = torch.from_numpy(on)
            model.model.vision_tower(pixels([s.image], processor))
            for layer, probe in probes.items():
                row = probe.rows(torch.tensor([0]))[0].mean(0)[0, 1:]
                shares[layer].append(float(row[on_t].sum() / row.sum()))
            patch_share.append(float(on.mean()))
    finally:
        for h in handles:
            h.remove()
    out = {f"layer{layer}": float(np.mean(v)) for layer, v in shares.items()}
    return {**out, "patches": float(np.mean(patch_share))}
