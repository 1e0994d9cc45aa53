"""Tiny timm ViTs built from kwargs (nothing downloaded); timm is imported lazily, so this
module imports without it."""

from __future__ import annotations

from typing import Any

import torch

CONFIGS: dict[str, dict[str, Any]] = {
    "cls-token": {},
    "cls-reg2": {"reg_tokens": 2},
    "dinov2-reg": {"reg_tokens": 4, "no_embed_class": True, "init_values": 1e-5},
    "avg-noclass": {"class_token": False, "global_pool": "avg"},
    "siglip-map": {"class_token": False, "global_pool": "map"},
    "clip-prenorm": {"pre_norm": True, "global_pool": "avg", "qk_norm": True},
    "res-post": {"block_fn": "ResPostBlock", "reg_tokens": 1},
}
"""Small versions of the configs timm ships: ViT, +registers, DINOv2-reg, avg pool without a
class token, SigLIP (map pooling, no class token), CLIP (pre-norm) with qk-norm, post-norm blocks
(``ResPostBlock``) with a register. A ``block_fn`` is named by its class in
``timm.models.vision_transformer``."""

IMAGE, PATCH = 64, 8  # an 8x8 grid: 64 patch tokens

METHODS = ["random", "uniform", "hiprune", "todre", "flowcut", "hired", "globalcom2"]
"""Every method that runs on a timm ViT."""

CLASS_TOKEN_METHODS = ("hired", "globalcom2")
"""Methods that score by the class token's attention: ``TypeError`` without one."""


def has_class_token(config: str) -> bool:
    """Whether ``CONFIGS[config]`` builds a ViT with a class token."""
    return CONFIGS[config].get("class_token", True)


def method_configs(methods: list[str]) -> list[tuple[str, str]]:
    """(config, method) for every config and every method of ``methods`` that runs on it."""
    return [
        (config, method)
        for config in CONFIGS
        for method in methods
        if method not in CLASS_TOKEN_METHODS or has_class_token(config)
    ]


def build_vit(depth: int = 4, seed: int = 0, **kwargs: Any) -> torch.nn.Module:
    """A random-weight timm ``VisionTransformer`` (64 px, patch 8, width 32, 4 heads), eval."""
    from timm.models import vision_transformer

    if isinstance(kwargs.get("block_fn"), str):
        kwargs["block_fn"] = getattr(vision_transformer, kwargs["block_fn"])
    torch.manual_seed(seed)
    base = {"img_size": IMAGE, "patch_size": PATCH, "embed_dim": 32, "depth": depth,
            "num_heads": 4, "num_classes": 7}
    return vision_transformer.VisionTransformer(**{**base, **kwargs}).eval()
