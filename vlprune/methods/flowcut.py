"""``flowcut``: FlowCut (Tong et al., NeurIPS 2025), pruning by information flow in the ViT.

"FlowCut: Rethinking Redundancy via Information Flow for Efficient Vision-Language Models", arXiv
2505.19536; official code https://github.com/TungChintao/FlowCut (HEAD ``a2ecd247``, last code
change ``fc5d7a1``). Reference: ``docs/methods/flowcut.md``.

Vision encoder (``docs/methods/flowcut.md#algorithm``): after each layer ℓ, while a sequence
(a CLIP crop / a Qwen frame) holds more units than its target T:

1. relevance: CLIP: the CLS row's attention ``a_j = mean_h A_h[CLS, j]``; Qwen (no CLS): the
   attention of the mean ("global") query, ``mean_h softmax_j(mean_i q_hi · k_hj / √d)``;
2. CLIP only, semantic term: ``sem_j = mean_h softmax_j(v_h,CLS · v_hj)`` (no scaling, CLS in
   the softmax);
3. information density ``‖mean_h v_hj‖₁``;
4. score: CLIP ``(a/Σa + sem/Σsem) · density``; Qwen ``attention · density`` (per patch, then
   the mean over each 2×2 merge group);
5. running score: ``C ← S`` at the first scored layer, then ``C ← h·C + (1-h)·S`` (``history``
   h = 0.5);
6. prune when ``r = R - ℓ - 1`` is a multiple of ``stride`` (2): ``R`` is the feature layer
   for CLIP (official ``len(layers) - 2``: the last cut is one layer before it) and the depth
   for Qwen (the last block is cut). ``r > 0``: drop
   ``P = round((n - T) / √r · (1 - ρ²))`` units, ``ρ = H(p) / ln(#p)`` the normalised entropy of
   the relevance distribution p (CLS attention over patches; Qwen: global-query attention over
   patches, ``ln(p + 1e-7)``); CLIP crops take the largest P of the forward. ``r = 0``: cut to T.
   Keep the ``max(n - P, T)`` best units by C, in their original order; CLS always stays.

Targets per image of budget B: LLaVA-1.5 keeps B in the encoder, the language model sees exactly
B. LLaVA-NeXT keeps ``B // 2`` patches per crop (thumbnail and every crop; official
``int(target_num / 2)``), Qwen keeps 2·B merged tokens (official ``8 · target_num`` patches);
then, language model, after decoder layer ``llm_layer`` (1):

7. for the last prompt token t (the last real row, after any right padding):
   ``rel_j = mean_h softmax_{j∈V}(q_t · k_j / √d)`` and
   ``sem_j = mean_h softmax_{j∈V}(v_t · v_j / √d)``, both over visual keys only (after RoPE);
8. keep the top-B visual tokens by ``(rel + sem) · ‖mean_h v_j‖₁``; layers > ``llm_layer`` and
   their caches hold B visual tokens per image (one-shot, no running score).

Scope: per image (``budget`` tokens of each image reach the language model; ``ratio`` of each
image's tokens). The language-model step ranks all visual tokens of a sample together and keeps
the sum of its images' budgets (official: one image per sample). With ``ratio``, the CLIP crops
of one forward share the largest crop target (stacked crops keep equal counts).

Official behaviour reproduced: the CLIP semantic softmax without scaling and with CLS; density
from head-averaged per-head values; scoring at every layer while above target; the parity
schedule and adaptive count; the forced last cut; the max count over a batch of crops; no
semantic term on Qwen; the LLM step's visual-only softmaxes; LLaVA-NeXT newline tokens dropped
(multi-crop images), thumbnail then high-res tokens in raster order.

Fixed / extended (official code is batch-1;
``docs/methods/flowcut.md#differences-from-the-official-code``): kept tokens keep their original
positions (1-D and M-RoPE); the official LLaVA code renumbers positions contiguously, after the
vision-side splice and after the LLM step (``vlprune.patch(..., positions="renumber")``), and
FlowCut-Qwen gives kept image tokens the first K grid positions (not offered: an approximation).
Qwen: the global query attends within each image (the official flattens all images together) and
whole 2×2 merge groups are dropped (the official drops single patches, so its merger
concatenates four unrelated survivors); the count formula runs in merge groups. Qwen2.5-VL (no
official code) is handled in window order with remapped window boundaries. Encoders without CLS
(Qwen, LLaVA-OneVision's SigLIP) take the Qwen rules: global query, no semantic term, cut
through the last layer. Qwen3-VL: a unit cut in the ViT also leaves every later DeepStack
feature (zeros, never reaching the LLM). LLaVA-OneVision canvases downsampled by ``anyres_max``
raise ``NotImplementedError`` (a token mixes several cut-or-kept patches). Any batch size, left
padding, sdpa and eager. An image nothing was pruned from keeps every token (newlines included),
so a budget above every image's size equals the unpatched model.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import torch

from vlprune.adapters.base import Adapter, ImageLayout
from vlprune.budget import Budget
from vlprune.hooks.signals import TextQKV, VisionQKV, masked_softmax
from vlprune.kernels import select_topk
from vlprune.methods._vision_common import partition_tokens
from vlprune.methods.base import (
    DecoderBatch,
    EncoderBatch,
    Method,
    VisionBatch,
    keep_rows_padded,
    last_rows,
)
from vlprune.options import FloatOption, IntOption, declare
from vlprune.registry import register_method

QWEN_ENTROPY_EPS = 1e-7
"""The Qwen code's ``ln(attn + 1e-7)``; the CLIP code takes ``ln p`` as is."""


