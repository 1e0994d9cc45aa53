"""The masks the decoder cut gives the layers, and its decode steps.

Masks: a 4-D mask the layer got (sdpa, eager) is gathered on rows and key columns, padding
slots hidden (a padding slot attends only to itself, so no softmax row is empty). Any other mask
(flash attention's 2-D padding mask, flex attention's ``BlockMask``), or a None mask while
padding slots exist (sdpa's ``is_causal`` fast path), is rebuilt for the rows the layer sees by
:func:`~vlprune.hooks.masks.layer_mask` in the convention of the attention implementation, from
which of those rows are real: in prefill the cut rows, in decode the layer's cache slots
``cat(kept_index, arange(L, kv_len))`` read from the 2-D mask the language model got. So no
layer gets a mask of the uncut length.

In a decode step each layer gets the step's mask on the columns of the keys its own cache holds
and, with renumbered positions, the shifted rotary embeddings of the new tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from vlprune.compat import layer_cache
from vlprune.hooks.decoder_state import DecoderState
from vlprune.hooks.masks import cache_keys, gather_mask_4d, layer_mask, mask_slots
from vlprune.hooks.state import PatchPart, ThreadLocal


class DecoderSteps(PatchPart):
    """Base of :class:`~vlprune.hooks.decoder.DecoderCut`: the masks rebuilt for the rows a
    layer sees, and the decode steps' masks and positions (the cut provides ``adapter``,
    ``recurrent`` and ``current``)."""

    _memo = ThreadLocal()
    """The running decode step's gathered masks: (state, the step's 4-D mask, {id(rows): (rows,
    mask)}), so layers holding the same rows gather their mask once per step."""
    _rope = ThreadLocal()
    _lm_mask = ThreadLocal()
    """The 2-D attention mask the language model got in the running forward (None: none)."""
    _built = ThreadLocal()
    """(sources, mask): the last mask built in the running forward, for the next layers."""

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

