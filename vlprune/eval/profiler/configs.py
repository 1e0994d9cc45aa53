"""Configs of the profiler presets: published architectures, built here (no hub access).

Full-size builders copy the published ``config.json`` of the Hugging Face checkpoints named in
each docstring. With ``mini=True`` they keep everything that decides token counts (image size,
patch size, AnyRes pinpoints and ``anyres_max``, merge / window sizes, full-attention blocks,
DeepStack layers, numbers of vision and decoder layers, GQA ratio, experts per token) and shrink
only the widths, the number of experts and the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaNextConfig,
    LlavaOnevisionConfig,
    Qwen2_5_VLConfig,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen3VLConfig,
    Qwen3VLMoeConfig,
    SiglipVisionConfig,
)

__all__ = [
    "LLAVA_NEXT_PINPOINTS",
    "llava_15_7b",
    "llava_next_7b",
    "llava_onevision_7b",
    "qwen2_5_vl_7b",
    "qwen2_vl_7b",
    "qwen3_vl_8b",
    "qwen3_vl_30b_a3b",
]

# Special-token ids of the mini presets: those of ``vlprune.testing.tiny_tokenizer``.
_MINI_IDS = {"pad": 0, "bos": 1, "eos": 2, "image": 4, "vision_start": 5, "vision_end": 6,
             "image_pad": 7, "video_pad": 8}
_MINI_VOCAB = 1024
LLAVA_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


@dataclass(frozen=True)
class Widths:
    """The sizes a mini preset shrinks: text hidden / MLP / heads / KV heads and vision width."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vision_hidden: int
    vision_intermediate: int
    vision_heads: int


# LLaVA-1.5-7B / LLaVA-NeXT-7B (Vicuna-7B, CLIP ViT-L/14-336) and their mini twins.
_LLAVA_FULL = Widths(4096, 11008, 32, 32, 1024, 4096, 16)
_LLAVA_MINI = Widths(64, 172, 4, 4, 32, 128, 4)
# Qwen2-VL-7B / Qwen2.5-VL-7B (Qwen2-7B text) and their mini twins.
_QWEN_FULL = Widths(3584, 18944, 28, 4, 1280, 3420, 16)
_QWEN_MINI = Widths(64, 336, 4, 2, 32, 86, 4)


def _llava_parts(w: Widths, mini: bool) -> dict[str, Any]:
    """Config parts shared by LLaVA-1.5-7B and LLaVA-NeXT-7B (llava-hf ``config.json``)."""
    ids = ({"image": _MINI_IDS["image"], "pad": 0, "bos": 1, "eos": 2} if mini
           else {"image": 32000, "pad": 32001, "bos": 1, "eos": 2})
    text = LlamaConfig(
        vocab_size=_MINI_VOCAB if mini else 32064,
        hidden_size=w.hidden,
        intermediate_size=w.intermediate,
        num_hidden_layers=32,
        num_attention_heads=w.heads,
        num_key_value_heads=w.kv_heads,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        pad_token_id=ids["pad"],
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
    )
    vision = CLIPVisionConfig(
        hidden_size=w.vision_hidden,
        intermediate_size=w.vision_intermediate,
        num_hidden_layers=24,
        num_attention_heads=w.vision_heads,
        image_size=336,
        patch_size=14,
        projection_dim=768,
        hidden_act="quick_gelu",
    )
    return {
        "vision_config": vision,
        "text_config": text,
        "image_token_id": ids["image"],
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "image_seq_length": 576,
        "pad_token_id": ids["pad"],
        "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"],
    }


def llava_15_7b(mini: bool = False) -> LlavaConfig:
    """``llava-hf/llava-1.5-7b-hf`` config.json: CLIP ViT-L/14-336 (24 layers, 1024 wide,
    16 heads, MLP 4096), 2-layer GELU projector, Vicuna-7B (32 layers, 4096 wide, 32 heads,
    MLP 11008, vocab 32064 incl. added tokens), feature layer -2, 576 tokens per image."""
    return LlavaConfig(**_llava_parts(_LLAVA_MINI if mini else _LLAVA_FULL, mini))


def llava_next_7b(mini: bool = False) -> LlavaNextConfig:
    """``llava-hf/llava-v1.6-vicuna-7b-hf`` config.json: the LLaVA-1.5-7B towers with AnyRes
    pinpoints [[336,672],[672,336],[672,672],[1008,336],[336,1008]]."""
    parts = _llava_parts(_LLAVA_MINI if mini else _LLAVA_FULL, mini)
    return LlavaNextConfig(**parts, image_grid_pinpoints=LLAVA_NEXT_PINPOINTS)


