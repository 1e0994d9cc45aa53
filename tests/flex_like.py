"""A CPU stand-in for ``flex_attention``: flex's conventions, computed with sdpa.

transformers' own flex path compiles ``flex_attention`` and ``create_block_mask`` with
``torch.compile``: slow on CPU, and with torch 2.13 the CPU kernel inductor generates for decode
steps failed to compile on this project's machines. This registers ``flex_like`` in both
registries, following ``flex_attention_forward`` and ``flex_attention_mask``:

- decoder masks are ``BlockMask`` objects, built as ``flex_attention_mask`` builds them (causal
  mask function, the 2-D padding mask and-ed in, query / key offsets), without compiling;
- a ``BlockMask`` must have been built for exactly the query and key lengths it is applied to;
- a 4-D tensor mask is an additive score mask; no mask means full (non-causal) attention;
- a query row with no visible key gives zeros, as flex does;
- grouped-query attention without repeating keys in the caller.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, create_mask
from transformers import AttentionInterface
from transformers.masking_utils import (
    AttentionMaskInterface,
    add_offsets_to_mask_function,
    and_masks,
    causal_mask_function,
    padding_mask_function,
    prepare_padding_mask,
)

NAME = "flex_like"


def flex_like_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0,
                   kv_offset: int = 0, mask_function: Any = causal_mask_function,
                   attention_mask: torch.Tensor | None = None, device: Any = "cpu",
                   **kwargs: Any) -> BlockMask:
    """transformers' ``flex_attention_mask``, with ``create_block_mask`` not compiled."""
    if attention_mask is not None:
        padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
        mask_function = and_masks(mask_function, padding_mask_function(padding))
    mask_function = add_offsets_to_mask_function(mask_function, q_offset, kv_offset)
    return create_block_mask(mask_function, batch_size, None, q_length, kv_length,
                             device=device)


def flex_like_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, attention_mask: Any, scaling: float | None = None,
                      **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention with flex's conventions (module doc): (B, H, q, D) in, (B, q, H, D) out."""
    batch, heads, q_len, _ = query.shape
    groups = heads // key.shape[1]
    key, value = (t.repeat_interleave(groups, dim=1) for t in (key, value))
    kv_len = key.shape[2]
    mask = attention_mask
    if isinstance(mask, BlockMask):
        if tuple(mask.seq_lengths) != (q_len, kv_len):
            raise ValueError(f"{NAME}: a BlockMask for {tuple(mask.seq_lengths)} applied to "
                             f"queries x keys {(q_len, kv_len)}")
        mask = create_mask(mask.mask_mod, batch, 1, q_len, kv_len, device=query.device)
    elif mask is not None:
        mask = mask[:, :, :, :kv_len]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    if mask is not None and mask.dtype == torch.bool:
        out = out.masked_fill(~mask.any(-1, keepdim=True), 0.0)
    return out.transpose(1, 2).contiguous(), None


def use_flex_like(model: torch.nn.Module) -> torch.nn.Module:
    """Register ``flex_like`` in both registries and switch ``model`` (all its sub-configs)
    to it."""
    AttentionInterface.register(NAME, flex_like_forward)
    AttentionMaskInterface.register(NAME, flex_like_mask)
    model.set_attn_implementation(NAME)
    return model
