"""``fixed`` (internal, for tests): keep exactly the given token indices of every image."""

from __future__ import annotations

from typing import Any

import torch

from vlprune.budget import Budget
from vlprune.methods.base import DecoderBatch, Method, VisionBatch, keep_rows
from vlprune.options import REQUIRED, CustomOption, IntOption, as_int, declare
from vlprune.registry import register_method


def _index_list(values: Any, option: str) -> list[int]:
    """Sorted unique ints ≥ 0 of a non-empty sequence; ``ValueError`` naming ``option``."""
    ints = [as_int(v) for v in values] if isinstance(values, (list, tuple)) else []
    if not ints or any(i is None or i < 0 for i in ints):
        raise ValueError(f"`{option}` must hold token indices ≥ 0 (at least one), got {values!r}")
    return sorted(set(ints))


def _per_image_indices(values: Any) -> list[list[int]]:
    """``indices`` of ``fixed``: one list for every image, or one list per image."""
    nested = isinstance(values, (list, tuple)) and bool(values) and isinstance(
        values[0], (list, tuple))
    return [_index_list(v, "indices") for v in values] if nested else [
        _index_list(values, "indices")]


@register_method("fixed")
class FixedPrune(Method):
    """Keeps ``indices`` (one list for every image, or one list per image). Scope: per image.

    The budget still caps the count: each image keeps ``min(budget, len(indices))``, taking the
    first ones in sorted order.
    """

    stage = "vision"
    internal = True
    options = declare(
        indices=CustomOption(REQUIRED, "token indices kept in every image (or one list per "
                             "image)", check_value=_per_image_indices,
                             domain="token indices ≥ 0, or one such list per image"),
    )

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
    options = declare(
        indices=CustomOption(REQUIRED, "ordinals (among a row's visual tokens) kept",
                             check_value=lambda v: _index_list(v, "indices"),
                             domain="visual-token ordinals ≥ 0"),
        layer=IntOption(2, "decoder layer at whose input the cut happens", minimum=1),
    )

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
