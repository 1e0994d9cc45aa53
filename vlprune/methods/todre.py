"""``todre``: ToDRE, token diversity before the LLM and task relevance inside it (training-free).

"ToDRE: Effective Visual Token Pruning via Token Diversity and Task Relevance", arXiv 2505.18757
v2 (Nov 2025; v1, May 2025: "... via Diversity and Task Awareness ..."). **No official code
exists**: this follows the v2 text (Algorithm 1, Eq. 8), with v1's greedy k-center as
``variant="kcenter"``. Reference: ``docs/methods/todre.md``.

Stage 1, diversity (vision side, after the projector; per image, budget k = kept tokens):

1. pivot p: the image token with the highest [CLS] attention of the vision encoder (LLaVA-NeXT:
   of the thumbnail, from the thumbnail's own [CLS]);
2. ``X`` = row-normalised post-projector embeddings (N, D); ``s = X·x_p``; ``s_p = +∞``;
3. k − 1 times: ``c = argmin s``; add c; ``s += X·x_c``; ``s_c = +∞`` (greedy max-sum, v2);
   ``"kcenter"`` (v1, inferred as farthest-point): ``d = 1 − X·x_p``, ``c = argmax d``,
   ``d = min(d, 1 − X·x_c)``;
4. keep the k picks, sorted (raster order; the paper leaves the order open).

Stage 2, relevance (decoder side, per sample):

5. at check layer ℓ: ``α_{t→v}`` = Σ over text queries T of the head-mean attention on the
   visual keys / Σ over T of the attention on all keys;
6. if ``α_{t→v} < τ`` every visual token of that sample leaves the sequence (and the KV cache)
   from layer ℓ + 1 on; otherwise nothing is removed. Samples of a batch decide on their own:
   rows that drop are left-padded with masked slots (the decoder cut's padded path).

Defaults and inferred choices (the paper is silent where marked):

- ℓ = 7L/8, read 1-based (supp. Table 3 lists "L" as a check layer that removes nothing):
  attention of 0-based layer ``7L//8 - 1``, visual rows leave from layer ``drop_layer = 7L//8``
  (28 of 32, 35 of 40); τ = 0.10.
- T = the rows after the sample's last visual row (instruction and answer prefix).
  ``α_{v→t}`` (visual queries on text keys, Eq. 8's second test) is identically 0 under the
  causal mask when T follows the image, so the test reduces to ``α_{t→v} < τ`` (flagged in
  ``docs/methods/todre.md#choices-where-the-paper-is-silent``; not computed).
- Pivot attention layer: CLIP's feature layer −2 (the output LLaVA feeds to the LLM); without
  [CLS], the encoder's feature layer (Qwen, SigLIP: the last block). Encoders without [CLS]
  (Qwen2-VL / 2.5-VL / 3-VL, LLaVA-OneVision's SigLIP) use the analogue of FlowCut's Qwen path:
  the attention of the mean ("global") query of that layer, averaged over each merged token's 4
  patches (Qwen) or read on the thumbnail sequence (OneVision) (the paper only says a random
  pivot "is acceptable" there: ``pivot="random"``).
- LLaVA-NeXT newline tokens are ordinary candidates (``newline``); the budget is a count per
  image (``ratio=0.25`` / ``0.1`` reproduce the paper's "up to 720 / 288 of 2880").
- Kept tokens keep their original positions (unspecified in the paper).

Options turn each stage off: ``stage1=False`` keeps every token before the LLM (the budget is
then unused), ``stage2=False`` never cuts inside the LLM.
"""

from __future__ import annotations

from typing import Any

import torch

from vlprune.adapters.base import Adapter, ImageLayout
from vlprune.budget import Budget
from vlprune.hooks.signals import GlobalQueryAttention
from vlprune.kernels import select_topk
from vlprune.methods._vision_common import (
    NEWLINE_POLICIES,
    fill_budget,
    merged_token_scores,
    newline_tokens,
    resolve_layer,
    split_per_image,
    unit_rows,
)
from vlprune.methods.base import (
    DecoderBatch,
    Method,
    VisionBatch,
    keep_rows_padded,
    trailing_text,
)
from vlprune.options import BoolOption, ChoiceOption, FloatOption, IntOption, declare, seed_option
from vlprune.registry import register_method

VARIANTS = ("maxsum", "kcenter")
PIVOTS = ("attention", "center", "random")
NEWLINES = ("candidate", *NEWLINE_POLICIES)
_CLS = torch.tensor([0])


