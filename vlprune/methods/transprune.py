"""``transprune``: TransPrune, progressive pruning inside the LLM by token transitions.

"TransPrune: Token Transition Pruning for Efficient Large Vision-Language Model", CVPR 2026,
arXiv 2507.20630; official code https://github.com/liaolea/TransPrune (HEAD c9e8284f, model code
f4cb73b). Reference: ``docs/methods/transprune.md``.

At every cut layer c of the schedule, over the sample's visual rows still alive
(``docs/methods/transprune.md#algorithm``):

1. TTV: for every layer l of the accumulation range A that ran before c and each of its
   sub-modules F (attention, MLP): ``m = ‖y‖ / ‖x‖`` and ``w = softmax(1 − cos(x, y))`` over
   the sample's tokens at layer l, where x is F's input (after its RMSNorm) and y its output
   (before the residual); ``TTV_l = Σ_F m·w``, summed over those layers (a token's history
   follows it through earlier cuts);
2. IGA: layer c's attention (its input norm, q/k, RoPE, causal mask) on its input rows *before*
   the cut, from every row after the image (the instruction) to each visual row; mean over
   heads, then over those queries;
3. ``score = α·TTV/ΣTTV + (1 − α)·IGA/ΣIGA`` (sums over the sample's visual rows, + 1e-8);
4. keep the ``K_s`` best visual rows (sorted) and every text row.

Official schedule (32-layer Vicuna-7B, LLaVA-1.5 and LLaVA-NeXT): cuts at the inputs of 0-based
layers 7, 9, 12 (after 1-based layers 7, 9, 12), keeping 87.5 %, 62.5 %, 12.5 % of the visual
tokens entering the LLM (576 → 504 → 360 → 72; TransPrune-High); A = layers 6–11.

Budget and depth rules (vlprune's; the paper compares at TFLOPs levels;
``docs/methods/transprune.md#budget-and-stage-counts``):

- ``budget`` / ``ratio`` = visual tokens kept after the *last* cut, per request (``K``, the one
  ``kept_count`` rule). ``counts="official"`` (default): stage s < last keeps
  ``max(int(N·r_s), K)``, the official code's rule, with the last stage's ratio replaced by the
  budget (``budget=64`` of 576: 504, 360, 64; ``ratio=0.125``: 504, 360, 72, the paper's
  TransPrune-High; the last stage keeps ``ceil(N·r)`` where the official ``int(N·r)`` floors,
  one token more when ``N·r`` is fractional). ``counts="proportional"``: ``K_s = N −
  floor((1 − r_s) / (1 − r_last) · (N − K))``, the dropped counts keep the official
  proportions (503, 357, 64).
- Other depths L: cut layers ``round(l · L / 32)`` clamped to 1..L−1; stages landing on one
  layer merge (the later count applies); A = layers ``c_first − 1`` … ``c_last − 1``.
- Batches: each row follows the schedule for its own visual-token count (``keep_rows``); rows
  that keep different numbers are left-padded, so a batch equals its rows run alone.

Official-code behaviour and what vlprune does:

- reproduced: direction ``1 − cos`` (the paper's Eq. 2 writes ``1 − |cos|``:
  ``direction="abs"``); ``‖y‖/‖x‖`` without epsilon; per-layer softmax over all tokens of that
  layer, so layers after a cut (fewer tokens) weigh more; TTV history re-indexed after each cut;
  IGA from the next layer's q/k on the pre-cut rows; all post-image rows as queries; + 1e-8
  normalisation; ``α = 0.5`` (the code adds both terms unweighted: same ranking).
- fixed: the TTV softmax runs per sample over its non-padding tokens (official: over the whole
  ``[batch, seq]`` tensor, padding included; identical at batch 1); GQA key heads are repeated
  for IGA (the official matmul has no ``repeat_kv``); left padding and batches work.
- positions: the official code renumbers positions contiguously after each cut (the next
  cut's IGA uses them) and shifts decode positions to match: ``vlprune.patch(...,
  positions="renumber")``; vlprune's default keeps every row's original position.

Scope: per request (all visual rows of a sample form one block, several images included).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch

from vlprune.adapters.base import Adapter
from vlprune.budget import Budget
from vlprune.hooks.signals import NextLayerAttentionProbe, TokenTransitionProbe
from vlprune.methods.base import DecoderBatch, Method, keep_rows, trailing_text
from vlprune.options import ChoiceOption, CustomOption, FloatOption, as_float, as_int, declare
from vlprune.registry import register_method

OFFICIAL_LAYERS = (7, 9, 12)
OFFICIAL_RATIOS = (0.875, 0.625, 0.125)
OFFICIAL_DEPTH = 32
DIRECTIONS = ("signed", "abs")
COUNTS = ("official", "proportional")


def stage_counts(n_visual: int, kept: int, ratios: tuple[float, ...],
                 rule: str = "official") -> list[int]:
    """Visual tokens kept after each stage, ``kept`` after the last (see the budget rule):
    ``rule`` "official" (``max(int(N·r_s), kept)``) or "proportional"."""
    if rule == "official":
        return [max(int(n_visual * r), kept) for r in ratios[:-1]] + [kept]
    dropped = n_visual - kept
    last = 1.0 - ratios[-1]
    return [n_visual - math.floor((1.0 - r) / last * dropped + 1e-6) for r in ratios]


def plan_layers(layers: tuple[int, ...] | None, depth: int) -> dict[int, int]:
    """Cut layer → stage index: ``layers`` as given, or the official ones scaled to ``depth``
    (stages that land on one layer merge, the later stage wins)."""
    if layers is None:
        layers = tuple(
            min(depth - 1, max(1, math.floor(layer * depth / OFFICIAL_DEPTH + 0.5)))
            for layer in OFFICIAL_LAYERS
        )
    bad = [layer for layer in layers if not 1 <= layer < depth]
    if bad:
        raise ValueError(f"`layers` {bad} out of range 1..{depth - 1} for a {depth}-layer LLM")
    return {layer: stage for stage, layer in enumerate(layers)}


def transition_variation(
    ratio: torch.Tensor, cos: torch.Tensor, valid: torch.Tensor, *, absolute: bool = False
) -> torch.Tensor:
    """Step 1 for one sub-module: (B, L) ``ratio · softmax(1 − cos)`` (``1 − |cos|`` when
    ``absolute``), the softmax per sample over its ``valid`` tokens; 0 elsewhere."""
    direction = 1.0 - (cos.abs() if absolute else cos)
    weights = direction.masked_fill(~valid, -torch.inf).softmax(dim=-1)
    return torch.where(valid, ratio * weights, 0.0)


def instruction_attention(attention: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Step 2: (B, L) mean over the instruction queries ``queries`` (B, Q) bool of head-mean
    attention rows ``attention`` (B, Q, L)."""
    weights = queries.float()
    return (attention * weights[:, :, None]).sum(1) / weights.sum(1).clamp(min=1)[:, None]