def _qwen_parts(w: Widths, mini: bool, max_positions: int) -> dict[str, Any]:
    """Text config and ids shared by Qwen2-VL-7B and Qwen2.5-VL-7B (Qwen2-7B text model)."""
    ids = (dict(_MINI_IDS) if mini else {
        "pad": 151643, "bos": 151643, "eos": 151645, "image_pad": 151655, "video_pad": 151656,
        "vision_start": 151652, "vision_end": 151653})
    head_dim = w.hidden // w.heads
    spatial = 3 * head_dim // 16  # [16, 24, 24] at head_dim 128, as in config.json
    text = {
        "vocab_size": _MINI_VOCAB if mini else 152064,
        "hidden_size": w.hidden,
        "intermediate_size": w.intermediate,
        "num_hidden_layers": 28,
        "num_attention_heads": w.heads,
        "num_key_value_heads": w.kv_heads,
        "max_position_embeddings": max_positions,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                            "mrope_section": [head_dim // 2 - 2 * spatial, spatial, spatial]},
        "pad_token_id": ids["pad"],
        "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"],
    }
    return {
        "text_config": text,
        "image_token_id": ids["image_pad"],
        "video_token_id": ids["video_pad"],
        "vision_start_token_id": ids["vision_start"],
        "vision_end_token_id": ids["vision_end"],
        "pad_token_id": ids["pad"],
        "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"],
        "tie_word_embeddings": False,
    }


def qwen2_vl_7b(mini: bool = False) -> Qwen2VLConfig:
    """``Qwen/Qwen2-VL-7B-Instruct`` config.json: ViT with 32 blocks, embed 1280, 16 heads,
    MLP ratio 4 (QuickGELU), patch 14, temporal patch 2, 2x2 merger to 3584; text 28 layers,
    hidden 3584, 28 heads, 4 KV heads, MLP 18944, vocab 152064, M-RoPE [16, 24, 24]."""
    w = _QWEN_MINI if mini else _QWEN_FULL
    vision = {"depth": 32, "embed_dim": w.vision_hidden, "hidden_size": w.hidden, "mlp_ratio": 4,
              "num_heads": w.vision_heads, "in_channels": 3, "patch_size": 14,
              "spatial_merge_size": 2, "temporal_patch_size": 2, "hidden_act": "quick_gelu"}
    return Qwen2VLConfig(vision_config=vision, **_qwen_parts(w, mini, 32768))


def qwen2_5_vl_7b(mini: bool = False) -> Qwen2_5_VLConfig:
    """``Qwen/Qwen2.5-VL-7B-Instruct`` config.json: ViT with 32 blocks, hidden 1280, 16 heads,
    gated SiLU MLP 3420, RMSNorm, window 112 px with full attention in blocks 7/15/23/31,
    2x2 merger to 3584; text as Qwen2-VL-7B (max positions 128000)."""
    w = _QWEN_MINI if mini else _QWEN_FULL
    vision = {"depth": 32, "hidden_size": w.vision_hidden, "intermediate_size":
              w.vision_intermediate, "num_heads": w.vision_heads, "in_channels": 3,
              "out_hidden_size": w.hidden, "patch_size": 14, "spatial_merge_size": 2,
              "temporal_patch_size": 2, "window_size": 112,
              "fullatt_block_indexes": [7, 15, 23, 31], "hidden_act": "silu",
              "tokens_per_second": 2}
    return Qwen2_5_VLConfig(vision_config=vision, **_qwen_parts(w, mini, 128000))




# LLaVA-OneVision-7B (Qwen2-7B text, SigLIP-so400m/14-384 with its last layer removed).
_SIGLIP_FULL = Widths(3584, 18944, 28, 4, 1152, 4304, 16)
_SIGLIP_MINI = Widths(64, 336, 4, 2, 32, 120, 4)
ONEVISION_PINPOINTS = [[384 * h, 384 * w] for h in range(1, 7) for w in range(1, 7)]


def llava_onevision_7b(mini: bool = False) -> LlavaOnevisionConfig:
    """``llava-hf/llava-onevision-qwen2-7b-ov-hf`` config.json: SigLIP (26 layers, 1152 wide,
    16 heads, MLP 4304, 384 px, patch 14: 729 patches per crop, no CLS), 2-layer GELU projector,
    Qwen2-7B text (28 layers, 3584 wide, 28 heads, 4 KV heads, MLP 18944, vocab 152128),
    feature layer -1 (``full``), AnyRes pinpoints 384..2304 px, ``anyres_max_9``."""
    w = _SIGLIP_MINI if mini else _SIGLIP_FULL
    ids = ({"image": _MINI_IDS["image"], "video": _MINI_IDS["video_pad"], "pad": 0, "bos": 1,
            "eos": 2} if mini else
           {"image": 151646, "video": 151647, "pad": 151643, "bos": 151643, "eos": 151645})
    text = Qwen2Config(
        vocab_size=_MINI_VOCAB if mini else 152128, hidden_size=w.hidden,
        intermediate_size=w.intermediate, num_hidden_layers=28, num_attention_heads=w.heads,
        num_key_value_heads=w.kv_heads, max_position_embeddings=32768, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        pad_token_id=ids["pad"], bos_token_id=ids["bos"], eos_token_id=ids["eos"],
    )
    vision = SiglipVisionConfig(
        hidden_size=w.vision_hidden, intermediate_size=w.vision_intermediate,
        num_hidden_layers=26, num_attention_heads=w.vision_heads, image_size=384, patch_size=14,
        vision_use_head=False,
    )
    return LlavaOnevisionConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(),
        image_token_index=ids["image"], video_token_index=ids["video"],
        projector_hidden_act="gelu", vision_feature_layer=-1,
        vision_feature_select_strategy="full", image_grid_pinpoints=ONEVISION_PINPOINTS,
        vision_aspect_ratio="anyres_max_9", tie_word_embeddings=False,
        pad_token_id=ids["pad"], bos_token_id=ids["bos"], eos_token_id=ids["eos"],
    )


