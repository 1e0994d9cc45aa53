"""``globalcom2``: GlobalCom², thumbnail-guided compression of LLaVA-NeXT AnyRes crops.

"Global Compression Commander: Plug-and-Play Inference Acceleration for High-Resolution Large
Vision-Language Models" (AAAI 2026), arXiv 2501.05179; official code
https://github.com/xuyang-liu16/GlobalCom2 (HEAD 96b2d00 read; code unchanged since 2025-03-08).
Reference: ``docs/methods/globalcom2.md``.

Signal: ``z_p``, the last ViT layer's CLS-query row over the patch keys of partition p
(thumbnail p = 0, crops k ≥ 1), head mean of the *pre-softmax* logits (official
``CustomCLIPAttention``). Per image, content budget c and ``R = c / content tokens``:

1. thumbnail: its top tokens by ``z_0``;
2. crop retention (``generate_scale_for_crop_features``): ``S_k`` = sum of ``z_0`` over the
   thumbnail rectangle of crop k (``floor(side/n)`` bands, remainder to the last),
   ``σ = softmax((S - max S)/τ)``, ``r_k = min(R·(1 + σ_k - 1/n), 1)`` over the n crops;
3. tokens per partition ``∝`` the official targets ``(576·R, N_k·r_k)`` (N_k: crop k's tokens
   left after unpadding), split exactly (largest remainder, capped by N_k);
4. global guidance ``G``: ``z_0`` bilinearly resized (``align_corners=False``) to the unpadded
   high-res canvas, read at each crop cell;
5. crop k keeps its top tokens by ``(1-w)·z_k/‖z_k‖₂ + w·G_k/‖G_k‖₂`` (norms over the crop's
   unpadded cells; official: plain sum, i.e. ``global_weight`` w = 0.5).

LLaVA-1.5 (official code crashes there) and timm ViTs with a class token (``layer`` counted in
the blocks up to ``cut_block``): one partition, top tokens by ``z_0``.
Scope: per image; ``budget`` = tokens kept per image including the newline tokens the
``newline`` policy keeps, exactly. Official ``retention_ratio`` R is per partition with newlines
on top; here ``ratio`` applies to all the image's tokens and R is derived from the content share.

Official-code behaviour and what vlprune does:

- reproduced: pre-softmax head-mean logits of the last layer, region sums of logits, τ = 10,
  ``r_k`` formula, unpadded ``N_k``, bilinear guidance map on the unpadded canvas, L2-normalised
  sum, newline tokens kept on every row (``newline="all"``, counted inside the budget, a budget
  of at most the row count acting as ``"row"``; official: one per padded-grid row on top of the
  budget, while the model's own layout has one per unpadded row);
- fixed (plain bugs): kept crop tokens are written to the first cells of the crop instead of
  their own (``get_original_indices`` unused): here every kept token stays in its cell (the
  official placement is not offered: it reorders tokens); floored budgets lose the remainder:
  allocation is exact here; batch > 1 reuses image 0's thumbnail scores: per image here;
- not reproduced: the thumbnail is emitted in score order officially; vlprune keeps raster order.
- Qwen2-VL / 2.5-VL / 3-VL / 3.5 (no CLS token, no thumbnail / crops), LLaVA-OneVision (SigLIP,
  no CLS token; the paper's CLS-free OneVision variant has no released code) and timm ViTs
  without a class token are not supported: ``patch`` raises ``TypeError``.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from vlprune.adapters.base import Adapter, ImageLayout
from vlprune.hooks.signals import VisionAttentionScores
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


def crop_ratios(
    thumbnail: torch.Tensor, layout: ImageLayout, ratio: float, temperature: float
) -> torch.Tensor:
    """Step 2: (n,) retention ratio ``r_k`` of each crop from the thumbnail logits (rows·cols,)."""
    regions = thumbnail_regions(layout.grid, layout.crop_grid).to(thumbnail.device)
    n = layout.crop_grid[0] * layout.crop_grid[1]
    sums = torch.zeros(n, device=thumbnail.device).index_add_(0, regions, thumbnail.float())
    sigma = ((sums - sums.max()) / temperature).softmax(0)
    return (ratio * (1 + sigma - 1 / n)).clamp(max=1.0)


def guidance(thumbnail: torch.Tensor, layout: ImageLayout) -> torch.Tensor:
    """Step 4: (num_tokens,) ``z_0`` resized to the unpadded canvas, at each canvas token's
    layout index (0 elsewhere)."""
    height, width = layout.highres
    grid = thumbnail.float().view(1, 1, *layout.grid)
    canvas = F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)[0, 0]
    out = torch.zeros(layout.num_tokens, device=thumbnail.device)
    start = layout.prefix + layout.grid_tokens
    rows = start + torch.arange(height, device=out.device)[:, None] * (width + 1)
    out[(rows + torch.arange(width, device=out.device)).flatten()] = canvas.flatten()
    return out


def holistic_scores(
    local: torch.Tensor, glob: torch.Tensor, valid: torch.Tensor, global_weight: float
) -> torch.Tensor:
    """Step 5 on one crop: (N,) ``(1-w)·z/‖z‖ + w·G/‖G‖``, norms over the ``valid`` cells."""
    local, glob = local.float() * valid, glob.float() * valid
    local = local / local.norm().clamp_min(1e-12)
    glob = glob / glob.norm().clamp_min(1e-12)
    return (1 - global_weight) * local + global_weight * glob


@register_method("globalcom2")
class GlobalCom2(Method):
    """Thumbnail logits set per-crop retention ratios and guide per-token crop scores.

    Options (``docs/methods/globalcom2.md#options-and-official-defaults``): ``temperature`` τ of the
    crop softmax (10); ``global_weight`` w of the guidance map in the crop score (0.5 = official
    equal mix); ``layer`` scored ViT layer (-1, the last); ``newline`` LLaVA-NeXT newline tokens:
    ``"all"`` (official: every row keeps its newline), ``"row"`` (kept iff the row keeps a token) or
    ``"drop"``, inside the budget.
    """

    stage = "vision"
    scope = "image"
    families = ("llava", "llava_next", "timm")
    paper = "GlobalCom², AAAI 2026 (arXiv 2501.05179)"
    repo = "https://github.com/xuyang-liu16/GlobalCom2"
    options = declare(
        temperature=FloatOption(10.0, "τ of the softmax turning crops' thumbnail scores into "
                                "retention ratios", low=0, low_open=True),
        global_weight=FloatOption(0.5, "weight of the thumbnail's guidance map in a crop "
                                  "token's score (0.5: official equal mix)", low=0, high=1),
        layer=IntOption(-1, "vision layer whose CLS logits score the tokens (0-based, "
                        "negative from the end)"),
        newline=ChoiceOption("all", "LLaVA-NeXT newline tokens, inside the budget: 'all' "
                             "(official, every row), 'row' (rows that keep a token) or 'drop'",
                             choices=NEWLINE_POLICIES),
    )

    def check_model(self, adapter: Adapter) -> None:
        """Family check, a class token, and the layer exists."""
        super().check_model(adapter)
        require_class_token(self.name, adapter)
        resolve_layer(self.layer, len(adapter.vision_layers), "layer")

    def probes(self, adapter: Adapter) -> dict[str, Any]:
        """Pre-softmax scores of the scored layer (CLS row)."""
        layer = resolve_layer(self.layer, len(adapter.vision_layers), "layer")
        return {"logits": VisionAttentionScores(adapter.vision_probe(layer))}

    def select(self, batch: VisionBatch) -> list[torch.Tensor]:
        """Per image: steps 1-5 inside the image's newline policy."""
        logits = [rows[:, 0, 1:].mean(0) for rows in batch.probes["logits"].logits(_CLS)]
        kept = []
        for layout, k, z, feats in zip(
            batch.layouts, batch.keep, split_per_image(logits, batch.layouts), batch.features
        ):
            tokens = partition_tokens(layout, z[0].device)
            scores = list(z)
            if layout.crop_grid is not None:
                glob = guidance(z[0], layout)
                scores[1:] = [
                    holistic_scores(zk, glob[t.clamp_min(0)], t >= 0, self.global_weight)
                    for zk, t in zip(z[1:], tokens[1:])
                ]
            n_content = sum(int((t >= 0).sum()) for t in tokens)
            chosen = partial(self._chosen, layout=layout, tokens=tokens, scores=scores, z=z)
            kept.append(fill_budget(layout, k, n_content, chosen, self.newline, feats.device))
        return kept

    def _chosen(
        self,
        c: int,
        *,
        layout: ImageLayout,
        tokens: list[torch.Tensor],
        scores: list[torch.Tensor],
        z: list[torch.Tensor],
    ) -> torch.Tensor:
        """Sorted layout indices of ``c`` content tokens of one image (steps 1-3, top-k)."""
        caps = [int((t >= 0).sum()) for t in tokens]
        counts = [c]
        if layout.crop_grid is not None:
            ratio = c / sum(caps)
            r = crop_ratios(z[0], layout, ratio, self.temperature)
            targets = [caps[0] * ratio, *(cap * float(rk) for cap, rk in zip(caps[1:], r))]
            counts = apportion(c, targets, caps)

        def pick(p: int, n: int) -> torch.Tensor:
            return select_topk(scores[p], n, mask=tokens[p] >= 0)

        return gather_partitions(tokens, counts, pick)
