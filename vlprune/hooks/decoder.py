"""The decoder cut: drop visual rows inside the language model at one or more decoder layers.

Pre-hooks on every decoder layer from the first cut layer on. In prefill, at a cut layer the
chooser returns which current rows survive; that layer and every later one then sees gathered
``hidden_states`` (cut layers only), ``position_embeddings`` (cos and sin), ``position_ids`` and
a 4-D ``attention_mask`` (rows and columns). Layers before the first cut keep the full sequence.
In decode, each layer's materialised mask keeps the columns of the keys its own cache holds:
``cat(kept_index, arange(L, kv_len))``. The cache's reported length stays layer 0's, which keeps
``generate``'s bookkeeping consistent.

Rows of a batch may keep different numbers of rows: the chooser then returns ``(index, slots)``,
the kept rows left-padded to a common width and a (B, Lnext) bool that is False on the padding
slots. Padding slots are masked out as keys in that layer and every later one, in prefill and in
every decode step (a padding slot attends only to itself, so no softmax row is empty). Where
the layer's mask is None (sdpa's ``is_causal`` fast path) one is materialised in the
convention of the attention implementation's own mask builder (transformers
``masking_utils``): bool (True = attend) for ``sdpa_mask``, additive float (0 or the dtype's
minimum) for ``eager_mask``; other implementations (flash, flex) raise ``NotImplementedError``
on that path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask, sdpa_mask

from vlprune.adapters.base import Adapter
from vlprune.hooks.deepstack import DeepstackRows
from vlprune.hooks.gather import gather_positions, gather_rows
from vlprune.hooks.recurrent import check_recurrent_cut, recurrent_mask


@dataclass
class DecoderState:
    """Rows alive in the current prefill: ``index`` (B, Lcur) into the LM input, image flags.

    ``valid`` (B, Lcur) is False on batch padding and padding slots (default: all True);
    ``slots`` (B, Lcur) is False on padding slots only, None while every slot holds a real row;
    ``input_visual`` (B,): visual rows per sample entering the language model (default: those
    of ``is_image``).
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

    def __post_init__(self) -> None:
        if self.valid is None:
            self.valid = torch.ones_like(self.is_image)
        if self.input_visual is None:
            self.input_visual = self.is_image.sum(1)


@dataclass
class CutContext:
    """What a decoder-stage chooser sees at cut layer ``layer``.

    ``hidden``: (B, Lcur, D) input of the layer; ``is_image``: (B, Lcur) bool, visual rows;
    ``index``: (B, Lcur) positions of the current rows in the language model's input;
    ``valid``: (B, Lcur) bool, False on batch padding (and padding slots of earlier cuts);
    ``layer_index``: rows (LM-input positions) that entered each earlier layer at or after the
    first cut (layers before it saw every row); ``input_visual``: (B,) visual rows per sample
    entering the language model.
    """

    layer: int
    hidden: torch.Tensor
    is_image: torch.Tensor
    index: torch.Tensor
    valid: torch.Tensor | None = None
    layer_index: dict[int, torch.Tensor] = field(default_factory=dict)
    input_visual: torch.Tensor | None = None


Chooser = Callable[[CutContext], "torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None"]
"""Returns kept rows (B, Lnext), or ``(index, slots)`` for rows keeping different counts."""


def gather_mask_4d(
    mask: torch.Tensor, rows: torch.Tensor | None, cols: torch.Tensor
) -> torch.Tensor:
    """Gather a (B|1, H|1, Q, K) mask on query rows (B, Q') (None: all) and key columns (B, K')."""
    batch = cols.shape[0]
    mask = mask.expand(batch, *mask.shape[1:])
    heads = mask.shape[1]
    if rows is not None:
        rows = rows[:, None, :, None].expand(batch, heads, rows.shape[1], mask.shape[3])
        mask = mask.gather(2, rows)
    cols = cols[:, None, None, :].expand(batch, heads, mask.shape[2], cols.shape[1])
    return mask.gather(3, cols)