def diverse_order(
    features: torch.Tensor, pivot: int, k: int, variant: str = "maxsum"
) -> torch.Tensor:
    """Greedy diversification of ``features`` (N, D) from ``pivot``: the first ``k`` picks
    (k,), in selection order (steps 2-3). Both variants minimise a running score, +∞ once
    picked: max-sum the summed cosine similarity to the picks, k-center the negated cosine
    distance to the nearest pick. Ties go to the lower index; no host sync per step."""
    x = unit_rows(features)
    order = torch.empty(k, dtype=torch.long, device=features.device)
    order[0] = pivot
    score = x @ x[pivot] if variant == "maxsum" else x @ x[pivot] - 1.0
    score[pivot] = torch.inf
    sim = torch.empty_like(score)
    for t in range(1, k):
        c = score.argmin()
        order[t] = c
        torch.mv(x, x[c], out=sim)
        if variant == "maxsum":
            score.add_(sim)
        else:
            torch.maximum(score, sim.sub_(1.0), out=score)
        score.index_fill_(0, c.view(1), torch.inf)
    return order


def relevance_ratio(attention: torch.Tensor, is_image: torch.Tensor,
                    queries: torch.Tensor) -> torch.Tensor:
    """Step 5: ``α_{t→v}`` per sample (B,) from head-mean attention rows ``attention`` (B, Q, L)
    of the query rows, visual keys ``is_image`` (B, L) and the text-query mask ``queries``
    (B, Q); NaN where a sample has no text query."""
    weights = queries.float()[:, :, None]
    visual = (attention * is_image[:, None, :] * weights).sum(dim=(1, 2))
    return visual / (attention * weights).sum(dim=(1, 2))


