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

The state a prefill leaves and what choosers see are in ``hooks/decoder_state.py``; the masks
the layers get and the decode steps in ``hooks/decoder_steps.py``.

Two kinds of model need more (``hooks/deepstack.py``, ``hooks/recurrent.py``): Qwen3-VL adds
DeepStack features at the image rows after its first decoder layers, so a
:class:`~vlprune.hooks.calls.Shadow` of ``_deepstack_process`` gathers them to the rows alive
there; a hybrid decoder's linear-attention layers (Qwen3.5) get a gathered 2-D padding mask in
prefill and nothing in decode (their recurrent state already holds the kept rows only), whatever
the attention implementation of its full-attention layers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from vlprune.adapters.base import Adapter
from vlprune.compat import layer_cache, output_cache
from vlprune.hooks.calls import Shadow
from vlprune.hooks.decoder_state import Chooser, CutContext, DecoderState
from vlprune.hooks.decoder_steps import DecoderSteps, _position_ids
from vlprune.hooks.deepstack import gather_deepstack
from vlprune.hooks.gather import gather_positions, gather_rows
from vlprune.hooks.masks import gather_mask_4d, mask_builder, mask_slots
from vlprune.hooks.positions import renumber
from vlprune.hooks.recurrent import check_recurrent_cut, recurrent_mask
from vlprune.hooks.state import CacheRecords, ThreadLocal, eager_hook
from vlprune.hooks.vision import VisionCut


class DecoderCut(DecoderSteps):
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
