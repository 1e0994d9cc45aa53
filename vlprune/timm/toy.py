"""The shipped toy LLaVA's CLIP tower as a timm ``VisionTransformer`` (same weights, same states).

The toy vision tower (``vlprune.eval.toy``: CLIP ViT 336/14, 4 layers, width 64, quick-GELU,
pre-layernorm, pretrained offline with a class-token multi-label objective on the toy scenes)
maps onto timm's CLIP config: fused ``qkv`` = ``cat(q, k, v)``, ``norm_pre`` = the
pre-layernorm, ``norm`` (or ``fc_norm`` with avg pooling) = the post-layernorm. It gives the
timm integration trained weights to measure accuracy on without any download.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlprune.eval.toy.model import CHECKPOINT_DIR, load_toy_model


def clip_to_timm(tower: nn.Module) -> dict[str, torch.Tensor]:
    """State dict of a timm ViT from a transformers ``CLIPVisionModel`` ``tower``; the
    post-layernorm is returned under ``norm.*``."""
    src = {k.removeprefix("vision_model."): v for k, v in tower.state_dict().items()}
    out = {
        "cls_token": src["embeddings.class_embedding"].view(1, 1, -1),
        "pos_embed": src["embeddings.position_embedding.weight"].unsqueeze(0),
        "patch_embed.proj.weight": src["embeddings.patch_embedding.weight"],
    }
    for name, timm_name in (("pre_layrnorm", "norm_pre"), ("post_layernorm", "norm")):
        for p in ("weight", "bias"):
            out[f"{timm_name}.{p}"] = src[f"{name}.{p}"]
    n_layers = 1 + max(int(k.split(".")[2]) for k in src if k.startswith("encoder.layers."))
    for i in range(n_layers):
        layer, block = f"encoder.layers.{i}.", f"blocks.{i}."
        for p in ("weight", "bias"):
            out[f"{block}attn.qkv.{p}"] = torch.cat(
                [src[f"{layer}self_attn.{x}_proj.{p}"] for x in "qkv"])
            pairs = (("self_attn.out_proj", "attn.proj"), ("layer_norm1", "norm1"),
                     ("layer_norm2", "norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2"))
            for hf, tm in pairs:
                out[f"{block}{tm}.{p}"] = src[f"{layer}{hf}.{p}"]
    return out


def toy_vit(global_pool: str = "token", num_classes: int = 0,
            path: str | Path = CHECKPOINT_DIR, **kwargs: Any) -> nn.Module:
    """The toy CLIP tower of the checkpoint at ``path`` as a timm ``VisionTransformer`` (eval,
    float32); ``global_pool`` / ``num_classes`` / ``kwargs`` as timm's (the head, if any, is
    freshly initialised)."""
    from timm.models.vision_transformer import VisionTransformer

    tower = load_toy_model(path).model.vision_tower
    config = tower.config
    model = VisionTransformer(
        img_size=config.image_size, patch_size=config.patch_size, embed_dim=config.hidden_size,
        depth=config.num_hidden_layers, num_heads=config.num_attention_heads,
        mlp_ratio=config.intermediate_size / config.hidden_size, pre_norm=True,
        norm_layer=partial(nn.LayerNorm, eps=config.layer_norm_eps), act_layer="quick_gelu",
        global_pool=global_pool, num_classes=num_classes, **kwargs,
    )
    state = clip_to_timm(tower)
    if isinstance(model.norm, nn.Identity):  # avg pooling: the post-layernorm follows the pool
        state = {k.replace("norm.", "fc_norm.", 1) if k.startswith("norm.") else k: v
                 for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("head.") for k in missing):
        raise RuntimeError(f"toy tower → timm: missing {missing}, unexpected {unexpected}")
    return model.eval()