def mask_slots(
    mask: torch.Tensor, keys: torch.Tensor, queries: torch.Tensor | None
) -> torch.Tensor:
    """Mask out key columns where ``keys`` (B, K) is False in a 4-D (B, H, Q, K) mask (bool: True
    = attend; float: additive). ``queries`` (B, Q) (prefill, Q == K) gives the padding slots'
    rows their own diagonal back."""
    allowed = keys[:, None, None, :]
    if mask.dtype == torch.bool:
        out = mask & allowed
    else:
        out = mask.masked_fill(~allowed, torch.finfo(mask.dtype).min)
    if queries is None:
        return out
    eye = torch.eye(queries.shape[1], dtype=torch.bool, device=mask.device)
    own = eye[None, None] & ~queries[:, None, :, None]
    return out | own if out.dtype == torch.bool else out.masked_fill(own, 0.0)


def causal_slot_mask(
    keys: torch.Tensor, n_queries: int, kind: str, dtype: torch.dtype
) -> torch.Tensor:
    """A materialised (B, 1, Q, K) causal mask over cache slots: the Q queries are the last Q
    slots, key j is visible to query i when ``j <= i`` and ``keys`` (B, K) is True; padding slots
    among the queries see themselves. ``kind``: "bool" (sdpa) or "float" (eager, additive)."""
    n_keys = keys.shape[1]
    key_pos = torch.arange(n_keys, device=keys.device)
    query_pos = key_pos[n_keys - n_queries:]
    causal = key_pos[None, :] <= query_pos[:, None]
    allowed = causal[None, None] & keys[:, None, None, :]
    padding_query = ~keys[:, None, n_keys - n_queries:, None]
    allowed = allowed | ((key_pos[None, :] == query_pos[:, None])[None, None] & padding_query)
    if kind == "bool":
        return allowed
    zero = torch.zeros((), dtype=dtype, device=keys.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


class DecoderCut:
    """Installs the layer pre-hooks; ``chooser`` returns kept rows (B, Lnext) at cut layers,
    or ``(index, slots)`` for padded rows (see the module docstring)."""

    def __init__(self, adapter: Adapter, layers: Sequence[int], chooser: Chooser,
                 image_mask: Callable[[], torch.Tensor | None]) -> None:
        n_layers = len(adapter.decoder_layers)
        bad = [layer for layer in layers if not 0 < layer < n_layers]
        if bad:
            raise ValueError(
                f"cut layers {bad} outside 1..{n_layers - 1} (the model has {n_layers})"
            )
        check_recurrent_cut(adapter, layers)
        self.adapter = adapter
        self.layers = sorted(set(layers))
        self.recurrent = adapter.recurrent_layers
        self.chooser = chooser
        self.image_mask = image_mask
        self.state: DecoderState | None = None
        self.prefill = False

    def install(self) -> list[RemovableHandle | DeepstackRows]:
        """Register one pre-hook on the language model and one per layer ≥ the first cut (and,
        with DeepStack, the gather of its inputs); no hooks at all when there is no cut layer."""
        if not self.layers:
            return []
        handles = [self.adapter.language_model.register_forward_pre_hook(
            self._start, with_kwargs=True)]
        for i in range(self.layers[0], len(self.adapter.decoder_layers)):
            layer = self.adapter.decoder_layers[i]
            hook = partial(self._layer, i)
            handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
        if self.adapter.deepstack_mergers:
            lm = self.adapter.language_model
            handles.append(DeepstackRows(lm, lambda: self.state if self.prefill else None))
        return handles

    @property
    def layer_tokens(self) -> list[list[int]]:
        """Per sample, the sequence length entering each decoder layer in the last prefill
        (padding slots not counted)."""
        return self.state.layer_tokens if self.state is not None else []

    def _start(self, module: Any, args: tuple, kwargs: dict) -> None:
        cache = kwargs.get("cache")
        self.prefill = cache is None or cache.get_seq_length() == 0
        if not self.prefill:
            return
        embeds = kwargs["inputs_embeds"]
        batch, length = embeds.shape[:2]
        is_image = self.image_mask()
        if is_image is None or is_image.shape != (batch, length):
            self.state = None
            return
        index = torch.arange(length, device=embeds.device).expand(batch, length)
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            valid = mask.bool()
        else:
            valid = torch.ones(batch, length, dtype=torch.bool, device=embeds.device)
        n_layers = len(self.adapter.decoder_layers)
        self.state = DecoderState(index, is_image, length, valid=valid,
                                  layer_tokens=[[length] * n_layers for _ in range(batch)])

    def _layer(self, i: int, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        state = self.state
        if state is None:
            return None
        if not self.prefill:
            return self._decode(i, args, kwargs)
        hidden = args[0] if args else kwargs["hidden_states"]
        if i in self.layers:
            ctx = CutContext(i, hidden, state.is_image, state.index, state.valid,
                             dict(state.layer_index), state.input_visual)
            chosen = self.chooser(ctx)
            if chosen is not None:
                hidden = self._cut(state, chosen, hidden)
        state.layer_index[i] = state.index
        state.layer_slots[i] = state.slots
        counts = [state.index.shape[1]] * len(state.layer_tokens)
        if state.slots is not None:
            counts = state.slots.sum(1).tolist()
        for row, count in zip(state.layer_tokens, counts):
            row[i] = count
        return self._gather_prefill(args, kwargs, hidden, state, i in self.recurrent)

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

    def _mask_kind(self) -> str:
        """The 4-D mask convention of the language model's attention: "bool" or "float"."""
        name = self.adapter.language_model.config._attn_implementation
        builder = ALL_MASK_ATTENTION_FUNCTIONS.get(name)
        if builder is sdpa_mask:
            return "bool"
        if builder is eager_mask:
            return "float"
        raise NotImplementedError(
            "rows keeping different counts need a 4-D attention mask; attention "
            f"implementation {name!r} is not supported on that path (use 'sdpa' or 'eager')"
        )

    def _gather_prefill(self, args: tuple, kwargs: dict, hidden: torch.Tensor,
                        state: DecoderState, recurrent: bool = False) -> tuple[tuple, dict]:
        index = state.index
        kwargs = dict(kwargs)
        if args:
            args = (hidden, *args[1:])
        else:
            kwargs["hidden_states"] = hidden
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
        elif state.slots is not None:
            kwargs["attention_mask"] = self._new_mask(mask, state.slots, index.shape[1], hidden)
        return args, kwargs

    def _new_mask(self, mask: Any, keys: torch.Tensor, n_queries: int,
                  hidden: torch.Tensor) -> torch.Tensor:
        """Materialise the mask of a layer whose own mask is None (padding slots present)."""
        if mask is not None:
            raise NotImplementedError(
                "rows keeping different counts need a 4-D attention mask, got "
                f"{type(mask).__name__}"
            )
        return causal_slot_mask(keys, n_queries, self._mask_kind(), hidden.dtype)

    def _decode(self, i: int, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        mask = kwargs.get("attention_mask")
        state = self.state
        if state is None or i in self.recurrent:
            return None
        slots = state.layer_slots.get(i)
        index = state.layer_index[i]
        if isinstance(mask, torch.Tensor) and mask.dim() == 4:
            kv_len = mask.shape[-1]
            new = torch.arange(state.input_len, kv_len, device=mask.device)
            new = new.expand(index.shape[0], -1)
            mask = gather_mask_4d(mask, None, torch.cat([index, new], 1))
            if slots is not None:
                mask = mask_slots(mask, torch.cat([slots, slots.new_ones(new.shape)], 1), None)
        elif slots is not None:
            hidden = args[0] if args else kwargs["hidden_states"]
            n_queries = hidden.shape[1]
            kv_len = kwargs["cache"].get_seq_length(i) + n_queries
            keys = torch.cat([slots, slots.new_ones(slots.shape[0], kv_len - slots.shape[1])], 1)
            mask = self._new_mask(mask, keys, n_queries, hidden)
        else:
            return None
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = mask
        return args, kwargs
