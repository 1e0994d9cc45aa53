"""The decoder cut: drop visual rows inside the language model at one or more decoder layers.

Pre-hooks on every decoder layer from the first cut layer on. In prefill, at a cut layer the
chooser returns which current rows survive; that layer and every later one then sees gathered
``hidden_states`` (cut layers only), ``position_embeddings`` (cos and sin), ``position_ids`` and
a 4-D ``attention_mask`` (rows and columns). Layers before the first cut keep the full sequence.
In decode, each layer's materialised mask keeps the columns of the keys its own cache holds:
``cat(kept_index, arange(L, kv_len))``. The cache's reported length stays layer 0's, which keeps
``generate``'s bookkeeping consistent.

With ``positions="renumber"`` the rows alive after each cut are renumbered contiguously
(``hooks/positions.py``): that layer and the later ones get the rotary embeddings of the new
positions, in prefill and, shifted by the same amount, in every decode step.

What a prefill decided is a :class:`DecoderState`: the running forward's state (per thread) and
its KV cache's record, so decode steps and follow-up turns on that cache use it whatever ran in
between; an uncached ``generate`` step replays the first step's choices, extended by the rows
appended since (``VisionCut`` tells which prefill it replays).

Rows of a batch may keep different numbers of rows: the chooser then returns ``(index, slots)``,
the kept rows left-padded to a common width and a (B, Lnext) bool that is False on the padding
slots. Padding slots are masked out as keys in that layer and every later one, in prefill and in
every decode step.

Masks: a 4-D mask the layer got (sdpa, eager) is gathered on rows and key columns, padding
slots hidden (a padding slot attends only to itself, so no softmax row is empty). Any other mask
(flash attention's 2-D padding mask, flex attention's ``BlockMask``), or a None mask while
padding slots exist (sdpa's ``is_causal`` fast path), is rebuilt for the rows the layer sees by
:func:`~vlprune.hooks.masks.layer_mask` in the convention of the attention implementation, from
which of those rows are real: in prefill the cut rows, in decode the layer's cache slots
``cat(kept_index, arange(L, kv_len))`` read from the 2-D mask the language model got. So no
layer gets a mask of the uncut length.

Two kinds of model need more (``hooks/deepstack.py``, ``hooks/recurrent.py``): Qwen3-VL adds
DeepStack features at the image rows after its first decoder layers, so a
:class:`~vlprune.hooks.calls.Shadow` of ``_deepstack_process`` gathers them to the rows alive
there; a hybrid decoder's linear-attention layers (Qwen3.5) get a gathered 2-D padding mask in
prefill and nothing in decode (their recurrent state already holds the kept rows only), whatever
the attention implementation of its full-attention layers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from vlprune.adapters.base import Adapter
from vlprune.compat import layer_cache, output_cache
from vlprune.hooks.calls import Shadow
from vlprune.hooks.deepstack import gather_deepstack
from vlprune.hooks.gather import gather_positions, gather_rows
from vlprune.hooks.masks import (
    cache_keys,
    gather_mask_4d,
    layer_mask,
    mask_builder,
    mask_slots,
)
from vlprune.hooks.positions import renumber
from vlprune.hooks.recurrent import check_recurrent_cut, recurrent_mask
from vlprune.hooks.state import CacheRecords, PatchPart, ThreadLocal, eager_hook
from vlprune.hooks.vision import VisionCut


@dataclass
class DecoderState:
    """Rows alive in one prefill: ``index`` (B, Lcur) into the LM input, image flags.

    ``valid`` (B, Lcur) is False on batch padding and padding slots (default: all True);
    ``slots`` (B, Lcur) is False on padding slots only, None while every slot holds a real row;
    ``input_visual`` (B,): visual rows per sample entering the language model (default: those
    of ``is_image``); ``input_valid`` (B, L): the LM input's rows that are not batch padding.
    Per layer from the first cut on: ``layer_index`` / ``layer_valid`` / ``layer_slots`` of the
    rows entering it; ``choices[l]``: what the chooser answered at cut layer l and the row count
    it cut from (a replay extends it); ``replay``: (the replayed prefill's state, tokens added).
    Renumbered positions only: ``positions`` (B, Lcur) of the current rows and their ``rope``
    (cos, sin), ``shift`` (B, 1) of the last cut, ``layer_shift[l]`` of the rows entering layer l
    (None before the first cut that cut).
    """

    index: torch.Tensor
    is_image: torch.Tensor
    input_len: int
    layer_index: dict[int, torch.Tensor] = field(default_factory=dict)
    layer_tokens: list[list[int]] = field(default_factory=list)
    valid: torch.Tensor | None = None
    input_visual: torch.Tensor | None = None
    slots: torch.Tensor | None = None
    layer_slots: dict[int, torch.Tensor | None] = field(default_factory=dict)
    layer_valid: dict[int, torch.Tensor] = field(default_factory=dict)
    input_valid: torch.Tensor | None = None
    choices: dict[int, tuple[Any, int]] = field(default_factory=dict)
    replay: tuple[DecoderState, int] | None = None
    positions: torch.Tensor | None = None
    rope: tuple[torch.Tensor, torch.Tensor] | None = None
    shift: torch.Tensor | None = None
    layer_shift: dict[int, torch.Tensor | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.valid is None:
            self.valid = torch.ones_like(self.is_image)
        if self.input_visual is None:
            self.input_visual = self.is_image.sum(1)
        if self.input_valid is None:
            self.input_valid = self.valid


@dataclass
class CutContext:
    """What a decoder-stage chooser sees at cut layer ``layer``.

    ``hidden``: (B, Lcur, D) input of the layer; ``is_image``: (B, Lcur) bool, visual rows;
    ``index``: (B, Lcur) positions of the current rows in the language model's input;
    ``valid``: (B, Lcur) bool, False on batch padding (and padding slots of earlier cuts);
    ``layer_index`` / ``layer_valid``: rows (LM-input positions) that entered each earlier layer
    at or after the first cut, and which of them were real (layers before it saw every row,
    real where ``input_valid``); ``input_visual``: (B,) visual rows per sample entering the
    language model; ``input_valid``: (B, L) the LM input's rows that are not batch padding.
    """

    layer: int
    hidden: torch.Tensor
    is_image: torch.Tensor
    index: torch.Tensor
    valid: torch.Tensor | None = None
    layer_index: dict[int, torch.Tensor] = field(default_factory=dict)
    input_visual: torch.Tensor | None = None
    layer_valid: dict[int, torch.Tensor] = field(default_factory=dict)
    input_valid: torch.Tensor | None = None


Chooser = Callable[[CutContext], "torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None"]
"""Returns kept rows (B, Lnext), or ``(index, slots)`` for rows keeping different counts."""


class DecoderCut(PatchPart):
    """Installs the layer pre-hooks; ``chooser`` returns kept rows (B, Lnext) at cut layers,
    or ``(index, slots)`` for padded rows (see the module docstring). ``vision`` tells which
    language-model input rows are image tokens, and which prefill a forward replays;
    ``positions``: "original" or "renumber"."""

    current = ThreadLocal()
    """:class:`DecoderState` of the forward running in this thread (its prefill's state on a
    decode step)."""
    last = ThreadLocal()
    """The last prefill's :class:`DecoderState` in this thread (replays excluded)."""
    _prefill = ThreadLocal(False)
    _memo = ThreadLocal()
    """The running decode step's gathered masks: (state, the step's 4-D mask, {id(rows): (rows,
    mask)}), so layers holding the same rows gather their mask once per step."""
    _rope = ThreadLocal()
    _lm_mask = ThreadLocal()
    """The 2-D attention mask the language model got in the running forward (None: none)."""
    _built = ThreadLocal()
    """(sources, mask): the last mask built in the running forward, for the next layers."""

    def __init__(self, adapter: Adapter, layers: Sequence[int], chooser: Chooser,
                 vision: VisionCut, positions: str = "original") -> None:
        n_layers = len(adapter.decoder_layers)
        bad = [layer for layer in layers if not 0 < layer < n_layers]
        if bad:
            raise ValueError(
                f"cut layers {bad} outside 1..{n_layers - 1} (the model has {n_layers})"
            )
        check_recurrent_cut(adapter, layers)
        self.adapter = adapter
        self.layers = sorted(set(layers))
        self.chooser = chooser
        self.vision = vision
        self.positions = positions
        self.records = CacheRecords("decoder")
        self.recurrent = adapter.recurrent_layers

    def install(self) -> list[RemovableHandle | Shadow]:
        """Register the language-model hooks and one pre-hook per layer ≥ the first cut (and,
        with DeepStack, the shadow of ``_deepstack_process``); no hooks at all when there is no
        cut layer."""
        if not self.layers:
            return []
        lm = self.adapter.language_model
        handles = [
            lm.register_forward_pre_hook(self._start, with_kwargs=True),
            lm.register_forward_hook(self._register, with_kwargs=True),
        ]
        for i in range(self.layers[0], len(self.adapter.decoder_layers)):
            layer = self.adapter.decoder_layers[i]
            hook = partial(self._layer, i)
            handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
        if self.adapter.deepstack_mergers:
            handles.append(Shadow(lm, "_deepstack_process", self._deepstack))
        return handles

    @eager_hook
    def _start(self, module: Any, args: tuple, kwargs: dict) -> None:
        self.current = None
        self._rope = self._built = None
        mask = kwargs.get("attention_mask")
        self._lm_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        cache = layer_cache(kwargs)
        self._prefill = cache is None or cache.get_seq_length() == 0
        if not self._prefill:
            self.current = self.records.get(cache)
            return
        if cache is not None:
            self.records.set(cache, None)
        embeds = kwargs["inputs_embeds"]
        batch, length = embeds.shape[:2]
        record = self.vision.current
        if record is None or record.is_image.shape != (batch, length):
            self.last = None
            return
        if batch > 1:
            mask_builder(self.adapter.language_model.config)  # padding / slots need one
        index = torch.arange(length, device=embeds.device).expand(batch, length)
        if self._lm_mask is not None:
            valid = self._lm_mask.bool()
        else:
            valid = torch.ones(batch, length, dtype=torch.bool, device=embeds.device)
        n_layers = len(self.adapter.decoder_layers)
        state = DecoderState(index, record.is_image, length, valid=valid,
                             layer_tokens=[[length] * n_layers for _ in range(batch)])
        self.current = state
        first = record.first.decoder if record.first is not None else None
        if record.replay and first is not None:
            state.replay = (first, record.replay)
            return
        self.last = state
        record.decoder = state

    @eager_hook
    def _register(self, module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        """After a prefill, the cache it filled keeps its state for the decode steps."""
        self._rope = self._built = None
        cache = output_cache(output)
        if self._prefill and self.current is not None and cache is not None:
            self.records.set(cache, self.current)

    @property
    def layer_tokens(self) -> list[list[int]]:
        """Per sample, the sequence length entering each decoder layer in the last prefill of
        this thread (padding slots not counted)."""
        return self.last.layer_tokens if self.last is not None else []

    @eager_hook
    def _layer(self, i: int, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        state = self.current
        if state is None:
            return None
        if not self._prefill:
            return self._decode(i, args, kwargs)
        hidden = args[0] if args else kwargs["hidden_states"]
        if i in self.layers:
            chosen = self._choose(i, state, hidden)
            state.choices[i] = (chosen, state.index.shape[1])
            if chosen is not None:
                hidden = self._cut(state, chosen, hidden)
                if self.positions == "renumber":
                    self._renumber(state, kwargs, hidden)
        state.layer_shift[i] = state.shift
        state.layer_index[i] = state.index
        state.layer_slots[i] = state.slots
        state.layer_valid[i] = state.valid
        counts = [state.index.shape[1]] * len(state.layer_tokens)
        if state.slots is not None:
            counts = state.slots.sum(1).tolist()
        for row, count in zip(state.layer_tokens, counts):
            row[i] = count
        return self._gather_prefill(args, kwargs, hidden, state, i in self.recurrent)

    def _choose(self, i: int, state: DecoderState, hidden: torch.Tensor) -> Any:
        """The chooser's answer at cut layer ``i``, or the replayed prefill's, extended by the
        rows appended since (they follow every earlier row and are all kept)."""
        if state.replay is None:
            ctx = CutContext(i, hidden, state.is_image, state.index, state.valid,
                             dict(state.layer_index), state.input_visual,
                             dict(state.layer_valid), state.input_valid)
            return self.chooser(ctx)
        first, extra = state.replay
        chosen, width = first.choices[i]
        if chosen is None:
            return None
        local, slots = chosen if isinstance(chosen, tuple) else (chosen, None)
        new = torch.arange(width, width + extra, device=local.device).expand(local.shape[0], -1)
        local = torch.cat([local, new], 1)
        if slots is None:
            return local
        return local, torch.cat([slots, slots.new_ones(new.shape)], 1)

    @staticmethod
    def _cut(state: DecoderState, chosen: Any, hidden: torch.Tensor) -> torch.Tensor:
        """Apply a chooser's answer to the state; returns the gathered hidden states."""
        local, keep = chosen if isinstance(chosen, tuple) else (chosen, None)
        state.index = state.index.gather(1, local)
        state.is_image = state.is_image.gather(1, local)
        state.valid = state.valid.gather(1, local)
        slots = None if state.slots is None else state.slots.gather(1, local)
        if keep is not None:
            slots = keep if slots is None else slots & keep
        if slots is not None:
            state.is_image = state.is_image & slots
            state.valid = state.valid & slots
            slots = None if bool(slots.all()) else slots
        state.slots = slots
        return gather_rows(hidden, local)

    def _renumber(self, state: DecoderState, kwargs: dict, hidden: torch.Tensor) -> None:
        """Renumber the rows alive after a cut; their rotary embeddings for the next layers."""
        original = gather_positions(_position_ids(kwargs), state.index)
        state.positions, state.shift = renumber(original, state.valid)
        state.rope = self.adapter.rotary_embedding(hidden, state.positions)

    def _gather_prefill(self, args: tuple, kwargs: dict, hidden: torch.Tensor,
                        state: DecoderState, recurrent: bool) -> tuple[tuple, dict]:
        index = state.index
        kwargs = dict(kwargs)
        if args:
            args = (hidden, *args[1:])
        else:
            kwargs["hidden_states"] = hidden
        if state.rope is not None:
            kwargs["position_embeddings"], kwargs["position_ids"] = state.rope, state.positions
        else:
            cos, sin = kwargs["position_embeddings"]
            batch = index.shape[0]
            kwargs["position_embeddings"] = (
                gather_rows(cos.expand(batch, *cos.shape[1:]), index),
                gather_rows(sin.expand(batch, *sin.shape[1:]), index),
            )
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = gather_positions(kwargs["position_ids"], index)
        mask = kwargs.get("attention_mask")
        if recurrent:
            kwargs["attention_mask"] = recurrent_mask(mask, index, state.slots)
        elif isinstance(mask, torch.Tensor) and mask.dim() == 4:
            mask = gather_mask_4d(mask, index, index)
            if state.slots is not None:
                mask = mask_slots(mask, state.slots, state.slots)
            kwargs["attention_mask"] = mask
        elif mask is not None or state.slots is not None:
            kwargs["attention_mask"] = self._rebuilt_mask(
                (state.valid,), state.valid, index.shape[1], hidden)
        return args, kwargs

    def _rebuilt_mask(self, sources: tuple,
                      keys: torch.Tensor | Callable[[], torch.Tensor], n_queries: int,
                      hidden: torch.Tensor) -> Any:
        """The layer's mask for ``keys`` (B, K) real or not (or a function computing them), in
        its implementation's convention; the layers after it reuse it while they build from the
        same ``sources`` (tensors compared by identity, numbers by value) in one forward."""
        sources = (*sources, n_queries)
        built = self._built
        if built is not None and _same(built[0], sources):
            return built[1]
        config = self.adapter.language_model.config
        mask = layer_mask(config, keys() if callable(keys) else keys, n_queries, hidden.dtype)
        self._built = (sources, mask)
        return mask

    def _decode(self, i: int, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if i in self.recurrent:
            return None
        state = self.current
        shift = state.layer_shift.get(i)
        mask = self._decode_mask(i, args, kwargs)
        if mask is None and shift is None:
            return None
        kwargs = dict(kwargs)
        if mask is not None:
            kwargs["attention_mask"] = mask
        if shift is not None:
            hidden = args[0] if args else kwargs["hidden_states"]
            kwargs["position_ids"], kwargs["position_embeddings"] = self._shifted(
                hidden, _position_ids(kwargs), shift)
        return args, kwargs

    def _shifted(self, hidden: torch.Tensor, position_ids: torch.Tensor, shift: torch.Tensor
                 ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Positions of tokens after a renumbered prompt and their rotary embeddings; computed
        once per forward for all layers that share ``shift``."""
        memo = self._rope
        if memo is None or memo[0] is not position_ids or memo[1] is not shift:
            moved = position_ids - shift
            memo = self._rope = (position_ids, shift, moved,
                                 self.adapter.rotary_embedding(hidden, moved))
        return memo[2], memo[3]

    def _decode_mask(self, i: int, args: tuple, kwargs: dict) -> Any:
        """Layer ``i``'s mask in a decode step (None: the layer's own mask is right)."""
        mask = kwargs.get("attention_mask")
        state = self.current
        slots = state.layer_slots.get(i)
        index = state.layer_index[i]
        if isinstance(mask, torch.Tensor) and mask.dim() == 4:
            return self._gathered_step_mask(state, index, slots, mask)
        if mask is not None or slots is not None:
            hidden = args[0] if args else kwargs["hidden_states"]
            n_queries = hidden.shape[1]
            kv_len = layer_cache(kwargs).get_seq_length(i) + n_queries
            return self._rebuilt_mask(
                (index, slots, self._lm_mask, kv_len),
                partial(cache_keys, self._lm_mask, state.input_len, index, slots, kv_len),
                n_queries, hidden)
        return None

    def _gathered_step_mask(self, state: DecoderState, index: torch.Tensor,
                            slots: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
        """The step's 4-D ``mask`` on the columns a layer holding rows ``index`` caches,
        ``cat(index, arange(L, kv_len))`` (padding slots masked); layers that hold the same rows
        share one per step (memo)."""
        memo = self._memo
        if memo is None or memo[0] is not state or memo[1] is not mask:
            memo = self._memo = (state, mask, {})
        hit = memo[2].get(id(index))
        if hit is not None:
            return hit[1]
        new = torch.arange(state.input_len, mask.shape[-1], device=mask.device)
        new = new.expand(index.shape[0], -1)
        out = gather_mask_4d(mask, None, torch.cat([index, new], 1))
        if slots is not None:
            out = mask_slots(out, torch.cat([slots, slots.new_ones(new.shape)], 1), None)
        memo[2][id(index)] = (index, out)
        return out

    def _deepstack(self, original: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """Shadow of the text model's ``_deepstack_process``: run it on the DeepStack inputs
        of the rows alive after the layer that just ran."""
        return original(*self._deepstack_inputs(*args, **kwargs))

    @eager_hook
    def _deepstack_inputs(self, hidden_states: torch.Tensor, visual_pos_masks: torch.Tensor,
                          visual_embeds: torch.Tensor) -> tuple[Any, ...]:
        """``_deepstack_process``'s arguments with the mask (B, L) and features (V, D) of the
        LM input narrowed to this prefill's current rows (unchanged outside a prefill)."""
        state = self.current
        if state is None or not self._prefill:
            return hidden_states, visual_pos_masks, visual_embeds
        alive = state.slots if state.slots is not None else torch.ones_like(state.valid)
        mask, (embeds,) = gather_deepstack(
            visual_pos_masks.to(state.index.device), [visual_embeds], state.index, alive
        )
        return hidden_states, mask, embeds


def _position_ids(kwargs: dict) -> torch.Tensor:
    """A decoder layer's 1-D ``position_ids`` (renumbering needs them)."""
    position_ids = kwargs.get("position_ids")
    if position_ids is None or position_ids.dim() != 2:
        raise RuntimeError("positions='renumber' needs the decoder layers' 1-D position_ids")
    return position_ids


def _same(a: tuple, b: tuple) -> bool:
    """Equal source tuples: the same tensor objects (or None) and equal numbers."""
    return len(a) == len(b) and all(
        x is y or (isinstance(x, int) and isinstance(y, int) and x == y) for x, y in zip(a, b)
    )
