"""Queries and keys of a decoder self-attention, read off its projections' outputs (before RoPE).

LLaMA / Qwen2: ``q_proj`` / ``k_proj`` split into heads. Qwen3-VL and Qwen3.5 add a per-head
RMSNorm (``q_norm`` / ``k_norm``) before RoPE; Qwen3.5's ``q_proj`` also emits an output gate,
interleaved per head as ``[query | gate]`` (``Qwen3_5Attention.forward``), of which only the
query part enters the scores. The projections' outputs are the layer's own (kept from its call)
or projected by the probe; either way the same functions turn them into heads.
"""

from __future__ import annotations

import torch
from torch import nn


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    return x.view(*x.shape[:-1], -1, head_dim)


def text_queries(attention: nn.Module, projected: torch.Tensor) -> torch.Tensor:
    """(B, H, L, d) queries before RoPE from ``projected`` (B, L, out), ``q_proj``'s output."""
    head_dim = attention.head_dim
    if projected.shape[-1] == 2 * attention.config.num_attention_heads * head_dim:  # gated
        q = _heads(projected, 2 * head_dim)[..., :head_dim]
    else:
        q = _heads(projected, head_dim)
    norm = getattr(attention, "q_norm", None)
    return (q if norm is None else norm(q)).transpose(1, 2)


def text_keys(attention: nn.Module, projected: torch.Tensor) -> torch.Tensor:
    """(B, H_kv, L, d) keys before RoPE from ``projected`` (B, L, out), ``k_proj``'s output."""
    k = _heads(projected, attention.head_dim)
    norm = getattr(attention, "k_norm", None)
    return (k if norm is None else norm(k)).transpose(1, 2)
