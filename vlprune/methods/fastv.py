"""``fastv``: FastV (Chen et al., ECCV 2024), the decoder-side baseline every paper compares with.

"An Image is Worth 1/2 Tokens After Layer 2", arXiv 2403.06764; official code
https://github.com/pkunlp-icler/FastV. At decoder layer K the visual tokens are ranked by the
attention the last prompt token gave them at layer K-1 (mean over heads); the top ones stay for
layers ≥ K, the others leave the sequence and the KV cache of those layers. Reference:
``docs/methods/fastv.md``.
"""

from __future__ import annotations

from typing import Any

import torch

from vlprune.adapters.base import Adapter
from vlprune.budget import Budget
from vlprune.methods.base import DecoderBatch, Method, keep_rows, last_rows
from vlprune.options import IntOption, declare
from vlprune.registry import register_method


@register_method("fastv")
class FastV(Method):
    """Keep the visual tokens the last prompt token attends to most (layer ``layer - 1``).

    Scope: per request (all visual tokens of a sample). ``budget`` = visual tokens kept after
    layer K; ``ratio`` = kept fraction (FastV's R is ``1 - ratio``). Official default K = 2.
    Kept tokens keep their original RoPE positions (as the official inplace implementation).
    """

    stage = "decoder"
    scope = "request"
    paper = "FastV, ECCV 2024 (arXiv 2403.06764)"
    repo = "https://github.com/pkunlp-icler/FastV"
    options = declare(
        layer=IntOption(2, "decoder layer K (0-based) at whose input visual tokens are cut; "
                        "the last token's attention at layer K-1 ranks them", minimum=1),
    )

    def cut_layers(self, n_layers: int) -> list[int]:
        """[K]."""
        return [self.layer]

    def probes(self, adapter: Adapter) -> dict[str, Any]:
        """Self-attention of layer K - 1: its last-query row ranks the visual tokens."""
        return {"attention": adapter.text_probe(self.layer - 1)}

    def choose(
        self, ctx: DecoderBatch, budget: Budget
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """1. attention of each row's last prompt token (last real row: right padding is
        skipped) at K-1, head mean; 2. keep text + each row's top visual rows (``budget`` of
        that row's visual tokens)."""
        last = last_rows(ctx.is_image, ctx.valid)
        scores = ctx.probes["attention"].rows(last).mean(dim=1)[:, 0]
        keep_visual = [budget.kept(n) for n in ctx.is_image.sum(1).tolist()]
        return keep_rows(scores, ctx.is_image, keep_visual)
