"""``hired``: HiRED, High-Resolution Early Dropping (AAAI 2025), CLS attention in the ViT.

"HiRED: Attention-Guided Token Dropping for Efficient Inference of High-Resolution
Vision-Language Models", arXiv 2408.10945 (v3); official code https://github.com/hasanar1f/HiRED
(HEAD 502d6dd read). Reference: ``docs/methods/hired.md``.

Scores are CLS-query attention probabilities summed over heads, ``c_p[j] = Σ_h A_p[h, 0, j]``
over the patch keys of partition p (thumbnail p = 0, crops p ≥ 1). Per image, content budget c:

1. thumbnail share: ``N_0 = min(floor(α·c), thumbnail)``, crops ``N_sub = c - N_0`` (what the
   crops cannot hold after unpadding goes back to the thumbnail);
2. content per crop from the *initial* layer's thumbnail attention: the count of the
   top-``floor((1-α)·n)`` thumbnail tokens lying in the crop's region (``crop_score="count"``,
   official code) or the sum of their attention over it (``"sum"``, paper Eq. 1);
3. crop budgets ``∝`` content, split exactly (largest remainder, capped by each crop's tokens
   left after unpadding);
4. in every partition keep its top tokens by the *final* layer's CLS attention; raster order.

LLaVA-1.5 and timm ViTs with a class token: one partition, step 4 only. Layers:
``init_layer=0`` (first), ``final_layer=-2`` (the LLaVA feature layer: 22 of CLIP ViT-L's 24),
0-based, negative from the end, so they hold at any depth (timm: in the blocks up to
``cut_block``). α = 0.5 (paper and every official script; the harness default 1.0 is unused).

Scope: per image; ``budget`` = tokens kept per image (thumbnail + crops, plus newlines if the
``newline`` policy keeps any), exactly. Official budget is ``floor(P·576·ρ)`` over P padded
partitions; here ``ratio`` applies to the image's real (unpadded, newline-including) tokens.

Official-code behaviour and what vlprune does:

- reproduced: head-sum CLS probabilities, layers 0 / 22, α split, count-of-top-tokens content
  score (``crop_score="count"``), selection inside each partition, raster order, no newline
  tokens (``newline="drop"``);
- fixed (plain bugs): crop regions come from a flat reshape of the thumbnail (crop k gets the
  k-th band of whole rows, so side-by-side crops get top / bottom halves): default
  ``region="grid"`` uses the crop's 2-D rectangle of the thumbnail, ``region="band"`` restores
  the official one; floored crop budgets lose the remainder and unpadding after selection drops
  kept tokens (count < budget): here allocation is exact and only unpadded cells are candidates;
  LLaVA-1.5 applies image 0's mask to the whole batch: per image here.
- Qwen2-VL / 2.5-VL / 3-VL / 3.5 (no CLS token, no crops), LLaVA-OneVision (SigLIP, no CLS
  token) and timm ViTs without a class token are not supported: ``patch`` raises ``TypeError``.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch

from vlprune.adapters.base import Adapter, ImageLayout
from vlprune.kernels import select_topk
from vlprune.methods._vision_common import (
    NEWLINE_POLICIES,
    apportion,
    fill_budget,
    gather_partitions,
    partition_tokens,
    require_class_token,
    resolve_layer,
    split_per_image,
    thumbnail_regions,
)
from vlprune.methods.base import Method, VisionBatch
from vlprune.options import ChoiceOption, FloatOption, IntOption, declare
from vlprune.registry import register_method

_CLS = torch.tensor([0])


def crop_regions(grid: tuple[int, int], crop_grid: tuple[int, int], region: str) -> torch.Tensor:
    """(rows·cols,) crop index of each thumbnail cell: 2-D rectangles (``"grid"``) or the
    official flat reshape into ``n_crops`` contiguous raster bands (``"band"``)."""
    if region == "grid":
        return thumbnail_regions(grid, crop_grid)
    n, n_crops = grid[0] * grid[1], crop_grid[0] * crop_grid[1]
    return torch.arange(n) * n_crops // n


def crop_content(
    init: torch.Tensor, regions: torch.Tensor, n_crops: int, alpha: float, crop_score: str
) -> torch.Tensor:
    """(n_crops,) content of each crop from the thumbnail's initial-layer CLS attention (n,)."""
    regions = regions.to(init.device)
    if crop_score == "sum":
        return torch.zeros(n_crops, device=init.device).index_add_(0, regions, init.float())
    n_top = math.floor((1 - alpha) * init.numel())
    if n_top == 0:
        return torch.zeros(n_crops, device=init.device)
    top = select_topk(init.float(), n_top)
    return torch.bincount(regions[top], minlength=n_crops).float()


