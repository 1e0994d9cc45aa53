"""``fixed`` (internal, for tests): keep exactly the given token indices of every image."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vlprune.budget import Budget
from vlprune.methods.base import DecoderBatch, Method, VisionBatch, keep_rows
from vlprune.registry import register_method


@register_method("fixed")
class FixedPrune(Method):
    """Keeps ``indices`` (one list for every image, or one list per image). Scope: per image.

    The budget still caps the count: each image keeps ``min(budget, len(indices))``, taking the
    first ones in sorted order.
    """

    stage = "vision"
    internal = True

    def __init__(self, *, indices: Sequence[int] | Sequence[Sequence[int]] = ()) -> None:
        per_image = [indices] if not indices or isinstance(indices[0], int) else indices
        lists = [sorted(set(map(int, idx))) for idx in per_image]
        if not lists or not all(lists):
            raise ValueError("`indices` must hold at least one token index per image")
        if any(idx[0] < 0 for idx in lists):
            raise ValueError("`indices` must be token indices ≥ 0")
        self.indices = lists

    def _for_image(self, i: int) -> list[int]:
        return self.indices[i] if len(self.indices) > 1 else self.indices[0]

    def budgets(self, layouts: list, budget: Budget) -> list[int]:
        """``min(budget, len(indices))`` per image."""
        return [
            min(budget.kept(layout.num_tokens), len(self._for_image(i)))
            for i, layout in enumerate(layouts)
        ]

    def select(self, batch: VisionBatch) -> list[torch.Tensor]:
        """The first ``keep_i`` of the image's sorted indices."""
        out = []
        for i, (layout, k) in enumerate(zip(batch.layouts, batch.keep)):
            idx = self._for_image(i)
            if idx[-1] >= layout.num_tokens:
                raise ValueError(
                    f"`indices` has {idx[-1]} but image {i} has {layout.num_tokens} tokens"
                )
            out.append(torch.tensor(idx[:k], dtype=torch.long, device=batch.features[i].device))
        return out


@register_method("fixed_layer")
class FixedLayerPrune(Method):
    """Internal, for tests: at decoder layer ``layer``, keep the visual tokens of each row whose
    ordinal among that row's visual tokens is in ``indices``. Scope: per request.
    """

    stage = "decoder"
    scope = "request"
    internal = True

    def __init__(self, *, indices: Sequence[int] = (), layer: int = 2) -> None:
        if not indices or min(indices) < 0:
            raise ValueError("`indices` must hold visual-token ordinals ≥ 0 (at least one)")
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 1:
            raise ValueError(f"`layer` must be an int ≥ 1, got {layer!r}")
        self.indices = sorted(set(map(int, indices)))
        self.layer = layer

    def cut_layers(self, n_layers: int) -> list[int]:
        """[layer]."""
        return [self.layer]

    def choose(
        self, ctx: DecoderBatch, budget: Budget
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Score 1 for the listed visual ordinals, 0 otherwise; keep the top ones."""
        ordinal = ctx.is_image.long().cumsum(1) - 1
        wanted = torch.tensor(self.indices, device=ordinal.device)
        scores = torch.isin(ordinal, wanted).float()
        keep_visual = min(len(self.indices), budget.kept(int(ctx.is_image.sum(1).min())))
        return keep_rows(scores, ctx.is_image, keep_visual)