def transprune_score(
    ttv: torch.Tensor, iga: torch.Tensor, is_image: torch.Tensor, alpha: float
) -> torch.Tensor:
    """Step 3: (B, L) ``α·TTV/ΣTTV + (1 − α)·IGA/ΣIGA``, sums over each sample's visual rows."""
    ttv = torch.where(is_image, ttv, 0.0)
    iga = torch.where(is_image, iga, 0.0)
    ttv = ttv / (ttv.sum(1, keepdim=True) + 1e-8)
    iga = iga / (iga.sum(1, keepdim=True) + 1e-8)
    return alpha * ttv + (1.0 - alpha) * iga


def _checked_ratios(ratios: Any) -> tuple[float, ...]:
    values = tuple(map(as_float, ratios)) if isinstance(ratios, (list, tuple)) else ()
    fractions = all(r is not None and 0 < r < 1 for r in values)
    if not values or not fractions or any(b > a for a, b in itertools.pairwise(values)):
        raise ValueError(f"`ratios` must be non-increasing fractions in (0, 1), got {ratios!r}")
    return values


def _checked_layers(layers: Any) -> tuple[int, ...]:
    values = tuple(map(as_int, layers)) if isinstance(layers, (list, tuple)) else ()
    ints = all(x is not None for x in values)
    if not values or not ints or any(b <= a for a, b in itertools.pairwise(values)):
        raise ValueError(f"`layers` must be increasing int layer indices, got {layers!r}")
    return values


