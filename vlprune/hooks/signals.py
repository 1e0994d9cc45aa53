"""Attention signals without eager attention: recompute only the rows a method asks for.

A probe sits on ONE attention module as a forward pre-hook. It keeps references to that call's
inputs (no copy, no compute) and, when a method asks, recomputes ``softmax(q·kᵀ·scale + mask)``
for the requested query rows only, from the module's own projections and RoPE. The model keeps
running its own backend (sdpa, eager or flash) untouched.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from vlprune.hooks.gather import gather_rows


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``cat(-x2, x1)`` on the last dim: the rotation used by LLaMA-style RoPE."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on (B, H, L, d) with cos/sin (B, L, d) (M-RoPE sections are already in cos/sin)."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax in fp32 over the last dim; ``mask`` is bool (True = attend) or additive float."""
    scores = scores.float()
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask.float()
    return scores.softmax(dim=-1)


class ModuleInputProbe:
    """Remembers the first positional (or ``hidden_states``) input of a module in each call,
    e.g. the projector's input: the vision features before projection."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.value: torch.Tensor | None = None

    def install(self) -> RemovableHandle:
        """Register the pre-hook."""
        return self.module.register_forward_pre_hook(self._remember, with_kwargs=True)

    def _remember(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.value = args[0] if args else next(iter(kwargs.values()))

    def clear(self) -> None:
        """Drop the reference."""
        self.value = None


class ModuleOutputProbe(ModuleInputProbe):
    """Remembers a module's output (first element if it returns a tuple), e.g. a decoder
    layer's output hidden states."""

    def install(self) -> RemovableHandle:
        """Register the forward hook."""
        return self.module.register_forward_hook(self._remember_output)

    def _remember_output(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.value = output[0] if isinstance(output, tuple) else output


class TextAttentionProbe:
    """Attention rows of one decoder layer's self-attention, recomputed on request.

    Works for LLaMA (LLaVA, LLaVA-NeXT) and Qwen2-VL / Qwen2.5-VL text attention (GQA, 1-D or
    M-RoPE): both expose ``q_proj``, ``k_proj``, ``head_dim``, ``scaling`` and
    ``num_key_value_groups``, and receive ``position_embeddings=(cos, sin)``.
    """

    def __init__(self, attention: nn.Module) -> None:
        self.attention = attention
        self.inputs: dict[str, Any] | None = None

    def install(self) -> RemovableHandle:
        """Register the pre-hook that remembers the layer's inputs."""
        return self.attention.register_forward_pre_hook(self._remember, with_kwargs=True)

    def _remember(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        self.inputs = {
            "hidden": hidden,
            "position_embeddings": kwargs["position_embeddings"],
            "attention_mask": kwargs.get("attention_mask"),
        }

    def clear(self) -> None:
        """Drop the references to the last call's inputs."""
        self.inputs = None

    @torch.no_grad()
    def rows(self, queries: torch.Tensor) -> torch.Tensor:
        """Attention probabilities of query rows ``queries`` (B, Q) over all keys.

        Returns (B, H, Q, L) float32, identical (to fp tolerance) to the eager weights of the
        same rows; causal and padding masks are applied as the layer applied them.
        """
        if self.inputs is None:
            raise RuntimeError("the probed layer has not run yet in this forward")
        attn = self.attention
        hidden = self.inputs["hidden"]
        batch, length = hidden.shape[:2]
        cos, sin = (t.expand(batch, *t.shape[1:]) for t in self.inputs["position_embeddings"])
        q = attn.q_proj(gather_rows(hidden, queries))
        q = q.view(batch, queries.shape[1], -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(hidden).view(batch, length, -1, attn.head_dim).transpose(1, 2)
        q = apply_rope(q, gather_rows(cos, queries), gather_rows(sin, queries))
        k = apply_rope(k, cos, sin).repeat_interleave(attn.num_key_value_groups, dim=1)
        scores = (q @ k.transpose(2, 3)) * attn.scaling
        return masked_softmax(scores, self._mask_rows(queries, length))

    def _mask_rows(self, queries: torch.Tensor, length: int) -> torch.Tensor:
        mask = self.inputs["attention_mask"] if self.inputs else None
        if isinstance(mask, torch.Tensor) and mask.dim() == 4:
            mask = mask.expand(queries.shape[0], *mask.shape[1:])
            index = queries[:, None, :, None].expand(-1, mask.shape[1], -1, mask.shape[3])
            return mask.gather(2, index)
        keys = torch.arange(length, device=queries.device)
        return (keys[None, None, None, :] <= queries[:, None, :, None])


class VisionAttentionProbe:
    """Attention rows of one vision-encoder layer, recomputed on request.

    A vision forward attends within independent sequences: one per image or crop (CLIP), one
    per image (Qwen full-attention blocks) or per window (Qwen2.5-VL windowed blocks, in window
    order). :meth:`rows` returns one (H, Q, n) tensor per sequence, in the order the layer saw
    them. Subclasses say how to read q and k off the layer.
    """

    def __init__(self, attention: nn.Module) -> None:
        self.attention = attention
        self.inputs: dict[str, Any] | None = None

    def install(self) -> RemovableHandle:
        """Register the pre-hook that remembers the layer's inputs."""
        return self.attention.register_forward_pre_hook(self._remember, with_kwargs=True)

    def _remember(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        self.inputs = {"hidden": hidden, **{k: v for k, v in kwargs.items() if k != "hidden_states"}}

    def clear(self) -> None:
        """Drop the references to the last call's inputs."""
        self.inputs = None

    def query_key(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per sequence: (q, k), each (H, n, d), after any RoPE."""
        raise NotImplementedError

    @torch.no_grad()
    def rows(self, queries: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Per sequence, float32 probabilities (H, Q, n) of query rows ``queries`` (local
        indices, e.g. ``[0]`` for CLIP's CLS), or of every row when None."""
        if self.inputs is None:
            raise RuntimeError("the probed vision layer has not run yet in this forward")
        out = []
        for q, k in self.query_key():
            if queries is not None:
                q = q[:, queries.to(q.device)]
            out.append(((q @ k.transpose(1, 2)) * self._scale()).float().softmax(-1))
        return out

    def _scale(self) -> float:
        return float(getattr(self.attention, "scale", getattr(self.attention, "scaling", 1.0)))


class ClipAttentionProbe(VisionAttentionProbe):
    """CLIP (LLaVA, LLaVA-NeXT): ``q_proj`` / ``k_proj``, no RoPE; one sequence per crop."""

    def query_key(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per crop (CLS first): q, k of shape (H, 1 + patches, d)."""
        attn = self.attention
        hidden = self.inputs["hidden"]
        shape = (*hidden.shape[:-1], -1, attn.head_dim)
        q = attn.q_proj(hidden).view(shape).transpose(1, 2)
        k = attn.k_proj(hidden).view(shape).transpose(1, 2)
        return list(zip(q, k))


class QwenVisionAttentionProbe(VisionAttentionProbe):
    """Qwen2-VL / Qwen2.5-VL vision blocks: fused ``qkv``, 2-D vision RoPE, ``cu_seqlens``."""

    def query_key(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per ``cu_seqlens`` segment: q, k of shape (H, n, d) after the vision RoPE."""
        attn = self.attention
        hidden = self.inputs["hidden"]
        q, k, _ = attn.qkv(hidden).reshape(hidden.shape[0], 3, attn.num_heads, -1).unbind(1)
        cos, sin = (t.unsqueeze(-2).float() for t in self.inputs["position_embeddings"])
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(hidden.dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(hidden.dtype)
        bounds = self.inputs["cu_seqlens"].tolist()
        return [
            (q[a:b].transpose(0, 1), k[a:b].transpose(0, 1))
            for a, b in zip(bounds[:-1], bounds[1:])
        ]
