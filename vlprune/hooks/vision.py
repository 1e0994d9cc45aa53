"""The vision-side cut: drop unselected image rows before the language model.

A pre-hook on the language model. In a prefill it asks the selector which image tokens to keep
and gathers ``inputs_embeds``, the 2-D ``attention_mask`` and ``position_ids`` (original
positions, 1-D or M-RoPE; with ``positions="renumber"``, 1-D positions renumbered contiguously,
``hooks/positions.py``), and Qwen3-VL's DeepStack inputs with them (``hooks/deepstack.py``);
rows of a batch that keep different counts are left-padded (masked) to the longest row. Where
the images are comes from the call tracker (``hooks/calls.py``): ``input_ids``, or the
placeholder embeddings of ``inputs_embeds``.

What a prefill decided is a :class:`PrefillRecord`: the running forward's record (read by the
decoder cut, the loss and ``handle.stats``) and its KV cache's record. Every later forward on
that cache (decode steps, a multi-turn follow-up) narrows the full-length 2-D mask ``generate``
passes to the rows the cache holds, and the cache reports its logical length
(:func:`~vlprune.hooks.state.mark_pruned`), so ``generate`` counts positions and slices re-fed
inputs as for the unpruned prompt (renumbered prompts: the positions of later tokens move down
by the prompt's shift).

Two ``generate`` paths stay exact:

- rows repeated by ``num_beams=r`` / ``num_return_sequences=r`` (each prompt's images encoded
  once, its rows repeated r times): the selection runs on one row per prompt and is repeated
  (``hooks/images.py``);
- ``use_cache=False`` re-runs the whole sequence at every step with the image features it
  encoded once (before transformers 5.24: with the same ``pixel_values``, encoded again): a
  prefill with the same images object as the last one (pixels: in the same ``generate`` call)
  and its prompt plus new tokens keeps that prefill's rows and the new ones (no new
  selection), as a cached run.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from vlprune.adapters.base import Adapter
from vlprune.compat import CACHE_KWARG, layer_cache, output_cache
from vlprune.hooks.calls import CallTracker, Encode, ForwardInputs
from vlprune.hooks.deepstack import gather_deepstack_inputs
from vlprune.hooks.gather import gather_mask, gather_positions, gather_rows, left_packed_index
from vlprune.hooks.images import ImageTokens, kept_rows, prompt_layouts, split_images
from vlprune.hooks.positions import renumber
from vlprune.hooks.state import (
    CacheRecords,
    PatchPart,
    ThreadLocal,
    dropped_rows,
    eager_hook,
    mark_pruned,
    physical_length,
)

Selector = Callable[[ImageTokens], list[torch.Tensor]]
"""Returns, per image, the sorted local indices of the tokens it keeps."""


@dataclass
class Selection:
    """What a prefill's selector kept: tokens per image (prompt order), and per sample the
    placeholders of each of its images (``image_tokens[b]``)."""

    kept_per_image: list[int]
    image_tokens: list[list[int]]


@dataclass(eq=False)
class PrefillRecord:
    """One prefill, as the language model saw it.

    ``keep`` (B, L) bool: rows of the prompt kept; ``index`` (B, Lp): their positions, left
    padded, ``valid`` (B, Lp) False on padding slots; ``mask`` (B, Lp): the 2-D mask the
    language model got (None: none); ``is_image`` (B, Lp): image rows among them; ``input_ids``:
    the prompt (None for ``inputs_embeds``); ``selection``: what the selector did (None if it did
    not run); ``layout_inputs``: the ``image_sizes`` / ``image_grid_thw`` describing its images;
    ``first`` / ``replay``: the prefill this one replays and the tokens appended to it (uncached
    ``generate`` steps); ``decoder``: the decoder cut's state of this prefill; ``shift`` (B, 1):
    how far renumbering moved each row's last prompt token (None: original positions).
    """

    keep: torch.Tensor
    index: torch.Tensor
    valid: torch.Tensor
    mask: torch.Tensor | None
    is_image: torch.Tensor
    input_ids: torch.Tensor | None
    visual_tokens: list[int]
    selection: Selection | None = None
    encode: Encode | None = None
    layout_inputs: dict[str, Any] = field(default_factory=dict)
    first: PrefillRecord | None = None
    replay: int = 0
    decoder: Any = None
    shift: torch.Tensor | None = None

    @property
    def orig_len(self) -> int:
        """Length of the prompt before the cut."""
        return self.keep.shape[1]

    @property
    def dropped(self) -> int:
        """Prompt rows removed from the sequence."""
        return self.orig_len - self.index.shape[1]


class VisionCut(PatchPart):
    """Installs the language-model hooks; ``selector`` returns kept local indices per image.

    With ``selector=None`` nothing is cut: the records only say which language-model input rows
    are image tokens (``is_image``), which decoder-side methods need. ``positions``: "original"
    or "renumber" (``hooks/positions.py``).
    """

    current = ThreadLocal()
    """:class:`PrefillRecord` of the forward running in this thread (its prefill's record on a
    decode step); None without images or outside the base model."""
    last = ThreadLocal()
    """The last prefill's :class:`PrefillRecord` in this thread (replays excluded)."""
    decoding = ThreadLocal(False)
    """The running forward continues a KV cache (decode step, follow-up)."""
    _replayable = ThreadLocal()

    def __init__(self, adapter: Adapter, calls: CallTracker, selector: Selector | None,
                 positions: str = "original") -> None:
        self.adapter = adapter
        self.calls = calls
        self.selector = selector
        self.positions = positions
        self.records = CacheRecords("vision")

    def install(self) -> list[RemovableHandle]:
        """Register the hooks; the caller keeps the handles."""
        lm = self.adapter.language_model
        return [
            lm.register_forward_pre_hook(self._cut, with_kwargs=True),
            lm.register_forward_hook(self._register, with_kwargs=True),
        ]

    # ------------------------------------------------------------------ prefill

    @eager_hook
    def _cut(self, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        self.current = None
        inputs = self.calls.forward
        cache = layer_cache(kwargs)
        self.decoding = cache is not None and cache.get_seq_length() > 0
        if inputs is None:
            return None
        if self.decoding:
            return self._decode(args, kwargs, cache)
        if cache is not None:
            self.records.set(cache, None)
            mark_pruned(cache, 0)
        encode = self.calls.take_encode()
        embeds = kwargs.get("inputs_embeds")
        is_image = inputs.image_mask
        if embeds is None or is_image is None or is_image.shape != embeds.shape[:2] or not bool(
            is_image.any()
        ):
            _check_no_cut_lost(encode)
            self.last = None
            return None
        record = self._replay(inputs, is_image) or self._select(kwargs, inputs, is_image, encode)
        self.current = record
        if not record.replay:
            self.last = record
            self._replayable = _weak_pair(inputs.images, record)
        if record.dropped == 0 and bool(record.keep.all()):
            return None
        return args, self._gather(kwargs, record)

    def _replay(self, inputs: ForwardInputs, is_image: torch.Tensor) -> PrefillRecord | None:
        """A later step of an uncached ``generate``: the same images (``ForwardInputs.images``)
        and the last prefill's prompt plus new tokens. It keeps that prefill's rows and the new
        ones."""
        remembered = self._replayable
        if remembered is None or inputs.images is None or inputs.input_ids is None:
            return None
        images, token, first = remembered
        if images() is not inputs.images[0] or token is not inputs.images[1]:
            return None
        if first.input_ids is None:
            return None
        ids, length = inputs.input_ids, first.orig_len
        if ids.shape[0] != first.input_ids.shape[0] or ids.shape[1] <= length or not bool(
            (ids[:, :length] == first.input_ids).all()
        ):
            return None
        extra = ids.shape[1] - length
        keep = torch.cat([first.keep, first.keep.new_ones(ids.shape[0], extra)], 1)
        record = self._record(keep, is_image, inputs, None, None)
        record.first, record.replay = first, extra
        return record

    def _select(self, kwargs: dict, inputs: ForwardInputs, is_image: torch.Tensor,
                encode: Encode | None) -> PrefillRecord:
        """Ask the selector (one row per prompt when ``generate`` repeated rows)."""
        if self.selector is None:
            return self._record(torch.ones_like(is_image), is_image, inputs, None, encode)
        rows = inputs.input_ids if inputs.input_ids is not None else inputs.embeds
        repeat, layouts = prompt_layouts(
            self.adapter, is_image, rows,
            encode.layout_inputs if encode is not None else inputs.layout_inputs,
            encode.images if encode is not None else None,
        )
        embeds = kwargs["inputs_embeds"]
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise ValueError("vlprune's vision cut needs a 2-D attention_mask (or None)")
        unique = is_image[::repeat]
        positions, sample = split_images(unique, layouts)
        tokens = ImageTokens(
            layouts, positions, sample,
            None if inputs.input_ids is None else inputs.input_ids[::repeat],
            embeds[::repeat],
            None if mask is None else mask[::repeat],
            encode,
        )
        kept = self.selector(tokens)
        keep = kept_rows(unique, positions, sample, kept).repeat_interleave(repeat, 0)
        per_row: list[list[int]] = [[] for _ in range(unique.shape[0])]
        for s, k in zip(sample, kept):
            per_row[s].append(int(k.numel()))
        tokens_per_row: list[list[int]] = [[] for _ in range(unique.shape[0])]
        for s, layout in zip(sample, layouts):
            tokens_per_row[s].append(layout.num_tokens)
        selection = Selection(
            kept_per_image=[k for row in per_row for _ in range(repeat) for k in row],
            image_tokens=[row for row in tokens_per_row for _ in range(repeat)],
        )
        return self._record(keep, is_image, inputs, selection, encode)

    def _record(self, keep: torch.Tensor, is_image: torch.Tensor, inputs: ForwardInputs,
                selection: Selection | None, encode: Encode | None) -> PrefillRecord:
        index, valid = left_packed_index(keep)
        return PrefillRecord(
            keep=keep,
            index=index,
            valid=valid,
            mask=None,
            is_image=is_image.gather(1, index) & valid,
            input_ids=inputs.input_ids,
            visual_tokens=is_image.sum(1).tolist(),
            selection=selection,
            encode=encode,
            layout_inputs=encode.layout_inputs if encode is not None else inputs.layout_inputs,
        )

    def _gather(self, kwargs: dict, record: PrefillRecord) -> dict:
        """The language model's keyword inputs restricted to the kept rows."""
        embeds = kwargs["inputs_embeds"]
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise ValueError("vlprune's vision cut needs a 2-D attention_mask (or None)")
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            position_ids = torch.arange(embeds.shape[1], device=embeds.device).unsqueeze(0)
        kwargs = dict(kwargs)
        kwargs["inputs_embeds"] = gather_rows(embeds, record.index)
        kwargs["attention_mask"] = record.mask = gather_mask(mask, record.index, record.valid)
        kwargs["position_ids"] = gather_positions(position_ids, record.index)
        if self.positions == "renumber":
            kwargs["position_ids"], record.shift = renumber(kwargs["position_ids"],
                                                            record.mask.bool())
        return gather_deepstack_inputs(kwargs, record.index, record.valid)

    @eager_hook
    def _register(self, module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        """After a prefill: the cache it filled keeps its record and reports its logical length."""
        record = self.current
        cache = output_cache(output)
        if record is None or cache is None or self.records.get(cache) is not None:
            return
        self.records.set(cache, record)
        mark_pruned(cache, record.dropped)

    # ------------------------------------------------------------------ decode

    def _decode(self, args: tuple, kwargs: dict, cache: Any) -> tuple[tuple, dict] | None:
        """Keep a forward on a pruned cache consistent with it (decode steps, follow-ups).

        A mask from ``generate`` is full-length: its prompt part is replaced by the pruned
        prefill mask. Original positions need no change (the cache reports its logical length);
        after a renumbered prompt they move down by its shift.
        """
        record = self.records.get(cache)
        if record is None:
            if dropped_rows(cache):
                raise RuntimeError(
                    "this KV cache was filled under another vlprune patch of the model: "
                    f"continue it under that patch, or start again without `{CACHE_KWARG}`"
                )
            return None
        self.current = record
        if record.mask is None:
            return None
        kwargs = dict(kwargs)
        steps = kwargs["inputs_embeds"].shape[1]
        if record.shift is not None:
            position_ids = kwargs.get("position_ids")
            if position_ids is None:
                position_ids = torch.arange(steps, device=record.shift.device)[None]
                position_ids = position_ids + cache.get_seq_length()
            kwargs["position_ids"] = position_ids - record.shift
        mask = kwargs.get("attention_mask")
        if mask is not None:
            if mask.dim() != 2:
                raise ValueError("vlprune's vision cut needs a 2-D attention_mask (or None)")
            new = mask[:, record.orig_len:].to(record.mask)
            kwargs["attention_mask"] = torch.cat([record.mask, new], 1)
        elif not bool(record.mask.all()):
            held = physical_length(cache)
            new = record.mask.new_ones(record.mask.shape[0], held + steps - record.mask.shape[1])
            kwargs["attention_mask"] = torch.cat([record.mask, new], 1)
        return args, kwargs


def _weak_pair(images: tuple[Any, Any] | None,
               record: PrefillRecord) -> tuple[Any, Any, PrefillRecord] | None:
    """(weak reference to the images object, its token, record), for :meth:`_replay`."""
    if images is None:
        return None
    try:
        return weakref.ref(images[0]), images[1], record
    except TypeError:
        return None


def _check_no_cut_lost(encode: Encode | None) -> None:
    """The encoder cut left zero rows for cut units: only the vision-side selection removes
    them, so a prefill that cannot select must not go on."""
    state = encode.encoder if encode is not None else None
    if state is not None and state.cut:
        raise RuntimeError(
            "the vision encoder was pruned for this prefill but its image placeholders were not "
            "found in `input_ids` or `inputs_embeds`, so the pruned image rows cannot be removed"
        )