@register_method("todre")
class ToDRE(Method):
    """Greedy max-sum diversity from a [CLS]-attention pivot; whole-image removal inside the LLM
    when text barely attends to it.

    Scope: per image (stage 1: ``budget`` = tokens kept per image); stage 2 decides per sample.
    Options (``docs/methods/todre.md#options-and-defaults``): ``stage1`` / ``stage2`` switch the
    stages; ``variant`` "maxsum" (v2, default) or "kcenter" (v1); ``pivot`` "attention" (default,
    see the module docstring), "center" (centre of the main grid) or "random" (seeded by ``seed``);
    ``pivot_layer`` 0-based vision layer of the pivot attention (None: −2 with [CLS], else the
    encoder's feature layer); ``tau`` threshold on ``α_{t→v}`` (0.10); ``drop_layer`` first decoder
    layer without visual tokens (None: ``7L // 8``); ``newline`` LLaVA-NeXT / OneVision newline
    tokens: "candidate" (ordinary candidates, default) or a policy of
    ``_vision_common.fill_budget`` ("drop", "row", "all").
    """

    stage = "vision+decoder"
    scope = "image"
    paper = "ToDRE (arXiv 2505.18757v2)"
    repo = "no official code"
    options = declare(
        stage1=BoolOption(True, "diversity selection before the LLM (False: every visual "
                          "token enters the LLM, the budget is unused)"),
        stage2=BoolOption(True, "relevance check inside the LLM: a sample's visual tokens "
                          "leave when its text barely attends to them"),
        variant=ChoiceOption("maxsum", "stage-1 greedy: 'maxsum' (v2) or 'kcenter' (v1)",
                             choices=VARIANTS),
        pivot=ChoiceOption("attention", "stage-1 first pick: 'attention' (highest [CLS] / "
                           "global-query attention), 'center' or 'random' (seeded by seed)",
                           choices=PIVOTS),
        pivot_layer=IntOption(None, "vision layer of the pivot attention (0-based, negative "
                              "from the end); None: -2 with [CLS], else the encoder's feature "
                              "layer (Qwen, SigLIP: the last block)",
                              none=True),
        seed=seed_option("seed of pivot='random'"),
        tau=FloatOption(0.10, "stage-2 threshold on the text→vision attention share",
                        low=0, high=1),
        drop_layer=IntOption(None, "first decoder layer without the visual tokens a stage-2 "
                             "drop removes; None: 7L // 8 of L layers", none=True),
        newline=ChoiceOption("candidate", "LLaVA-NeXT / OneVision newline tokens: "
                             "'candidate' (ordinary candidates) or a budget policy 'drop', "
                             "'row' or 'all'",
                             choices=NEWLINES),
    )

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if not (self.stage1 or self.stage2):
            raise ValueError("`stage1` and `stage2` are both False: nothing would be pruned")

    # ------------------------------------------------------------------ layers and probes

    def _drop_layer(self, n_layers: int) -> int:
        layer = 7 * n_layers // 8 if self.drop_layer is None else self.drop_layer
        if not 1 <= layer < n_layers:
            raise ValueError(
                f"`drop_layer`={layer} is out of range 1..{n_layers - 1} for a "
                f"{n_layers}-layer language model"
            )
        return layer

    def _pivot_layer(self, adapter: Adapter) -> int:
        depth = len(adapter.vision_layers)
        layer = self.pivot_layer
        if layer is None:
            layer = -2 if adapter.has_cls else adapter.vision_output_layer
        return resolve_layer(layer, depth, "pivot_layer")

    def check_model(self, adapter: Adapter) -> None:
        """Family check, and the layers exist."""
        super().check_model(adapter)
        self.probes(adapter)

    def probes(self, adapter: Adapter) -> dict[str, Any]:
        """Pivot attention (stage 1, ``pivot="attention"``) and the check layer's attention."""
        probes: dict[str, Any] = {}
        if self.stage1 and self.pivot == "attention":
            vision = adapter.vision_probe(self._pivot_layer(adapter))
            if adapter.has_cls:
                probes["cls"] = vision
            else:
                probes["global"] = GlobalQueryAttention(vision)
            if adapter.packed_vision:
                probes["patches"] = adapter.patch_token_probe()
        if self.stage2:
            check = self._drop_layer(len(adapter.decoder_layers)) - 1
            probes["text"] = adapter.text_probe(check)
        return probes

    def cut_layers(self, n_layers: int) -> list[int]:
        """``[drop_layer]`` with stage 2, else none."""
        return [self._drop_layer(n_layers)] if self.stage2 else []

    # ------------------------------------------------------------------------- stage 1

    def budgets(self, layouts: list[ImageLayout], budget: Budget) -> list[int]:
        """Per image ``budget.kept(N_i)``; every token when stage 1 is off."""
        if not self.stage1:
            return [layout.num_tokens for layout in layouts]
        return super().budgets(layouts, budget)

    def select(self, batch: VisionBatch) -> list[torch.Tensor]:
        """Per image: pivot (step 1), greedy order (steps 2-3), sorted picks (step 4)."""
        if not self.stage1:
            return [torch.arange(layout.num_tokens, device=feats.device)
                    for layout, feats in zip(batch.layouts, batch.features)]
        pivots = self._pivots(batch)
        return [
            self._keep(layout, k, feats, pivot)
            for layout, k, feats, pivot in zip(batch.layouts, batch.keep, batch.features, pivots)
        ]

    def _keep(self, layout: ImageLayout, k: int, feats: torch.Tensor, pivot: int) -> torch.Tensor:
        """Sorted layout indices (k,) of one image."""
        device = feats.device
        if k == 0:
            return torch.empty(0, dtype=torch.long, device=device)
        if self.newline == "candidate" or not layout.newline:
            return diverse_order(feats, pivot, k, self.variant).sort().values
        is_content = torch.ones(layout.num_tokens, dtype=torch.bool, device=device)
        is_content[newline_tokens(layout, device)] = False
        content = is_content.nonzero()[:, 0]
        local = int((content < pivot).sum())
        n_order = min(k, content.numel())
        order = content[diverse_order(feats[content], local, n_order, self.variant)]

        def chosen(c: int) -> torch.Tensor:
            return order[:c].sort().values

        return fill_budget(layout, k, content.numel(), chosen, self.newline, device)

    def _pivots(self, batch: VisionBatch) -> list[int]:
        """Step 1: the pivot's layout index per image."""
        layouts = batch.layouts
        if self.pivot == "center":
            return [layout.prefix + (layout.grid[0] // 2) * layout.grid[1] + layout.grid[1] // 2
                    for layout in layouts]
        if self.pivot == "random":
            out = []
            for layout in layouts:
                generator = torch.Generator().manual_seed(self.seed)
                cells = layout.grid[0] * layout.grid[1]
                out.append(layout.prefix + int(torch.randint(cells, (1,), generator=generator)))
            return out
        if "patches" in batch.probes:
            patches = torch.cat(batch.probes["global"].rows())
            token_of_patch = batch.probes["patches"].token_of_patch()
            scores = merged_token_scores(patches, token_of_patch, layouts)
        else:
            if "cls" in batch.probes:
                rows = [r[:, 0, 1:].mean(0) for r in batch.probes["cls"].rows(_CLS)]
            else:
                rows = batch.probes["global"].rows()
            scores = [image[0] for image in split_per_image(rows, layouts)]
        return [layout.prefix + int(select_topk(s.float(), 1)[0])
                for layout, s in zip(layouts, scores)]

    # ------------------------------------------------------------------------- stage 2

    def choose(
        self, ctx: DecoderBatch, budget: Budget
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None:
        """Steps 5-6: samples with ``α_{t→v} < τ`` lose every visual row; None if none does."""
        queries, is_text = trailing_text(ctx.is_image, ctx.valid)
        attention = ctx.probes["text"].rows(queries).mean(dim=1)
        ratio = relevance_ratio(attention, ctx.is_image, is_text)
        drop = (ratio < self.tau) & is_text.any(1) & ctx.is_image.any(1)
        if not bool(drop.any()):
            return None
        return keep_rows_padded(~(ctx.is_image & drop[:, None]))
