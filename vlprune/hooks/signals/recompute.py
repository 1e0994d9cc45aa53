"""The arithmetic every attention probe shares: RoPE and a masked softmax in fp32."""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``cat(-x2, x1)`` on the last dim: the rotation used by LLaMA-style RoPE."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on (B, H, L, d) with cos/sin (B, L, r) (M-RoPE sections are already in cos/sin);
    partial rotary (r < d, Qwen3.5) rotates the first r dims and passes the rest."""
    rotary = cos.shape[-1]
    if rotary < x.shape[-1]:
        return torch.cat([apply_rope(x[..., :rotary], cos, sin), x[..., rotary:]], dim=-1)
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


def apply_vision_rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """Qwen vision RoPE on (S, H, d) with cos/sin (S, d), in fp32 as the model computes it."""
    cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
    return (x.float() * cos + rotate_half(x.float()) * sin).to(x.dtype)


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax in fp32 over the last dim; ``mask`` is bool (True = attend) or additive float."""
    scores = scores.float()
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask.float()
    return scores.softmax(dim=-1)
