"""``uniform``: keep evenly spaced tokens over each image's raster order (a grid baseline).

Reference: ``docs/methods/uniform.md``.
"""

from __future__ import annotations

import torch

from vlprune.methods.base import Method, VisionBatch
from vlprune.registry import register_method


def evenly_spaced(n_tokens: int, k: int, device: torch.device | None = None) -> torch.Tensor:
    """Indices ``floor((i + 1/2) · n / k)`` for i < k: the centres of k equal slices of [0, n).

    Sorted and unique for 0 < k ≤ n. On a 24×24 raster with k = 64 the stride is 9, which walks a
    sheared lattice covering every row and column band.
    """
    steps = (torch.arange(k, device=device, dtype=torch.float64) + 0.5) * (n_tokens / k)
    return steps.floor().long()


@register_method("uniform")
class UniformPrune(Method):
    """Evenly spaced kept tokens over the image's token order. Scope: per image.

    LLaVA-NeXT: the order is thumbnail then high-res rows (newline tokens included), so the
    budget spreads over both in proportion to their sizes.
    """

    stage = "vision"
    paper = "baseline"

    def select(self, batch: VisionBatch) -> list[torch.Tensor]:
        """Per image: ``evenly_spaced(N_i, keep_i)``."""
        return [
            evenly_spaced(layout.num_tokens, k, feats.device)
            for layout, k, feats in zip(batch.layouts, batch.keep, batch.features)
        ]
