"""``random``: keep a seeded random subset of each image's tokens.

The floor every method must beat. Reference: ``docs/methods/random.md``.
"""

from __future__ import annotations

import torch

from vlprune.kernels import select_topk
from vlprune.methods.base import Method, VisionBatch
from vlprune.options import declare, seed_option
from vlprune.registry import register_method


@register_method("random")
class RandomPrune(Method):
    """Uniformly random kept tokens per image, reproducible from ``seed``.

    Scope: per image. Each image's scores come from a generator seeded with ``seed`` alone, so
    an image's kept set depends only on ``seed`` and its token count: repeated calls,
    ``generate(use_cache=False)`` and any batch composition keep the same tokens.
    """

    stage = "vision"
    paper = "baseline"
    options = declare(seed=seed_option("seed of every image's draw (same seed, same kept tokens)"))

    def select(self, batch: VisionBatch) -> list[torch.Tensor]:
        """Per image: 1. draw (N_i,) uniform scores from a fresh ``seed`` generator; 2. top-k."""
        kept = []
        for layout, k, feats in zip(batch.layouts, batch.keep, batch.features):
            generator = torch.Generator().manual_seed(self.seed)
            scores = torch.rand(layout.num_tokens, generator=generator).to(feats.device)
            kept.append(select_topk(scores, k))
        return kept
