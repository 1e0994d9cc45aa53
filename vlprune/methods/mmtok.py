"""``mmtok``: MMTok, multimodal coverage maximisation (Dong et al., ICLR 2026).

"MMTok: Multimodal Coverage Maximization for Efficient Inference of VLMs", arXiv 2508.18264;
official code https://github.com/Ironieser/MMTok (release ``5b186b6``); reference
``docs/methods/mmtok.md``.
After the projector, each image keeps the k tokens chosen greedily to maximise

    F(S) = 1/m Σ_text max_{j∈S} P[t, j] + α/n Σ_vision max_{j∈S} Q[v, j]        (paper Eq. 2)

where ``P = softmax_j(t̂·v̂_jᵀ / τ_t)`` compares the prompt's text-token input embeddings with the
post-projector tokens and ``Q = softmax_j(v̂'·v̂'_jᵀ / τ_v)`` compares the pre-projector features
among themselves (all L2-normalised, fp32). F is monotone submodular, so greedy is a
(1 - 1/e)-approximation; the greedy here runs batched over all images (crops) of equal size.

Scope: per image (LLaVA-1.5, Qwen2-VL / 2.5-VL / 3-VL / 3.5); per crop on LLaVA-NeXT and
LLaVA-OneVision, as the official code on NeXT (``budget`` = tokens per crop, the paper's "Upper
5k"). Pre-projector features: the selected vision layer (the projector input) for LLaVA (CLIP)
and OneVision (SigLIP; on a canvas downsampled by ``anyres_max`` each token is represented by
the crop patch at its centre); for Qwen the merger input averaged over each 2×2 merge group, in
raster order (Qwen2.5-VL's window order undone by the adapter's patch→token map).

Text targets come from the prompt: every prompt token that is not an image placeholder, not
padding and not in ``stopwords`` (which needs ``input_ids``; a prompt given as ``inputs_embeds``
works without them). The official code instead captures the user
question from a patched chat template and filters it with a stop-word list; pass
``stopwords=mmtok_stopwords(tokenizer)`` to drop the same words (plus punctuation, special
tokens, the two lmms-eval answer-format suffixes and common chat-template boilerplate). Without
``stopwords`` every text token of the prompt is a target. When filtering leaves a prompt with no
target, its unfiltered text is used (official fallback).

Reproduced: the objective, temperatures, α, the greedy (lowest index wins ties), LLaVA-NeXT's
per-crop selection with ``image_newline`` dropped (``keep_newlines=True`` keeps them).
Differences: batch > 1 (official: batch 1); targets are the prompt's tokens in context (official
re-tokenises the cleaned question word by word); LLaVA-NeXT patches cut by unpadding are not
candidates and kept tokens stay in stock AnyRes order and positions (official keeps all 576
patches per crop and re-orders crop by crop); an image whose budget covers every patch is kept
whole, newlines included; ``ratio`` keeps ``ceil`` (official Qwen ``floor``); k never exceeds the
candidates (official can return duplicates). Not implemented: MMTok++ padding exclusion (HF's
LLaVA processor crops, it does not pad), adaptive τ_v (App. B.1, not in the code), the v1 agent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from vlprune.adapters.base import Adapter, ImageLayout
from vlprune.budget import Budget
from vlprune.hooks.gather import gather_rows
from vlprune.methods._coverage import coverage_matrix, greedy_coverage
from vlprune.methods._stopwords import mmtok_stopwords, stopword_mask
from vlprune.methods._vision_common import newline_tokens, partition_tokens
from vlprune.methods.base import Method, VisionBatch
from vlprune.options import BoolOption, CustomOption, FloatOption, as_int, declare
from vlprune.registry import register_method

__all__ = ["TV_TEMPERATURE", "MMTok", "mmtok_stopwords"]

TV_TEMPERATURE = {"llava": 0.02, "llava_next": 0.02, "qwen2_vl": 0.01, "qwen2_5_vl": 0.01,
                  "qwen3_vl": 0.01, "qwen3_vl_moe": 0.01, "qwen3_5": 0.01,
                  "llava_onevision": 0.02}
"""Official τ_t per family (LLaVA 0.02, Qwen 0.01); Qwen3-VL / Qwen3.5 take Qwen's and
LLaVA-OneVision LLaVA's (no official setting for them)."""


class _Unit(NamedTuple):
    """One selection unit: an image, or a LLaVA-NeXT crop."""

    image: int
    pre: torch.Tensor  # (N, D') pre-projector features
    tokens: torch.Tensor  # (N,) index in the image's token layout, -1 = not a candidate


