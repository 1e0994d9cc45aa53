"""Attention masks for cut rows: gather rows and key columns of 4-D masks, hide padding
slots, build a decoder layer's causal mask over cache slots in the convention of its attention
implementation (:func:`layer_mask`), and read the rows of any layer's mask that a probe
recomputes (:func:`query_rows`)."""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.attention.flex_attention import BlockMask, create_mask
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    causal_mask_function,
    eager_mask,
    sdpa_mask,
)


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


def cache_keys(lm_mask: torch.Tensor | None, input_len: int, index: torch.Tensor,
               slots: torch.Tensor | None, kv_len: int) -> torch.Tensor:
    """(B, kv_len) bool: which keys of a decoder layer's cache are real in a decode step, read
    from the language model's 2-D mask ``lm_mask`` (B, input_len + later rows; None: all
    real): the ``index`` (B, kept) prompt rows the layer kept (padding ``slots`` False), then
    every row appended since. ``RuntimeError`` when the mask does not cover that cache."""
    batch, kept = index.shape
    if lm_mask is None:
        lm_mask = torch.ones(batch, input_len + kv_len - kept, dtype=torch.bool,
                             device=index.device)
    lm_mask = lm_mask.bool()
    if lm_mask.shape[1] - input_len != kv_len - kept:
        raise RuntimeError(
            f"decode step: the attention mask covers {lm_mask.shape[1]} positions, but the "
            f"pruned cache holds {kept} prompt rows of {input_len} and {kv_len - kept} later ones"
        )
    prompt = lm_mask[:, :input_len].gather(1, index)
    if slots is not None:
        prompt = prompt & slots
    return torch.cat([prompt, lm_mask[:, input_len:]], 1)


def mask_builder(config: Any) -> Any:
    """The mask builder transformers' ``AttentionMaskInterface`` holds for ``config``'s
    attention implementation; ``NotImplementedError`` naming it when none is registered."""
    name = config._attn_implementation
    builder = ALL_MASK_ATTENTION_FUNCTIONS.get(name)
    if builder is None:
        raise NotImplementedError(
            "vlprune's decoder cut builds the attention masks of the rows it keeps with the "
            f"mask builder of the attention implementation, and {name!r} has none registered "
            "(transformers AttentionMaskInterface.register): register one, or run batches of "
            "one prompt"
        )
    return builder


def layer_mask(config: Any, keys: torch.Tensor, n_queries: int, dtype: torch.dtype) -> Any:
    """The ``attention_mask`` a decoder layer of ``config``'s attention implementation takes
    when its last ``n_queries`` slots attend causally to the slots where ``keys`` (B, K) is
    True (False: batch padding and padding slots).

    sdpa / eager: :func:`causal_slot_mask` (bool / additive float, (B, 1, Q, K)). Any other
    implementation: what its own builder in transformers' ``AttentionMaskInterface`` returns
    for the 2-D padding mask ``keys``, as ``create_causal_mask`` calls it: flash attention the
    2-D mask itself (varlen; None when every key is real), flex attention a ``BlockMask``.
    ``NotImplementedError`` for an implementation with no mask builder registered.
    """
    builder = mask_builder(config)
    if builder is sdpa_mask:
        return causal_slot_mask(keys, n_queries, "bool", dtype)
    if builder is eager_mask:
        return causal_slot_mask(keys, n_queries, "float", dtype)
    n_keys = keys.shape[1]
    return builder(
        batch_size=keys.shape[0], q_length=n_queries, kv_length=n_keys,
        q_offset=n_keys - n_queries, kv_offset=0, mask_function=causal_mask_function,
        attention_mask=keys, allow_is_causal_skip=False, dtype=dtype, config=config,
        use_vmap=False, device=keys.device,
    )


def query_rows(mask: Any, queries: torch.Tensor, n_keys: int) -> torch.Tensor:
    """The rows ``queries`` (B, Q) of a prefill layer's ``attention_mask`` over its ``n_keys``
    keys, as a (B, 1|H, Q, n_keys) bool (True = attend) or additive float mask.

    ``mask``: a 4-D mask (sdpa, eager), flash attention's 2-D padding mask (B, K) (causal,
    padding keys hidden), None (causal), or flex attention's ``BlockMask`` (its ``mask_mod``
    evaluated); ``TypeError`` for anything else.
    """
    batch = queries.shape[0]
    if isinstance(mask, torch.Tensor) and mask.dim() == 4:
        mask = mask.expand(batch, *mask.shape[1:])
        index = queries[:, None, :, None].expand(-1, mask.shape[1], -1, mask.shape[3])
        return mask.gather(2, index)
    if isinstance(mask, BlockMask):
        q_len, kv_len = mask.seq_lengths
        dense = create_mask(mask.mask_mod, batch, 1, q_len, kv_len, device=queries.device)
        return dense.gather(2, queries[:, None, :, None].expand(-1, 1, -1, kv_len))
    keys = torch.arange(n_keys, device=queries.device)
    causal = keys[None, None, None, :] <= queries[:, None, :, None]
    if mask is None:
        return causal
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return causal & mask[:, -n_keys:].bool()[:, None, None, :]
    raise TypeError(
        f"cannot read attention rows from a {type(mask).__name__} attention mask (supported: "
        "4-D tensors, 2-D padding masks, flex BlockMask, None)"
    )