def hired_split(c: int, caps: list[int], content: list[float], alpha: float) -> list[int]:
    """Step 1 and 3: tokens per partition (thumbnail first), summing to ``c`` exactly."""
    crops = min(c - min(math.floor(alpha * c), caps[0]), sum(caps[1:]))
    return [c - crops, *apportion(crops, content, caps[1:])]


@register_method("hired")
class HiRED(Method):
    """Early-layer CLS attention splits the budget over crops; final-layer CLS attention picks.

    Options (``docs/methods/hired.md#options-and-official-defaults``): ``alpha`` thumbnail share
    (0.5); ``init_layer`` / ``final_layer`` (0 / -2); ``region`` (``"grid"`` or official
    ``"band"``); ``crop_score`` (official ``"count"`` or paper ``"sum"``); ``newline`` LLaVA-NeXT
    newline tokens: ``"drop"`` (official: none unless the budget exceeds all other tokens),
    ``"row"`` (kept iff the row keeps a token) or ``"all"``, counted inside the budget.
    """

    stage = "vision"
    scope = "image"
    families = ("llava", "llava_next", "timm")
    paper = "HiRED, AAAI 2025 (arXiv 2408.10945)"
    repo = "https://github.com/hasanar1f/HiRED"
    options = declare(
        alpha=FloatOption(0.5, "LLaVA-NeXT: thumbnail share of the budget", low=0, high=1),
        init_layer=IntOption(0, "vision layer whose thumbnail CLS attention splits the "
                             "budget over crops (0-based, negative from the end)"),
        final_layer=IntOption(-2, "vision layer whose CLS attention picks the tokens of "
                              "each partition (0-based, negative from the end)"),
        region=ChoiceOption("grid", "thumbnail region of a crop: 'grid' (its rectangle) or "
                            "'band' (official flat reshape)", choices=("grid", "band")),
        crop_score=ChoiceOption("count", "crop content: 'count' of top thumbnail tokens in "
                                "it (official code) or their 'sum' (paper)",
                                choices=("count", "sum")),
        newline=ChoiceOption("drop", "LLaVA-NeXT newline tokens, inside the budget: 'drop' "
                             "(official), 'row' (rows that keep a token) or 'all'",
                             choices=NEWLINE_POLICIES),
    )

    def check_model(self, adapter: Adapter) -> None:
        """Family check, a class token, and both layers exist."""
        super().check_model(adapter)
        require_class_token(self.name, adapter)
        self.probes(adapter)

    def probes(self, adapter: Adapter) -> dict[str, Any]:
        """CLS-row attention of the initial and final layers."""
        depth = len(adapter.vision_layers)
        return {
            "init": adapter.vision_probe(resolve_layer(self.init_layer, depth, "init_layer")),
            "final": adapter.vision_probe(resolve_layer(self.final_layer, depth, "final_layer")),
        }

    def select(self, batch: VisionBatch) -> list[torch.Tensor]:
        """Per image: steps 1-4 inside the image's newline policy."""
        final = split_per_image(_cls_scores(batch.probes["final"]), batch.layouts)
        init: list[list[torch.Tensor]] | None = None
        kept = []
        for i, (layout, k) in enumerate(zip(batch.layouts, batch.keep)):
            tokens = partition_tokens(layout, final[i][0].device)
            caps = [int((t >= 0).sum()) for t in tokens]
            content = [1.0] * (len(caps) - 1)
            if layout.crop_grid is not None:
                if init is None:
                    init = split_per_image(_cls_scores(batch.probes["init"]), batch.layouts)
                content = self._content(init[i][0], layout)
            chosen = partial(self._chosen, tokens=tokens, scores=final[i], content=content)
            device = batch.features[i].device
            kept.append(fill_budget(layout, k, sum(caps), chosen, self.newline, device))
        return kept

    def _chosen(
        self,
        c: int,
        *,
        tokens: list[torch.Tensor],
        scores: list[torch.Tensor],
        content: list[float],
    ) -> torch.Tensor:
        """Sorted layout indices of ``c`` content tokens of one image (steps 1, 3, 4)."""
        caps = [int((t >= 0).sum()) for t in tokens]

        def pick(p: int, n: int) -> torch.Tensor:
            return select_topk(scores[p], n, mask=tokens[p] >= 0)

        return gather_partitions(tokens, hired_split(c, caps, content, self.alpha), pick)

    def _content(self, init_thumbnail: torch.Tensor, layout: ImageLayout) -> list[float]:
        """Step 2 for one image: content score of each crop."""
        regions = crop_regions(layout.grid, layout.crop_grid, self.region)
        n_crops = layout.crop_grid[0] * layout.crop_grid[1]
        return crop_content(init_thumbnail, regions, n_crops, self.alpha, self.crop_score).tolist()


def _cls_scores(probe: Any) -> list[torch.Tensor]:
    """Per sequence, (n - 1,) head-summed CLS attention over the patch keys."""
    return [rows[:, 0, 1:].sum(0) for rows in probe.rows(_CLS)]