@dataclass(frozen=True)
class _Qwen3Text:
    """Qwen3 text sizes: hidden, MLP, heads, KV heads, head dim and (MoE) experts."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    experts: int = 0
    experts_per_token: int = 0
    moe_intermediate: int = 0


_QWEN3_VISION_FULL = {"hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16}
_QWEN3_VISION_MINI = {"hidden_size": 32, "intermediate_size": 120, "num_heads": 4}


def _qwen3_vl_parts(t: _Qwen3Text, mini: bool, layers: int) -> dict[str, Any]:
    """Config parts shared by Qwen3-VL-8B and Qwen3-VL-30B-A3B: the 27-block patch-16 ViT
    with DeepStack from blocks 8/16/24, interleaved M-RoPE [24, 20, 20] of head dim 128."""
    ids = (dict(_MINI_IDS) if mini else {
        "pad": 151643, "bos": 151643, "eos": 151645, "image_pad": 151655, "video_pad": 151656,
        "vision_start": 151652, "vision_end": 151653})
    spatial = 5 * t.head_dim // 32  # [24, 20, 20] at head dim 128
    text = {
        "vocab_size": _MINI_VOCAB if mini else 151936, "hidden_size": t.hidden,
        "intermediate_size": t.intermediate, "num_hidden_layers": layers,
        "num_attention_heads": t.heads, "num_key_value_heads": t.kv_heads,
        "head_dim": t.head_dim, "max_position_embeddings": 262144, "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "rope_parameters": {"rope_type": "default", "rope_theta": 5e6, "mrope_interleaved": True,
                            "mrope_section": [t.head_dim // 2 - 2 * spatial, spatial, spatial]},
        "pad_token_id": ids["pad"], "bos_token_id": ids["bos"], "eos_token_id": ids["eos"],
    }
    if t.experts:
        text.update(num_experts=t.experts, num_experts_per_tok=t.experts_per_token,
                    moe_intermediate_size=t.moe_intermediate, decoder_sparse_step=1,
                    mlp_only_layers=[])
    vision = {**(_QWEN3_VISION_MINI if mini else _QWEN3_VISION_FULL), "depth": 27,
              "hidden_act": "gelu_pytorch_tanh", "in_channels": 3, "patch_size": 16,
              "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": t.hidden,
              "num_position_embeddings": 2304, "deepstack_visual_indexes": [8, 16, 24]}
    return {
        "text_config": text, "vision_config": vision, "image_token_id": ids["image_pad"],
        "video_token_id": ids["video_pad"], "vision_start_token_id": ids["vision_start"],
        "vision_end_token_id": ids["vision_end"], "tie_word_embeddings": False,
        "pad_token_id": ids["pad"], "bos_token_id": ids["bos"], "eos_token_id": ids["eos"],
    }


def qwen3_vl_8b(mini: bool = False) -> Qwen3VLConfig:
    """``Qwen/Qwen3-VL-8B-Instruct`` config.json: ViT with 27 blocks, hidden 1152, 16 heads,
    MLP 4304, patch 16, 2x2 merger to 4096, DeepStack blocks 8/16/24; Qwen3-8B text with 36
    layers, hidden 4096, 32 heads of 128, 8 KV heads, MLP 12288, vocab 151936."""
    text = (_Qwen3Text(64, 192, 4, 1, 16) if mini else _Qwen3Text(4096, 12288, 32, 8, 128))
    return Qwen3VLConfig(**_qwen3_vl_parts(text, mini, 36))


def qwen3_vl_30b_a3b(mini: bool = False) -> Qwen3VLMoeConfig:
    """``Qwen/Qwen3-VL-30B-A3B-Instruct`` config.json: the Qwen3-VL ViT (merger to 2048);
    Qwen3-30B-A3B text with 48 sparse-MoE layers, hidden 2048, 32 heads of 128, 4 KV heads,
    128 experts of MLP 768 with 8 active per token, vocab 151936 (mini: 16 experts, 8 active)."""
    text = (_Qwen3Text(64, 192, 8, 1, 8, 16, 8, 24) if mini else
            _Qwen3Text(2048, 6144, 32, 4, 128, 128, 8, 768))
    return Qwen3VLMoeConfig(**_qwen3_vl_parts(text, mini, 48))