def _check_stopwords(stopwords: Any) -> list[list[int]]:
    """``stopwords`` as lists of token ids (a bare id is a one-token sequence)."""
    error = ValueError(
        "`stopwords` must be a sequence of token ids or of non-empty token-id sequences "
        "(see mmtok_stopwords)"
    )
    if isinstance(stopwords, (str, bytes)) or not isinstance(stopwords, Sequence):
        raise error
    out = []
    for entry in stopwords:
        seq = [entry] if as_int(entry) is not None else entry
        if isinstance(seq, (str, bytes)) or not isinstance(seq, Sequence) or not seq:
            raise error
        ids = [as_int(t) for t in seq]
        if any(t is None or t < 0 for t in ids):
            raise error
        out.append(ids)
    return out


@register_method("mmtok")
class MMTok(Method):
    """Greedy text→vision + α·vision→vision coverage after the projector (see module docstring).

    Options (``docs/methods/mmtok.md#options-and-official-defaults``): ``alpha`` = 0.5;
    ``tv_temperature`` τ_t (None = 0.02 on the LLaVA families, 0.01 on the Qwen ones);
    ``vv_temperature`` τ_v = 0.2; ``stopwords``: token-id sequences that are not text targets
    (``mmtok_stopwords(tokenizer)``; None = none); ``keep_newlines``: keep LLaVA-NeXT's newline
    tokens on top of the per-crop budget (official: dropped).
    """

    stage = "vision"
    scope = "image"
    paper = "MMTok, ICLR 2026 (arXiv 2508.18264)"
    repo = "https://github.com/Ironieser/MMTok"
    options = declare(
        alpha=FloatOption(0.5, "weight α of the vision→vision coverage term", low=0),
        tv_temperature=FloatOption(None, "τ_t of the text→vision softmax; None: 0.02 on "
                                   "the LLaVA families, 0.01 on the Qwen ones", low=0,
                                   low_open=True, none=True),
        vv_temperature=FloatOption(0.2, "τ_v of the vision→vision softmax", low=0,
                                   low_open=True),
        stopwords=CustomOption(None, "token-id sequences that are not text targets "
                               "(mmtok_stopwords(tokenizer)); None: every prompt token is one",
                               check_value=_check_stopwords, none=True,
                               domain="a sequence of token ids or of token-id sequences"),
        keep_newlines=BoolOption(False, "keep LLaVA-NeXT / OneVision newline tokens on top "
                                 "of the per-crop budget (official: dropped)"),
    )

    def check_model(self, adapter: Adapter) -> None:
        """Resolve the family's official τ_t when ``tv_temperature`` is None."""
        super().check_model(adapter)
        if self.tv_temperature is None:
            self.tv_temperature = TV_TEMPERATURE.get(adapter.family, 0.02)

    def probes(self, adapter: Adapter) -> dict[str, Any]:
        """The projector / merger input and, for merged tokens (Qwen), the adapter's patch →
        token map."""
        probes = {"vision": adapter.projector_probe()}
        patch_token_probe = getattr(adapter, "patch_token_probe", None)
        if patch_token_probe is not None:
            probes["patches"] = patch_token_probe()
        return probes

    def budgets(self, layouts: list[ImageLayout], budget: Budget) -> list[int]:
        """Per image: Σ over its crops of ``budget.kept(crop patches)`` (+ its newlines if kept);
        a single crop for LLaVA-1.5 and Qwen; the whole image if every crop keeps all."""
        return [self._plan(layout, budget)[2] for layout in layouts]

    def _plan(self, layout: ImageLayout, budget: Budget) -> tuple[torch.Tensor, list[int], int]:
        """Crop → token map (U, N), kept per crop, kept in the image (newlines included)."""
        token_map = torch.stack(partition_tokens(layout))
        sizes = (token_map >= 0).sum(1).tolist()
        ks = [budget.kept(n) for n in sizes]
        if ks == sizes:
            return token_map, ks, layout.num_tokens
        newlines = newline_tokens(layout).numel() if self.keep_newlines else 0
        return token_map, ks, sum(ks) + newlines

    def select(self, batch: VisionBatch) -> list[torch.Tensor]:
        """1. text targets per prompt; 2. units (images / crops) with their post- and
        pre-projector features; 3. coverage rows per unit; 4. greedy, batched over units of
        equal (N, k); 5. kept indices of each image, sorted."""
        if batch.budget is None or len(batch.positions) != len(batch.layouts):
            raise RuntimeError("mmtok needs the batch's `budget` and image `positions`")
        text, text_mask = self._text_targets(batch)
        pre = _pre_features(batch)
        kept: list[list[torch.Tensor]] = [[] for _ in batch.layouts]
        groups: dict[tuple[int, int], list[_Unit]] = {}
        for i, layout in enumerate(batch.layouts):
            device = batch.features[i].device
            token_map, ks, total = self._plan(layout, batch.budget)
            sizes = (token_map >= 0).sum(1).tolist()
            token_map = token_map.to(device)
            if total == layout.num_tokens:
                kept[i].append(torch.arange(total, device=device))
                continue
            if self.keep_newlines:
                kept[i].append(newline_tokens(layout).to(device))
            for u, (k, size) in enumerate(zip(ks, sizes)):
                if k == size:
                    kept[i].append(token_map[u][token_map[u] >= 0])
                elif k > 0:
                    unit = _Unit(i, pre[i][u], token_map[u])
                    groups.setdefault((token_map.shape[1], k), []).append(unit)
        for (_, k), units in groups.items():
            tokens = self._greedy(batch, text, text_mask, units, k)
            for unit, row in zip(units, tokens):
                kept[unit.image].append(row)
        return [torch.cat(parts).sort().values for parts in kept]

    def _greedy(
        self,
        batch: VisionBatch,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        units: list[_Unit],
        k: int,
    ) -> torch.Tensor:
        """(G, k) kept token indices of G units of equal size, each sorted."""
        token_map = _stacked([unit.tokens for unit in units])
        valid = token_map >= 0
        post = _stacked([_rows(batch.features[u.image], u.tokens) for u in units])
        rows = [batch.sample[u.image] for u in units]
        cover = coverage_matrix(
            _stacked([text[r] for r in rows]), _stacked([text_mask[r] for r in rows]), post,
            _stacked([u.pre for u in units]), valid, tv_temperature=self.tv_temperature,
            vv_temperature=self.vv_temperature, alpha=self.alpha,
        )
        picks = greedy_coverage(cover, k, valid)
        return token_map.gather(1, picks.sort(1).values)

    def _text_targets(self, batch: VisionBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, M, D) text-target embeddings of each prompt, left-packed, and their (B, M) mask."""
        ids = batch.input_ids
        mask = batch.attention_mask
        shape = batch.text_embeds.shape[:2]
        is_text = mask.bool() if mask is not None else torch.ones(
            shape, dtype=torch.bool, device=batch.text_embeds.device)
        is_text = is_text.clone()
        rows = torch.cat([torch.full_like(p, s) for s, p in zip(batch.sample, batch.positions)])
        is_text[rows, torch.cat(batch.positions)] = False
        targets = is_text
        if self.stopwords:
            if ids is None:
                raise ValueError(
                    "mmtok's `stopwords` are token ids: they need the prompt's `input_ids`, not "
                    "`inputs_embeds` (patch without `stopwords` to use every text token)"
                )
            targets = is_text & ~stopword_mask(ids, self.stopwords)
            empty = ~targets.any(1, keepdim=True)
            targets = torch.where(empty, is_text, targets)
        count = int(targets.sum(1).max())
        order = targets.char().argsort(dim=1, descending=True, stable=True)[:, :count]
        return gather_rows(batch.text_embeds, order), targets.gather(1, order)


def _stacked(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack(tensors)``; a view of the only one (no copy) for a single tensor."""
    return tensors[0][None] if len(tensors) == 1 else torch.stack(tensors)


