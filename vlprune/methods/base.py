"""The method interface: a registered class that turns captured signals into kept indices.

Methods are pure: they see tensors (features, attention rows, layouts) and return sorted, unique
``LongTensor`` indices. They never touch the model; hooks apply their decision.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from vlprune.adapters.base import Adapter, ImageLayout
from vlprune.budget import Budget
from vlprune.kernels import select_topk
from vlprune.options import Option, check_options, declare


@dataclass
class VisionBatch:
    """What a vision-stage method sees in one prefill; lists are per image, in prompt order.

    - ``layouts[i]``: token layout of image i (grid, crops, newlines).
    - ``keep[i]``: how many of its tokens image i keeps (from the method's :meth:`Method.budgets`).
    - ``features[i]``: (N_i, D) image embeddings after the projector / merger.
    - ``sample[i]``: batch row that holds image i; ``input_ids``: (B, L) the prompt, None when
      it came as ``inputs_embeds`` (image positions from the placeholder embeddings).
    - ``signals``: what the method's :meth:`Method.signals` asked for, keyed by name.
    - ``text_embeds``: (B, L, D) input embeddings of the prompt (image rows included).
    - ``probes``: the probes of :meth:`Method.probes`, after the vision encoder ran (e.g.
      ``probes["cls"].rows(queries)`` of a vision attention probe).
    - ``positions[i]``: (N_i,) sequence positions of image i's tokens in row ``sample[i]``.
    - ``budget``: the patch's budget, for methods whose units are finer than an image (crops).
    - ``encoder_units[i]``: methods with an encoder stage only: per vision sequence of image i
      (its CLIP crops, or Qwen frames), the unit ids (see :class:`EncoderBatch`) that survived
      the encoder cut; only their tokens carry image features, the others must be dropped.
    - ``attention_mask``: (B, L) the prompt's 2-D padding mask (0 on padding), None without
      padding.
    """

    layouts: list[ImageLayout]
    keep: list[int]
    features: list[torch.Tensor]
    sample: list[int]
    input_ids: torch.Tensor | None
    text_embeds: torch.Tensor
    probes: dict[str, Any]
    positions: list[torch.Tensor] = field(default_factory=list)
    budget: Budget | None = None
    encoder_units: list[list[torch.Tensor]] | None = None
    attention_mask: torch.Tensor | None = None


@dataclass
class DecoderBatch:
    """What a decoder-stage method sees at cut layer ``layer`` of one prefill.

    - ``hidden``: (B, L, D) input of the layer; ``is_image``: (B, L) bool, visual rows;
    - ``probes``: the probes of :meth:`Method.probes`; a text attention probe at an earlier
      layer gives ``probes[name].rows(queries)`` → (B, H, Q, L) over the current rows.
    - ``index``: (B, L) positions of the current rows in the language model's input;
      ``layer_index[l]``: the rows (same positions) that entered layer ``l``, for every earlier
      layer at or after the first cut (layers before it saw every row); ``layer_valid[l]``:
      which of those rows were real (not batch padding, not padding slots).
    - ``valid``: (B, L) bool, False on batch padding (left or right) and padding slots;
      ``input_valid``: (B, L0) the same for the language model's input rows; ``input_visual``:
      (B,) visual rows per sample in the language model's input (before any decoder cut).
    - ``image_tokens[b]``: placeholders of each image of sample b in the prompt (before any
      cut), for per-image budgets; empty when the vision-side cut did not run.
    """

    layer: int
    hidden: torch.Tensor
    is_image: torch.Tensor
    probes: dict[str, Any]
    index: torch.Tensor | None = None
    layer_index: dict[int, torch.Tensor] = field(default_factory=dict)
    valid: torch.Tensor | None = None
    input_visual: torch.Tensor | None = None
    image_tokens: list[list[int]] = field(default_factory=list)
    layer_valid: dict[int, torch.Tensor] = field(default_factory=dict)
    input_valid: torch.Tensor | None = None


@dataclass
class EncoderBatch:
    """What an encoder-stage method sees after vision-encoder layer ``layer`` ran, in one image
    forward; its answer drops rows of that layer's output (see ``vlprune.hooks.encoder``).

    The encoder runs sequences: one per CLIP crop (batched rows, ``prefix`` = 1 CLS row first)
    or one per Qwen frame (packed rows, ``group`` rows per merged token). A *unit* is what can
    be dropped: a CLIP patch (one row) or a Qwen merge group (``group`` rows, never split).

    - ``units[s]``: (n_s,) ids of sequence s's current units, in row order; a unit's id is its
      raster position in the sequence's grid (CLIP patch; Qwen merged token of the frame).
    - ``sizes[s]``: units of sequence s before any cut; ``image[s]``: its image (prompt order);
      ``layouts[i]``: the token layout of image i in the language model's input.
    - ``packed``: rows of all sequences are concatenated (Qwen); else stacked (CLIP), and every
      sequence must keep the same count. ``bounds``: packed only, the current cumulative row
      boundaries of the sequences (for ``VisionQKV.qkv(bounds)``).
    - ``output_layer``: last layer whose output reaches the projector; ``hidden``: the output
      of ``layer`` (batched (n_seq, prefix + n, D) or packed (S, D)).
    - ``memory``: scratch space, emptied when a new image forward starts (e.g. running scores).
    """

    layer: int
    output_layer: int
    hidden: torch.Tensor
    units: list[torch.Tensor]
    sizes: list[int]
    image: list[int]
    layouts: list[ImageLayout]
    packed: bool
    bounds: list[int] | None
    prefix: int
    group: int
    probes: dict[str, Any]
    memory: dict[str, Any]


def keep_rows(
    scores: torch.Tensor, is_image: torch.Tensor, keep_visual: int | Sequence[int]
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Kept rows: every text row and the ``keep_visual`` best-scored visual rows of each row.

    ``scores`` (B, L) ranks the visual rows (higher = kept, ties: lower index);
    ``keep_visual`` is one count for every row or one per row (capped at the row's visual
    count). Each row keeps exactly its count, so a batch equals its rows run alone; rows that
    keep different numbers are left-padded (see :func:`keep_rows_padded`).
    """
    n_visual = is_image.sum(1)
    wanted = torch.as_tensor(keep_visual, device=is_image.device).expand_as(n_visual)
    counts = torch.minimum(wanted, n_visual)
    chosen = torch.zeros_like(is_image)
    most = int(counts.max())
    if most > 0:
        ranked = scores.float().masked_fill(~is_image, float("-inf"))
        top = select_topk(ranked, most, keep_order=False)
        take = torch.arange(most, device=top.device) < counts[:, None]
        chosen.scatter_(1, top, take)
    return keep_rows_padded(~is_image | chosen)


def keep_rows_padded(keep: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Kept rows of a (B, L) bool ``keep`` whose rows may keep different counts.

    Returns the sorted (B, Lnext) indices when every row keeps the same count, else
    ``(index, slots)``: each row's kept indices left-padded to the largest count, and a
    (B, Lnext) bool that is False on the padding slots (the decoder cut masks them out).
    """
    counts = keep.sum(1)
    width = int(counts.max())
    positions = torch.arange(keep.shape[1], device=keep.device).expand_as(keep)
    ordered = torch.where(keep, positions, -1).sort(dim=1).values[:, keep.shape[1] - width:]
    if bool((counts == width).all()):
        return ordered
    return ordered.clamp(min=0), ordered >= 0


def last_rows(is_image: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """(B, 1) index of each sample's last real row (its last prompt token, wherever the
    padding is) among rows flagged ``is_image`` (B, L); ``valid`` (B, L) is False on padding
    (None: no padding, the last row)."""
    batch, length = is_image.shape
    positions = torch.arange(length, device=is_image.device)
    if valid is None:
        return positions[-1:].expand(batch, 1)
    return torch.where(valid, positions, -1).amax(1, keepdim=True).clamp(min=0)


def trailing_text(
    is_image: torch.Tensor, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The real rows after each sample's last visual row (the instruction and answer prefix).

    Returns ``queries`` (B, Q), the last Q row indices of the sequence, with Q the largest count
    of rows after a sample's last visual row, and ``mask`` (B, Q) bool, True where the row
    follows the sample's last visual row and is real (``valid`` (B, L): False on padding, e.g.
    right padding). A sample without visual rows has an all-False mask.
    """
    length = is_image.shape[1]
    positions = torch.arange(length, device=is_image.device)
    last = torch.where(is_image, positions, -1).amax(1)
    has_image = is_image.any(1)
    n_text = torch.where(has_image, length - 1 - last, 0)
    width = max(int(n_text.max()), 1)
    queries = positions[length - width:].expand(is_image.shape[0], width)
    mask = (queries > last[:, None]) & has_image[:, None]
    if valid is not None:
        mask &= valid.gather(1, queries)
    return queries, mask


class Method:
    """Base class of pruning methods; subclasses register with ``@register_method(name)``.

    Class attributes: ``stage`` ("vision", "decoder" or "vision+decoder"), ``scope`` (what one
    unit of ``budget`` counts: "image" or "request"), ``paper`` and ``repo`` (citations),
    ``families`` (supported adapter families, ``None`` = all) and ``options`` (name →
    :class:`~vlprune.options.Option`: default, allowed values, meaning), the one declaration
    of the keyword options that :meth:`__init__` checks and stores as attributes.
    """

    name: ClassVar[str] = ""
    stage: ClassVar[str] = "vision"
    scope: ClassVar[str] = "image"
    paper: ClassVar[str] = ""
    repo: ClassVar[str] = ""
    internal: ClassVar[bool] = False
    families: ClassVar[tuple[str, ...] | None] = None
    options: ClassVar[Mapping[str, Option]] = declare()

    def __init__(self, **options: Any) -> None:
        """Store every declared option as an attribute: the given value, checked, or the
        default; ``ValueError`` naming an unknown option or a value outside its allowed ones."""
        name = self.name or type(self).__name__
        for option, value in check_options(name, self.options, options).items():
            setattr(self, option, value)

    def check_model(self, adapter: Adapter) -> None:
        """Raise at patch time if this method cannot run on ``adapter``'s model: ``TypeError``
        for a family it does not support, ``ValueError`` for options the model cannot honour."""
        if self.families is not None and adapter.family not in self.families:
            raise TypeError(
                f"method {self.name!r} supports {', '.join(self.families)}; "
                f"got a {adapter.family} model"
            )

    def budgets(self, layouts: list[ImageLayout], budget: Budget) -> list[int]:
        """Kept tokens per image; default: the budget applies to each image on its own."""
        return [budget.kept(layout.num_tokens) for layout in layouts]

    def select(self, batch: VisionBatch) -> list[torch.Tensor]:
        """Kept token indices per image: sorted, unique ``LongTensor (keep[i],)``."""
        raise NotImplementedError(f"{type(self).__name__} has no vision stage")

    def probes(self, adapter: Adapter) -> dict[str, Any]:
        """Signals to capture during the forward, by name: probes made by the adapter
        (``adapter.vision_probe(l)``, ``adapter.text_probe(l)``, ``adapter.projector_probe()``).
        The handle installs them and clears them after each language-model forward."""
        return {}

    def cut_layers(self, n_layers: int) -> list[int]:
        """Decoder layers at whose input the decoder stage drops rows (decoder methods)."""
        return []

    def encoder_layers(self, output_layer: int) -> list[int]:
        """Vision-encoder layers (≤ ``output_layer``) after which :meth:`encoder_choose` may
        drop rows; a non-empty list installs the encoder cut (``vlprune.hooks.encoder``)."""
        return []

    def check_encoder_layouts(self, layouts: list[ImageLayout]) -> None:
        """Raise before any vision-encoder layer runs if the encoder stage cannot prune images
        of these layouts (default: it can)."""

    def encoder_choose(self, batch: EncoderBatch, budget: Budget) -> list[torch.Tensor] | None:
        """Per sequence, sorted local positions (into ``batch.units[s]``) of the units that stay,
        or None to keep everything after this layer."""
        raise NotImplementedError(f"{type(self).__name__} has no encoder stage")

    def choose(
        self, ctx: DecoderBatch, budget: Budget
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None:
        """Rows kept at cut layer ``ctx.layer``: sorted (B, Lnext) indices into the current rows,
        or ``(index, slots)`` when rows keep different counts (:func:`keep_rows_padded`)."""
        raise NotImplementedError(f"{type(self).__name__} has no decoder stage")

    def settings(self) -> dict[str, Any]:
        """The method's effective options, for ``handle.stats``."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}
