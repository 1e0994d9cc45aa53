"""A CPU stand-in for ``flash_attention_2``: flash's conventions, computed with sdpa.

Registered as ``flash_like`` in both transformers registries (``AttentionInterface`` and, with
transformers' own ``flash_attention_mask``, ``AttentionMaskInterface``). The name contains
"flash", so models take their flash code paths (Qwen's vision tower passes ``cu_seq_lens_*``
instead of looping over images). What it follows, as ``_flash_attention_forward`` does:

- the mask is ``None`` (no padding) or a 2-D ``(B, kv)`` padding mask, never 4-D;
- with a mask, padded keys are dropped, the queries are the mask's last ``q`` columns, keys
  beyond the mask's length are cut, and padded query rows come back as zeros (varlen);
- ``cu_seq_lens_q`` / ``cu_seq_lens_k`` kwargs: variable-length sequences over the flattened
  batch; otherwise batch 1 with position ids that are not one increasing run: packed sequences
  starting where the position equals its minimum;
- causal attention is aligned bottom-right (query ``i`` of ``q`` sees keys ``<= i + kv - q``);
- grouped-query attention without repeating keys in the caller.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

NAME = "flash_like"


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
            scale: float | None) -> torch.Tensor:
    """One sequence: q (Tq, H, D), k / v (Tk, Hkv, D) -> (Tq, H, D)."""
    groups = q.shape[1] // k.shape[1]
    k, v = (t.repeat_interleave(groups, dim=1) for t in (k, v))
    mask = None
    if causal:
        rows = torch.arange(q.shape[0], device=q.device)[:, None]
        mask = torch.arange(k.shape[0], device=q.device)[None, :] <= rows + k.shape[0] - q.shape[0]
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         attn_mask=mask, scale=scale)
    return out.transpose(0, 1)


def _varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor,
            cu_k: torch.Tensor, causal: bool, scale: float | None) -> torch.Tensor:
    """Flattened sequences q (Σq, H, D), k / v (Σk, Hkv, D) cut at ``cu_q`` / ``cu_k``."""
    out = q.new_zeros(q.shape)
    bounds = zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(), cu_k[1:].tolist())
    for q0, q1, k0, k1 in bounds:
        if q1 > q0:
            out[q0:q1] = _attend(q[q0:q1], k[k0:k1], v[k0:k1], causal, scale)
    return out


def _padded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
            causal: bool, scale: float | None) -> torch.Tensor:
    """Batch q (B, q, H, D), k / v (B, kv, Hkv, D) under a 2-D padding mask (B, kv')."""
    if mask.dim() != 2:
        raise ValueError(f"{NAME}: flash takes a 2-D padding mask, got {tuple(mask.shape)}")
    mask = mask.bool()
    k, v = k[:, : mask.shape[1]], v[:, : mask.shape[1]]
    q_valid = mask if q.shape[1] == mask.shape[1] else mask[:, -q.shape[1]:]
    out = q.new_zeros(q.shape)
    for b in range(q.shape[0]):
        out[b, q_valid[b]] = _attend(q[b, q_valid[b]], k[b, mask[b]], v[b, mask[b]], causal,
                                     scale)
    return out


def _packed_starts(position_ids: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """Sequence starts of packed sequences read from position ids (batch 1 only), or None."""
    if position_ids is None or batch != 1 or position_ids.shape[-1] == 1:
        return None
    flat = position_ids.reshape(-1)
    increasing = torch.arange(flat.numel(), device=flat.device) + flat.min()
    if not bool((increasing - flat).abs().sum()):
        return None
    return torch.cat([(flat == flat.min()).nonzero().view(-1), flat.new_tensor([flat.numel()])])


def flash_like_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                       value: torch.Tensor, attention_mask: torch.Tensor | None,
                       dropout: float = 0.0, scaling: float | None = None,
                       is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention with flash's conventions (module doc): (B, H, q, D) in, (B, q, H, D) out."""
    causal = module.is_causal if is_causal is None else is_causal
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    batch = q.shape[0]
    if attention_mask is not None:
        return _padded(q, k, v, attention_mask, causal, scaling), None
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None:
        cu_q = cu_k = _packed_starts(kwargs.get("position_ids"), batch)
    if cu_q is not None:
        flat = [t.reshape(-1, *t.shape[-2:]) for t in (q, k, v)]
        return _varlen(*flat, cu_q, cu_k, causal, scaling).view(q.shape), None
    out = torch.stack([_attend(q[b], k[b], v[b], causal, scaling) for b in range(batch)])
    return out, None


def use_flash_like(model: torch.nn.Module) -> torch.nn.Module:
    """Register ``flash_like`` in both registries and switch ``model`` (all its sub-configs) to
    it. The config is set directly: transformers would look for a flash kernel package for
    any name containing "flash" in ``set_attn_implementation``."""
    AttentionInterface.register(NAME, flash_like_forward)
    AttentionMaskInterface.register(NAME, flash_attention_mask)
    model.config._attn_implementation = NAME
    return model