def _rows(features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(N, D) rows ``tokens`` of ``features`` (-1: any row, a non-candidate): a view when they
    are consecutive (an image or a thumbnail), a copy otherwise (unpadded crops)."""
    first = int(tokens[0])
    if first >= 0 and bool((tokens.diff() == 1).all()):
        return features[first:first + tokens.numel()]
    return features[tokens.clamp(min=0)]


def _pre_features(batch: VisionBatch) -> list[torch.Tensor]:
    """Per image (U, N, D') pre-projector features of its units (crops), in token order.

    LLaVA / LLaVA-NeXT: the projector input, (side², D') per crop (a CLS prefix, ``full``
    strategy, is dropped: it is no candidate). Qwen: the merger input averaged over the patches
    of each merged token, put in raster order with the adapter's patch → token map.
    """
    value = batch.probes["vision"].value
    if value is None:
        raise RuntimeError("mmtok: the projector did not run in this forward")
    if "patches" in batch.probes:
        token_of_patch = batch.probes["patches"].token_of_patch().to(value.device)
        total = sum(layout.num_tokens for layout in batch.layouts)
        if token_of_patch.shape[0] != value.shape[0] or int(token_of_patch.max()) + 1 != total:
            raise RuntimeError(
                f"mmtok: the merger saw {value.shape[0]} patches, the prompt has {total} image "
                "tokens (images only: videos are not supported)"
            )
        sums = value.new_zeros(total, value.shape[1], dtype=torch.float32)
        sums.index_add_(0, token_of_patch, value.float())
        means = sums / torch.bincount(token_of_patch, minlength=total)[:, None]
        return [x[None] for x in means.split([layout.num_tokens for layout in batch.layouts])]
    crops = [len(partition_tokens(layout)) for layout in batch.layouts]
    layout = batch.layouts[0]
    if value.dim() != 3 or value.shape[0] != sum(crops) or (
        value.shape[1] != layout.prefix + layout.grid[0] * layout.grid[1]
    ):
        raise RuntimeError(
            f"mmtok: projector input {tuple(value.shape)} does not match {sum(crops)} crops of "
            f"{layout.prefix} + {layout.grid[0]}×{layout.grid[1]} tokens"
        )
    return [x[:, layout.prefix:] for x, layout in zip(value.split(crops), batch.layouts)]

