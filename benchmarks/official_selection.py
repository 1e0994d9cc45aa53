"""The official codes' selection steps, written here from their algorithms for timing only.

Benchmark-only re-implementations (never imported by the package) of what the official
repositories run, to time vlprune against them on identical inputs:

- :func:`mmtok_official`: MMTok's ``mm_coverage_selection`` (github.com/Ironieser/MMTok, release
  ``5b186b6``): L2-normalise in the input dtype, then fp32; ``softmax(sim · (1/τ))`` divided by
  the row count; stacked ``[P; α·Q]``; a TorchScript greedy over the whole matrix per step.
- :func:`flowcut_official_clip`: FlowCut's patched CLIP encoder (github.com/TungChintao/FlowCut,
  ``a2ecd247``, ``llava/model/multimodal_encoder/clip_encoder.py`` era code): every layer runs
  eager attention (the full softmax map, bmm with the values) plus the CLS-value "semantic"
  softmax, and scores / prunes the patches after the layer while they exceed the target.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


@torch.jit.script
def _greedy_official(combined: torch.Tensor, k: int) -> torch.Tensor:
    """The official TorchScript loop: (k,) picks over the columns of ``combined`` (R, n)."""
    rows, n = combined.shape
    best = torch.zeros(rows, dtype=combined.dtype, device=combined.device)
    mask = torch.zeros(n, dtype=combined.dtype, device=combined.device)
    picks = torch.zeros(k, dtype=torch.long, device=combined.device)
    for i in range(k):
        gain = (combined - best.unsqueeze(1)).clamp_min_(0).sum(dim=0)
        gain.add_(mask)
        pick = torch.argmax(gain)
        picks[i] = pick
        mask[pick] = float("-inf")
        best = torch.maximum(best, combined[:, pick])
    return picks


def mmtok_official(text: torch.Tensor, vision: torch.Tensor, vision_pre: torch.Tensor, k: int,
                   tv_temperature: float, vv_temperature: float = 0.2,
                   alpha: float = 0.5) -> torch.Tensor:
    """Sorted (k,) kept columns of one image: ``text`` (m, D) targets, ``vision`` (n, D) and
    ``vision_pre`` (n, D') features."""
    def unit(x: torch.Tensor) -> torch.Tensor:
        return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-8)

    z, x, w = unit(text).float(), unit(vision).float(), unit(vision_pre).float()
    p, q = z @ x.T, w @ w.T
    m, n = p.shape
    p = F.softmax(p * (1.0 / tv_temperature), dim=1) / m
    q = F.softmax(q * (1.0 / vv_temperature), dim=1) / n
    return _greedy_official(torch.cat([p, q * alpha], dim=0), min(k, n)).sort().values


def _clip_layer_official(layer: nn.Module, hidden: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One HF ``CLIPEncoderLayer`` the official way: eager attention; returns the output, the
    head-mean CLS attention over the patches, the head-mean CLS-value softmax and the per-head
    values (B, H, N, d)."""
    attn = layer.self_attn
    batch, length, _ = hidden.shape
    residual = hidden
    x = layer.layer_norm1(hidden)
    shape = (batch, length, attn.num_heads, attn.head_dim)
    q = (attn.q_proj(x) * attn.scale).view(shape).transpose(1, 2)
    k = attn.k_proj(x).view(shape).transpose(1, 2)
    v = attn.v_proj(x).view(shape).transpose(1, 2)
    weights = (q @ k.transpose(2, 3)).softmax(-1)
    semantic = (v[:, :, :1] @ v.transpose(2, 3)).softmax(-1)[:, :, 0]
    out = (weights @ v).transpose(1, 2).reshape(batch, length, -1)
    hidden = residual + attn.out_proj(out)
    hidden = hidden + layer.mlp(layer.layer_norm2(hidden))
    return hidden, weights[:, :, 0, 1:].mean(1), semantic.mean(1), v


@torch.no_grad()
def flowcut_official_clip(tower: nn.Module, pixel_values: torch.Tensor, target: int,
                          feature_layer: int = -2) -> tuple[torch.Tensor, torch.Tensor]:
    """The official FlowCut CLIP forward of an HF ``CLIPVisionModel`` ``tower``: returns the
    feature layer's output (B, 1 + target, D) and the kept patch indices (B, target)."""
    model = getattr(tower, "vision_model", tower)
    hidden = model.pre_layrnorm(model.embeddings(pixel_values))
    layers = model.encoder.layers
    select = len(layers) + feature_layer
    keep = torch.arange(hidden.shape[1] - 1).expand(hidden.shape[0], -1)
    running, features = None, hidden
    for index, layer in enumerate(layers):
        hidden, cls_attention, semantic, v = _clip_layer_official(layer, hidden)
        if index == select:
            features = hidden
        remaining = select - index - 1
        if hidden.shape[1] <= target + 1:
            continue
        density = v.mean(1)[:, 1:].abs().sum(-1)
        score = (cls_attention / cls_attention.sum(-1, keepdim=True)
                 + semantic[:, 1:] / semantic[:, 1:].sum(-1, keepdim=True)) * density
        running = score if running is None else 0.5 * running + 0.5 * score
        if remaining % 2:
            continue
        n = hidden.shape[1]
        if remaining:
            p = cls_attention / cls_attention.sum(-1, keepdim=True)
            rho = (-(p * p.log()).sum(-1) / math.log(p.shape[-1])).tolist()
            drop = max(round((n - 1 - target) / math.sqrt(remaining) * (1 - r**2)) for r in rho)
        else:
            drop = n
        kept = max(n - drop, target + 1) - 1
        idx = running.topk(kept, dim=1).indices.sort(dim=1).values
        patches = hidden[:, 1:].gather(1, idx[..., None].expand(-1, -1, hidden.shape[-1]))
        hidden = torch.cat([hidden[:, :1], patches], 1)
        running = running.gather(1, idx)
        keep = keep.gather(1, idx)
    return features, keep
