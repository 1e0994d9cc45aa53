"""``hiprune``: HiPrune, hierarchical attention inside the vision encoder (training-free).

"HiPrune: Hierarchical Attention for Efficient Token Pruning in Vision-Language Models",
arXiv 2508.00553 (v3, ACL 2026 Findings); official code https://github.com/Danielement321/HiPrune
(HEAD 6e83a12 read). Reference: ``docs/methods/hiprune.md``.

Per partition (an image; a LLaVA-NeXT thumbnail or crop) with budget N'
(``docs/methods/hiprune.md#algorithm``):

1. score every token by the attention it *receives* at a layer: ``s_j = Σ_i mean_h A[h, i, j]``
   over all queries (CLIP's CLS query included, its key never kept); Qwen: per pre-merge patch,
   then the mean over the 4 patches of each merged token;
2. anchors: the ``N_a = round(α·N'/5)`` (Python rounding) best tokens of the *object* layer;
3. buffers: the 4 neighbours (up, down, left, right) of every anchor;
4. ``S = unique(anchors ∪ buffers)``;
5. registers: the ``N' - |S|`` best tokens outside S by the *deep* layer;
6. keep ``sort(S ∪ registers)`` (raster order).

Layers (0-based): object = layer 8 of the 24-layer CLIP ViT-L (``HIPRUNE_OBJECT_LAYER=9``,
1-based) / block 15 of the 32-block Qwen ViTs, scaled to the probed depth as
``floor(l · depth / ref_depth)``; deep = -2 with a class token (CLIP: the LLaVA feature layer,
index 22), else the encoder's feature layer (Qwen: the last block). Explicit ``object_layer`` /
``deep_layer`` are used as given.
Qwen2-VL and Qwen3-VL have no official setting: they use the Qwen2.5-VL one (their blocks are
all full attention). LLaVA-OneVision's SigLIP (no official setting either) uses the CLIP rule:
its crops are batched sequences like CLIP's, received attention needs no CLS token, and its
feature layer is the last one.

Scope: per image; ``budget`` = tokens kept per image, exactly (``handle.stats.kept_per_image``).
LLaVA-NeXT: thumbnail and crops are pruned independently, the image budget split equally over
them (largest remainder, thumbnail first; a crop mostly removed by unpadding passes what it cannot
hold to the others). Newline tokens: see ``newline``.

Official-code behaviour and what vlprune does:

- reproduced: attention-received scoring, banker's rounding of N_a, dedup before sizing the
  registers, raster output order, equal NeXT split, Qwen layers and 4-patch mean;
- fixed (plain bugs): the budget is divided by the images of the whole *batch*, LLaVA-1.5 included
  (per image here; the NeXT split keeps the remainder instead of flooring it away); the Qwen path
  can keep fewer than the budget (a −1 penalty on column *sums* does not exclude S, ``topk`` then
  returns duplicates): registers are drawn from a mask excluding S, so the count is always N';
  buffers wrap across row ends and clamp onto the first / last token: true 4-neighbours here,
  ``wrap_neighbours=True`` restores the official index arithmetic (``i±1, i±W`` clamped to
  ``[0, N-1]``);
- cannot be reproduced: the official NeXT path forces the ``spatial`` merge (no unpadding, no
  newline tokens); vlprune prunes the model's own ``spatial_unpad`` layout, so patches removed by
  unpadding are never candidates (anchors, buffers and registers are drawn from kept cells only).
- if ``|S| > N'`` (only for α near 1 and tiny budgets) the N' members of S with the best deep
  score are kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from vlprune.adapters.base import Adapter, ImageLayout
from vlprune.hooks.signals import VisionAttentionScores
from vlprune.kernels import select_topk
from vlprune.methods._vision_common import (
    NEWLINE_POLICIES,
    apportion,
    fill_budget,
    gather_partitions,
    merged_token_scores,
    partition_tokens,
    resolve_layer,
    scale_layer,
    split_per_image,
)
from vlprune.methods.base import Method, VisionBatch
from vlprune.options import BoolOption, ChoiceOption, FloatOption, IntOption, declare
from vlprune.registry import register_method

# (object layer, its reference depth): batched (CLIP-style) encoders and packed Qwen ViTs
# (docs/methods/hiprune.md#options-and-official-defaults).
_OBJECT_LAYER = {False: (8, 24), True: (15, 32)}
_CLS_DEEP_LAYER = -2  # deep layer with a class token: CLIP's, the LLaVA feature layer


def neighbours(anchors: torch.Tensor, shape: tuple[int, int, int], wrap: bool) -> torch.Tensor:
    """Up / down / left / right neighbours of flat ``anchors`` on a (frames, rows, cols) grid.

    ``wrap=False``: only neighbours inside the same frame. ``wrap=True`` (official): ``i±1``,
    ``i±cols`` clamped to ``[0, N-1]``, so row ends wrap and edges collapse onto 0 / N-1.
    """
    frames, rows, cols = shape
    if wrap:
        steps = torch.cat([anchors - 1, anchors + 1, anchors - cols, anchors + cols])
        return steps.clamp(0, frames * rows * cols - 1)
    row, col = (anchors // cols) % rows, anchors % cols
    return torch.cat([
        anchors[col > 0] - 1,
        anchors[col < cols - 1] + 1,
        anchors[row > 0] - cols,
        anchors[row < rows - 1] + cols,
    ])


def hiprune_keep(
    obj: torch.Tensor,
    deep: torch.Tensor,
    valid: torch.Tensor,
    shape: tuple[int, int, int],
    k: int,
    *,
    alpha: float,
    wrap: bool = False,
) -> torch.Tensor:
    """Steps 2-6 on one partition: sorted local indices (k,) of the kept tokens.

    ``obj`` / ``deep`` (N,) object- and deep-layer scores, ``valid`` (N,) bool candidates
    (False where unpadding removed a cell), ``shape`` (frames, rows, cols) with N = their
    product, ``k`` ≤ ``valid.sum()``.
    """
    n_valid = int(valid.sum())
    if not 0 <= k <= n_valid:
        raise ValueError(f"cannot keep {k} of {n_valid} tokens")
    if k == 0:
        return torch.empty(0, dtype=torch.long, device=obj.device)
    n_anchor = min(round(alpha * k / 5), n_valid)
    in_s = torch.zeros_like(valid)
    if n_anchor > 0:
        anchors = select_topk(obj.float(), n_anchor, mask=valid)
        in_s[anchors] = True
        in_s[neighbours(anchors, shape, wrap)] = True
        in_s &= valid
    n_s = int(in_s.sum())
    if n_s >= k:
        return select_topk(deep.float(), k, mask=in_s)
    registers = select_topk(deep.float(), k - n_s, mask=valid & ~in_s)
    return torch.cat([in_s.nonzero()[:, 0], registers]).sort().values


@dataclass
class _Partition:
    """One independently pruned grid: layout index per cell (-1 = removed), scores, shape."""

    tokens: torch.Tensor
    obj: torch.Tensor
    deep: torch.Tensor
    shape: tuple[int, int, int]


@register_method("hiprune")
class HiPrune(Method):
    """Anchors (object layer) + their 4-neighbour buffers + registers (deep layer).

    Options (``docs/methods/hiprune.md#options-and-official-defaults``): ``alpha`` share of the
    budget spent on anchors + buffers (official 0.1); ``object_layer`` / ``deep_layer`` 0-based
    vision layers, None = official (see the module docstring); ``wrap_neighbours`` official buffer
    arithmetic (default False: true neighbours); ``newline`` LLaVA-NeXT / OneVision newline tokens:
    ``"drop"`` (official: none are kept unless the budget exceeds all other tokens), ``"row"``
    (kept iff the row keeps a token) or ``"all"``, always counted inside the budget.
    """

    stage = "vision"
    scope = "image"
    paper = "HiPrune (arXiv 2508.00553)"
    repo = "https://github.com/Danielement321/HiPrune"
    options = declare(
        alpha=FloatOption(0.1, "share of the budget spent on anchors and their 4-neighbour "
                          "buffers", low=0, high=1),
        object_layer=IntOption(None, "vision layer of the anchors (0-based, negative from the "
                               "end); None: official, scaled to the encoder depth", none=True),
        deep_layer=IntOption(None, "vision layer of the registers (0-based, negative from the "
                             "end); None: -2 with CLS, else the encoder's feature layer (Qwen, "
                             "SigLIP: the last block)", none=True),
        wrap_neighbours=BoolOption(False, "official buffer arithmetic (i±1, i±W clamped: "
                                   "wraps across rows); False: true 4-neighbours"),
        newline=ChoiceOption("drop", "LLaVA-NeXT / OneVision newline tokens, inside the "
                             "budget: 'drop' (official), 'row' (rows that keep a token) or "
                             "'all'",
                             choices=NEWLINE_POLICIES),
    )

    def layers(self, adapter: Adapter) -> tuple[int, int]:
        """(object, deep) 0-based layers on ``adapter``'s vision encoder."""
        depth = len(adapter.vision_layers)
        obj, ref_depth = _OBJECT_LAYER[adapter.packed_vision]
        obj = scale_layer(obj, ref_depth, depth) if self.object_layer is None else self.object_layer
        if self.deep_layer is not None:
            deep = self.deep_layer
        else:
            deep = _CLS_DEEP_LAYER if adapter.has_cls else adapter.vision_output_layer
        return resolve_layer(obj, depth, "object_layer"), resolve_layer(deep, depth, "deep_layer")

    def check_model(self, adapter: Adapter) -> None:
        """Family check, and both layers exist."""
        super().check_model(adapter)
        self.layers(adapter)

    def probes(self, adapter: Adapter) -> dict[str, Any]:
        """Attention received at the object and deep layers (+ Qwen's patch → token map)."""
        obj, deep = self.layers(adapter)
        probes: dict[str, Any] = {
            "object": VisionAttentionScores(adapter.vision_probe(obj)),
            "deep": VisionAttentionScores(adapter.vision_probe(deep)),
        }
        if adapter.packed_vision:
            probes["patches"] = adapter.patch_token_probe()
        return probes

    def select(self, batch: VisionBatch) -> list[torch.Tensor]:
        """Per image: partitions → equal split of the content budget → steps 2-6 each."""
        kept = []
        for layout, k, parts, feats in zip(
            batch.layouts, batch.keep, self._partitions(batch), batch.features
        ):
            n_content = sum(int((p.tokens >= 0).sum()) for p in parts)
            chosen = partial(self._chosen, parts=parts)
            kept.append(fill_budget(layout, k, n_content, chosen, self.newline, feats.device))
        return kept

    def _chosen(self, c: int, *, parts: list[_Partition]) -> torch.Tensor:
        """Sorted layout indices of ``c`` content tokens of one image: equal split, then
        :func:`hiprune_keep` in every partition."""
        caps = [int((p.tokens >= 0).sum()) for p in parts]

        def pick(i: int, n: int) -> torch.Tensor:
            part = parts[i]
            return hiprune_keep(
                part.obj, part.deep, part.tokens >= 0, part.shape, n,
                alpha=self.alpha, wrap=self.wrap_neighbours,
            )

        counts = apportion(c, [1.0] * len(caps), caps)
        return gather_partitions([p.tokens for p in parts], counts, pick)

    def _partitions(self, batch: VisionBatch) -> list[list[_Partition]]:
        """Per image its partitions with object / deep scores over the layout's cells."""
        obj, deep = batch.probes["object"].received(), batch.probes["deep"].received()
        if "patches" in batch.probes:
            return self._merged_partitions(batch.layouts, obj, deep, batch.probes["patches"])
        out = []
        for layout, obj_i, deep_i in zip(
            batch.layouts, split_per_image(obj, batch.layouts), split_per_image(deep, batch.layouts)
        ):
            shape = (1, *layout.grid)
            cells = layout.grid[0] * layout.grid[1]  # a CLS key (CLIP) comes first: dropped
            tokens = partition_tokens(layout, obj_i[0].device)
            out.append([
                _Partition(t, o[-cells:], d[-cells:], shape)
                for t, o, d in zip(tokens, obj_i, deep_i)
            ])
        return out

    @staticmethod
    def _merged_partitions(
        layouts: list[ImageLayout], obj: list[torch.Tensor], deep: list[torch.Tensor], patches: Any
    ) -> list[list[_Partition]]:
        """Qwen: one partition per image over its merged tokens (4-patch mean, raster order)."""
        token_of_patch = patches.token_of_patch()
        obj_m = merged_token_scores(torch.cat(obj), token_of_patch, layouts)
        deep_m = merged_token_scores(torch.cat(deep), token_of_patch, layouts)
        return [
            [_Partition(torch.arange(layout.num_tokens, device=o.device), o, d,
                        (layout.frames, *layout.grid))]
            for layout, o, d in zip(layouts, obj_m, deep_m)
        ]