def prune_count(n: int, target: int, remaining: int, relevance: torch.Tensor, eps: float) -> int:
    """Units to drop at a prune layer (official ``adaptive_prune_ratio``).

    ``remaining`` = 0 forces the cut to ``target`` (returns ``n``). Otherwise
    ``round((n - target) / √remaining · (1 - ρ²))`` with ``ρ = H(p) / ln(#p)``, ``p`` the
    relevance distribution (``relevance`` normalised, natural log, ``ln(p + eps)``).
    """
    if remaining == 0:
        return n
    p = relevance.float() / relevance.float().sum()
    log_p = (p + eps).log() if eps else p.log()
    entropy = -torch.nan_to_num(p * log_p).sum()
    rho = float(entropy) / math.log(p.numel()) if p.numel() > 1 else 1.0
    return round((n - target) / math.sqrt(remaining) * (1.0 - rho**2))


def clip_scores(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlowCut scores of one CLIP crop from its q (H, 1 + n, d), k and v (H, 1 + n + c, d): CLS
    first, then the patches, then any context rows (timm register tokens: in both softmaxes,
    never scored).

    Returns the (n,) patch scores ``(a/Σa + sem/Σsem) · ‖mean_h v‖₁`` and the (n,) CLS
    attention ``a`` over the patches (head mean, softmax over all rows).
    """
    rows = q.shape[1]
    cls, k, v = q[:, :1].float(), k.float(), v.float()
    attention = ((cls @ k.transpose(1, 2)) * scale).softmax(-1).mean(0)[0, 1:rows]
    semantic = (v[:, :1] @ v.transpose(1, 2)).softmax(-1).mean(0)[0, 1:rows]
    density = v[:, 1:rows].mean(0).abs().sum(-1)
    score = (attention / attention.sum() + semantic / semantic.sum()) * density
    return score, attention


def global_query_scores(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, group: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlowCut-Qwen scores of one frame from its q (H, R, d), k and v (H, R + c, d) (R = group ·
    n rows, then any context rows: timm register tokens, in the softmax, never scored).

    Returns the (n,) merge-group scores (mean over the group's rows of
    ``attention · ‖mean_h v‖₁``) and the (R,) global-query attention (head mean).
    """
    n_rows = q.shape[1]
    query = q.mean(dim=1, keepdim=True, dtype=torch.float32)
    k, v = k.float(), v.float()
    attention = ((query @ k.transpose(1, 2)) * scale).softmax(-1).mean(0)[0, :n_rows]
    rows = attention * v[:, :n_rows].mean(0).abs().sum(-1)
    return rows.view(-1, group).mean(1), attention


def llm_scores(logits: torch.Tensor, values: torch.Tensor, is_image: torch.Tensor,
               scale: float) -> torch.Tensor:
    """(B, L) LLM-step scores ``(rel + sem) · ‖mean_h v‖₁`` of the visual rows.

    ``logits`` (B, H, L): the last prompt token's ``q·kᵀ/√d``; ``values`` (B, H_kv, L, d);
    both softmaxes run over the visual rows ``is_image`` (B, L) only.
    """
    visual = is_image[:, None, :]
    relevance = masked_softmax(logits, visual).mean(1)
    values = values.float()
    semantic = (values @ values[:, :, -1:].transpose(2, 3))[..., 0] * scale
    semantic = masked_softmax(semantic, visual).mean(1)
    return (relevance + semantic) * values.mean(1).abs().sum(-1)


@register_method("flowcut")
class FlowCut(Method):
    """Progressive, entropy-paced pruning inside the vision encoder; a one-shot LLM step on
    LLaVA-NeXT and Qwen (see the module docstring). Scope: per image.

    Options (``docs/methods/flowcut.md#options-and-official-defaults``): ``llm_layer`` = 1, the
    decoder layer whose attention scores the LLM step and whose output is cut; ``history`` = 0.5,
    weight of the running score (paper Table 10); ``stride`` = 2, layers between encoder prune steps
    (paper Table 11).
    """

    stage = "vision+decoder"
    scope = "image"
    paper = "FlowCut, NeurIPS 2025 (arXiv 2505.19536)"
    repo = "https://github.com/TungChintao/FlowCut"
    options = declare(
        llm_layer=IntOption(1, "decoder layer whose attention scores the LLM step and whose "
                            "output is cut (checked on every model; unused on LLaVA-1.5, "
                            "whose encoder cut reaches the budget)", minimum=0),
        history=FloatOption(0.5, "weight of the running score carried between encoder "
                            "layers", low=0, high=1, high_open=True),
        stride=IntOption(2, "encoder layers between two prune steps", minimum=1),
    )

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._llm_step = True

    def check_model(self, adapter: Adapter) -> None:
        """LLaVA-1.5's encoder already reaches the budget: no LLM step there, nor on a timm ViT
        (one sequence per image, no language model)."""
        super().check_model(adapter)
        self._llm_step = adapter.family not in ("llava", "timm")
        if adapter.family == "timm":
            return
        n_layers = len(adapter.decoder_layers)
        if self.llm_layer + 1 >= n_layers:
            raise ValueError(
                f"`llm_layer`={self.llm_layer} leaves no later layer to cut in a "
                f"{n_layers}-layer language model"
            )

    def probes(self, adapter: Adapter) -> dict[str, Any]:
        """q, k, v of every encoder layer up to the feature layer; the LLM step's layer."""
        probes: dict[str, Any] = {
            f"vision{layer}": VisionQKV(adapter.vision_probe(layer))
            for layer in range(adapter.vision_output_layer + 1)
        }
        if self._llm_step:
            probes["llm"] = TextQKV(adapter.text_probe(self.llm_layer))
        return probes

    # ----------------------------------------------------------------- vision encoder

    def encoder_layers(self, output_layer: int) -> list[int]:
        """Every layer up to the feature layer: each may score (running score) or cut."""
        return list(range(output_layer + 1))

    def encoder_targets(self, batch: EncoderBatch, budget: Budget) -> list[int]:
        """Units each sequence keeps: B (one CLIP sequence per image), ``B // 2`` per crop
        (LLaVA-NeXT), ``⌈2·B / frames⌉`` (Qwen); at least 1. Stacked crops share the largest."""
        per_image = Counter(batch.image)
        targets = []
        for image, size in zip(batch.image, batch.sizes):
            layout = batch.layouts[image]
            kept = budget.kept(layout.num_tokens)
            if batch.packed:
                target = math.ceil(2 * kept / layout.frames)
            elif per_image[image] > 1:
                target = kept // 2
            else:
                target = kept - layout.prefix
            targets.append(min(max(target, 1), size))
        return targets if batch.packed else [max(targets)] * len(targets)

    def check_encoder_layouts(self, layouts: list[ImageLayout]) -> None:
        """``NotImplementedError`` for a LLaVA-OneVision canvas downsampled by ``anyres_max``."""
        if any(layout.highres_source is not None for layout in layouts):
            raise NotImplementedError(
                "flowcut cannot prune inside the vision encoder when LLaVA-OneVision downsamples "
                "the AnyRes canvas (`vision_aspect_ratio` anyres_max): each token mixes several "
                "crop patches; use a smaller image or another method"
            )

    def encoder_choose(self, batch: EncoderBatch, budget: Budget) -> list[torch.Tensor] | None:
        """Steps 1–6 after encoder layer ``batch.layer``."""
        horizon = batch.output_layer + (0 if batch.prefix else 1)
        remaining = horizon - batch.layer - 1
        targets = self.encoder_targets(batch, budget)
        active = [u.numel() > t for u, t in zip(batch.units, targets)]
        qkv = batch.probes[f"vision{batch.layer}"]
        if remaining < 0 or not any(active):
            qkv.clear()
            return None
        sequences = qkv.qkv(batch.bounds) if batch.packed else qkv.qkv()
        qkv.clear()  # the layer's inputs are not needed any more
        running = batch.memory.setdefault("running", [None] * len(batch.units))
        relevance: list[torch.Tensor | None] = [None] * len(batch.units)
        for s, (q, k, v) in enumerate(sequences):
            if not active[s]:
                continue
            if batch.prefix:
                score, relevance[s] = clip_scores(q, k, v, qkv.scale)
            else:
                score, relevance[s] = global_query_scores(q, k, v, qkv.scale, batch.group)
            previous = running[s]
            running[s] = score if previous is None else (
                self.history * previous + (1.0 - self.history) * score
            )
        if remaining % self.stride:
            return None
        kept = self._kept_counts(batch, targets, active, relevance, remaining)
        local = []
        for s, (units, k) in enumerate(zip(batch.units, kept)):
            n = units.numel()
            idx = select_topk(running[s], k) if k < n else torch.arange(n, device=units.device)
            if running[s] is not None:
                running[s] = running[s][idx]
            local.append(idx)
        return local

    def _kept_counts(self, batch: EncoderBatch, targets: list[int], active: list[bool],
                     relevance: list[torch.Tensor | None], remaining: int) -> list[int]:
        eps = 0.0 if batch.prefix else QWEN_ENTROPY_EPS
        counts = [u.numel() for u in batch.units]
        drops = [
            prune_count(n, t, remaining, rel, eps) if on else 0
            for n, t, on, rel in zip(counts, targets, active, relevance)
        ]
        if not batch.packed:
            drops = [max(drops)] * len(drops)
        return [
            max(n - d, t) if on else n for n, t, d, on in zip(counts, targets, drops, active)
        ]

    # ----------------------------------------------------------------- vision-side cut

    def select(self, batch: VisionBatch) -> list[torch.Tensor]:
        """Per image, the tokens of the units that survived the encoder (thumbnail, then the
        unpadded high-res canvas; newlines dropped); an image that lost nothing keeps all."""
        if batch.encoder_units is None:
            raise RuntimeError("flowcut's vision stage needs the encoder cut's record")
        kept = []
        for layout, units in zip(batch.layouts, batch.encoder_units):
            device = units[0].device
            cells = layout.grid[0] * layout.grid[1]
            if sum(u.numel() for u in units) == cells * len(units):
                kept.append(torch.arange(layout.num_tokens, device=device))
                continue
            parts = partition_tokens(layout, device)
            tokens = [
                parts[s][u] if layout.crop_grid else parts[0][u] + s * cells
                for s, u in enumerate(units)
            ]
            tokens.append(torch.arange(layout.prefix, device=device))
            flat = torch.cat(tokens)
            kept.append(flat[flat >= 0].sort().values)
        return kept

    # ----------------------------------------------------------------- language model

    def cut_layers(self, n_layers: int) -> list[int]:
        """The layer after ``llm_layer`` (none on LLaVA-1.5)."""
        return [self.llm_layer + 1] if self._llm_step else []

    def choose(
        self, ctx: DecoderBatch, budget: Budget
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None:
        """Steps 7–8: each sample keeps its images' budgets of visual tokens."""
        is_image = ctx.is_image
        n_visual = is_image.sum(1).tolist()
        if ctx.image_tokens:
            targets = [sum(budget.kept(n) for n in row) for row in ctx.image_tokens]
        else:
            targets = [budget.kept(n) for n in n_visual]
        if all(n <= t for n, t in zip(n_visual, targets)):
            return None
        batch = is_image.shape[0]
        llm = ctx.probes["llm"]
        last = last_rows(is_image, ctx.valid)
        scores = llm_scores(llm.logits(last)[:, :, 0], llm.values(), is_image, llm.scale)
        keep = ~is_image
        for b in range(batch):
            k = min(targets[b], n_visual[b])
            if k:
                keep[b, select_topk(scores[b], k, mask=is_image[b])] = True
        return keep_rows_padded(keep)