@register_method("transprune")
class TransPrune(Method):
    """Token transition variation + instruction-guided attention, pruned in stages in the LLM.

    Scope: per request. ``budget`` / ``ratio``: visual tokens kept after the last cut
    (``ratio=0.125``: the official TransPrune-High schedule). Options
    (``docs/methods/transprune.md#options-and-official-defaults``): ``layers``
    0-based cut layers, one per stage (None: official 7, 9, 12 scaled to the depth);
    ``ratios`` kept fraction after each stage, whose shape the budget rescales (official
    0.875, 0.625, 0.125); ``counts`` "official" (``int(N·r_s)`` before the last stage) or
    "proportional" (see the module docstring); ``direction`` "signed" (code, ``1 − cos``) or
    "abs" (paper, ``1 − |cos|``); ``alpha`` TTV weight (0.5).
    """

    stage = "decoder"
    scope = "request"
    paper = "TransPrune, CVPR 2026 (arXiv 2507.20630)"
    repo = "https://github.com/liaolea/TransPrune"
    options = declare(
        layers=CustomOption(None, "0-based decoder cut layers, one per stage; None: the "
                            "official 7, 9, 12 (of 32) scaled to the depth",
                            check_value=_checked_layers, none=True,
                            domain="increasing int layer indices"),
        ratios=CustomOption(OFFICIAL_RATIOS, "kept fraction after each stage; the budget "
                            "rescales their shape", check_value=_checked_ratios,
                            domain="non-increasing fractions in (0, 1)"),
        counts=ChoiceOption("official", "per-stage counts before the last stage: 'official' "
                            "(int(N*r_s), as the official code) or 'proportional' (the "
                            "budget rescales every stage)", choices=COUNTS),
        direction=ChoiceOption("signed", "token transition variation: 'signed' (official "
                               "code, 1 - cos) or 'abs' (paper, 1 - |cos|)",
                               choices=DIRECTIONS),
        alpha=FloatOption(0.5, "weight of the token transition variation against the "
                          "instruction-guided attention", low=0, high=1),
    )

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if self.layers is not None and len(self.layers) != len(self.ratios):
            raise ValueError(
                f"`layers` has {len(self.layers)} stages but `ratios` {len(self.ratios)}"
            )
        if self.layers is None and len(self.ratios) != len(OFFICIAL_LAYERS):
            raise ValueError("custom `ratios` with other than 3 stages need explicit `layers`")
        self._stage_at: dict[int, int] = {}

    def check_model(self, adapter: Adapter) -> None:
        """Family check, and the cut layers exist."""
        super().check_model(adapter)
        plan_layers(self.layers, len(adapter.decoder_layers))

    def cut_layers(self, n_layers: int) -> list[int]:
        """The schedule's cut layers on an ``n_layers`` LLM (recorded for :meth:`choose`)."""
        self._stage_at = plan_layers(self.layers, n_layers)
        return sorted(self._stage_at)

    def probes(self, adapter: Adapter) -> dict[str, Any]:
        """Transitions of the accumulation layers; each cut layer's attention on its input."""
        cuts = sorted(plan_layers(self.layers, len(adapter.decoder_layers)))
        adapter.check_attention_layers([*range(cuts[0] - 1, cuts[-1]), *cuts])
        layers = adapter.decoder_layers
        probes: dict[str, Any] = {
            f"ttv{layer}": TokenTransitionProbe(layers[layer])
            for layer in range(cuts[0] - 1, cuts[-1])
        }
        for cut in cuts:
            probes[f"iga{cut}"] = NextLayerAttentionProbe(layers[cut - 1], layers[cut])
        return probes

    def choose(
        self, ctx: DecoderBatch, budget: Budget
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Steps 1-4 at cut ``ctx.layer``; each row follows its own schedule."""
        visual = ctx.input_visual if ctx.input_visual is not None else ctx.is_image.sum(1)
        stage = self._stage_at[ctx.layer]
        keep = [
            stage_counts(n, budget.kept(n), self.ratios, self.counts)[stage]
            for n in visual.tolist()
        ]
        queries, is_text = trailing_text(ctx.is_image, ctx.valid)
        attention = ctx.probes[f"iga{ctx.layer}"].rows(queries).mean(dim=1)
        iga = instruction_attention(attention, is_text)
        score = transprune_score(self._accumulated_ttv(ctx), iga, ctx.is_image, self.alpha)
        return keep_rows(score, ctx.is_image, keep)

    def _accumulated_ttv(self, ctx: DecoderBatch) -> torch.Tensor:
        """Step 1: (B, L) TTV summed over the accumulation layers before ``ctx.layer``, over the
        current rows."""
        batch, length = ctx.is_image.shape
        device = ctx.hidden.device
        index = ctx.index if ctx.index is not None else torch.arange(
            length, device=device).expand(batch, length)
        total = torch.zeros(batch, length, device=device)
        layers = sorted(int(key[3:]) for key in ctx.probes if key.startswith("ttv"))
        for layer in (layer for layer in layers if layer < ctx.layer):
            terms = ctx.probes[f"ttv{layer}"].value
            rows, layer_valid = self._layer_rows(ctx, layer, terms["attn"][0].shape[1])
            ttv = sum(
                transition_variation(ratio, cos, layer_valid, absolute=self.direction == "abs")
                for ratio, cos in terms.values()
            )
            # the last match: padding slots (index 0, masked) sit left of every real row
            slots = torch.searchsorted(rows.contiguous(), index.contiguous(), right=True) - 1
            total += ttv.gather(1, slots.clamp(min=0))
        return total

    @staticmethod
    def _layer_rows(ctx: DecoderBatch, layer: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, valid) of ``layer``: LM-input positions (B, W) of the rows that entered it and
        which were real (not batch padding, not padding slots of earlier cuts)."""
        rows = ctx.layer_index.get(layer)
        if rows is not None:
            valid = ctx.layer_valid.get(layer)
            return rows, valid if valid is not None else torch.ones_like(rows, dtype=torch.bool)
        batch = ctx.is_image.shape[0]
        rows = torch.arange(width, device=ctx.hidden.device).expand(batch, width)
        valid = ctx.input_valid if ctx.input_valid is not None else ctx.valid
        if valid is None or valid.shape[1] != width:
            valid = torch.ones(batch, width, dtype=torch.bool, device=ctx.hidden.device)
        return rows, valid
