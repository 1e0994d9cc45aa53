"""``random``: keep a seeded random subset of each image's tokens (the floor every method must beat)."""

from __future__ import annotations

import torch

from vlprune.kernels import select_topk
from vlprune.methods.base import Method, VisionBatch
from vlprune.registry import register_method


@register_method("random")
class RandomPrune(Method):
    """Uniformly random kept tokens per image, reproducible from ``seed``.

    Scope: per image. The generator is re-seeded at every prefill, so repeated calls (and
    ``generate(use_cache=False)``) keep the same tokens for the same inputs.
    """

    stage = "vision"
    paper = "baseline"

    def __init__(self, *, seed: int = 0) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"`seed` must be an int, got {seed!r}")
        self.seed = seed

    def select(self, batch: VisionBatch) -> list[torch.Tensor]:
        """Top-k of i.i.d. uniform scores drawn per image: 1. draw (N_i,) scores; 2. top-k."""
        generator = torch.Generator().manual_seed(self.seed)
        kept = []
        for layout, k, feats in zip(batch.layouts, batch.keep, batch.features):
            scores = torch.rand(layout.num_tokens, generator=generator).to(feats.device)
            kept.append(select_topk(scores, k))
        return kept
