"""Tiny configs and random-weight models of every family, built offline.

The shared vocabulary (:data:`SPECIAL_TOKENS`, then ``w0`` .. ``w999``; the tokenizer is in
``vlprune.testing.processors``) fixes the special-token ids every config uses; vision-tower
geometry the processors must match (``CLIP_VISION``, ``SIGLIP_VISION``, the AnyRes pinpoints) is
defined here once.
"""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3_5Config,
    Qwen3_5ForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
    SiglipVisionConfig,
)

FAMILIES: tuple[str, ...] = (
    "llava",
    "llava_next",
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "qwen3_vl_moe",
    "llava_onevision",
    "qwen3_5",
)
LLAVA_FAMILIES: tuple[str, ...] = ("llava", "llava_next", "llava_onevision")
"""Families prompted with ``<image>`` (the others are Qwen: ``<|vision_start|>...``)."""

SPECIAL_TOKENS: tuple[str, ...] = (
    "<pad>",
    "<s>",
    "</s>",
    "<unk>",
    "<image>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
)
N_WORDS = 1000
VOCAB_SIZE = 1024

_TEXT = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
}
CLIP_VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "image_size": 84,
    "patch_size": 14,
}
NEXT_PINPOINTS = [[84, 168], [168, 84], [168, 168]]
"""LLaVA-NeXT AnyRes resolutions (height, width) of the tiny CLIP tower (84 px crops)."""
SIGLIP_VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "image_size": 48,
    "patch_size": 8,
    "vision_use_head": False,
}
ONEVISION_PINPOINTS = [[48, 96], [96, 48], [96, 96]]
"""LLaVA-OneVision AnyRes resolutions of the tiny SigLIP tower (48 px crops)."""

_MODEL_CLASSES: dict[str, type[PreTrainedModel]] = {
    "llava": LlavaForConditionalGeneration,
    "llava_next": LlavaNextForConditionalGeneration,
    "qwen2_vl": Qwen2VLForConditionalGeneration,
    "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
    "qwen3_vl": Qwen3VLForConditionalGeneration,
    "qwen3_vl_moe": Qwen3VLMoeForConditionalGeneration,
    "llava_onevision": LlavaOnevisionForConditionalGeneration,
    "qwen3_5": Qwen3_5ForConditionalGeneration,
}


def check_family(family: str) -> None:
    """``ValueError`` unless ``family`` is one of :data:`FAMILIES`."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def token_id(token: str) -> int:
    """Id of a special token in the shared vocabulary."""
    return SPECIAL_TOKENS.index(token)


def _mrope_section(head_dim: int) -> list[int]:
    """M-RoPE split (temporal, height, width) of the ``head_dim // 2`` rotary frequencies."""
    spatial = 3 * head_dim // 16
    return [head_dim // 2 - 2 * spatial, spatial, spatial]


def tiny_config(family: str, **text_overrides: object) -> PretrainedConfig:
    """Composite config of a tiny ``family`` model; ``text_overrides`` update the text config
    (LLaVA-OneVision: ``vision_aspect_ratio`` sets the top-level option of that name).

    The projector / merger output follows the (possibly overridden) text ``hidden_size``.
    """
    check_family(family)
    aspect_ratio = text_overrides.pop("vision_aspect_ratio", "anyres_max_9")
    text = {
        **_TEXT,
        "pad_token_id": token_id("<pad>"),
        "bos_token_id": token_id("<s>"),
        "eos_token_id": token_id("</s>"),
        **text_overrides,
    }
    special_ids = {key: text[key] for key in ("pad_token_id", "bos_token_id", "eos_token_id")}
    if family in ("llava", "llava_next"):
        common = {
            "vision_config": CLIPVisionConfig(**CLIP_VISION),
            "text_config": LlamaConfig(**text),
            "image_token_id": token_id("<image>"),
            "vision_feature_layer": -2,
            "vision_feature_select_strategy": "default",
            "image_seq_length": (CLIP_VISION["image_size"] // CLIP_VISION["patch_size"]) ** 2,
            **special_ids,
        }
        if family == "llava":
            return LlavaConfig(**common)
        return LlavaNextConfig(**common, image_grid_pinpoints=NEXT_PINPOINTS)
    if family == "llava_onevision":
        return LlavaOnevisionConfig(
            vision_config=SiglipVisionConfig(**SIGLIP_VISION).to_dict(),
            text_config=Qwen2Config(**text).to_dict(),
            image_token_index=token_id("<image>"),
            video_token_index=token_id("<|video_pad|>"),
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
            image_grid_pinpoints=ONEVISION_PINPOINTS,
            vision_aspect_ratio=aspect_ratio,
            **special_ids,
        )

    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": _mrope_section(head_dim)}
    if family == "qwen3_5":  # half-rotary (the released models rotate a quarter of each head)
        rope.update(mrope_interleaved=True, partial_rotary_factor=0.5,
                    mrope_section=_mrope_section(head_dim // 2))
    text.setdefault("rope_parameters", rope)
    vision_ids = {
        "image_token_id": token_id("<|image_pad|>"),
        "video_token_id": token_id("<|video_pad|>"),
        "vision_start_token_id": token_id("<|vision_start|>"),
        "vision_end_token_id": token_id("<|vision_end|>"),
    }
    if family == "qwen2_vl":
        vision = {
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": text["hidden_size"],
            "mlp_ratio": 2,
            "num_heads": 4,
        }
        return Qwen2VLConfig(text_config=text, vision_config=vision, **vision_ids, **special_ids)
    if family == "qwen2_5_vl":
        vision = {
            "depth": 4,
            "hidden_size": 32,
            "intermediate_size": 64,
            "out_hidden_size": text["hidden_size"],
            "num_heads": 4,
            "window_size": 112,
            "fullatt_block_indexes": [1, 3],
        }
        return Qwen2_5_VLConfig(
            text_config=text, vision_config=vision, **vision_ids, **special_ids
        )
    vision = {
        "depth": 4,
        "hidden_size": 32,
        "intermediate_size": 64,
        "out_hidden_size": text["hidden_size"],
        "num_heads": 4,
        "patch_size": 16,
        "num_position_embeddings": 64,
        "deepstack_visual_indexes": [0, 1, 2],
    }
    text.setdefault("head_dim", head_dim)
    if family == "qwen3_5":
        return _qwen3_5_config(text, vision, {**vision_ids, **special_ids})
    if family == "qwen3_vl":
        return Qwen3VLConfig(text_config=text, vision_config=vision, **vision_ids, **special_ids)
    moe = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}
    return Qwen3VLMoeConfig(
        text_config={**moe, **text}, vision_config=vision, **vision_ids, **special_ids
    )


_QWEN3_5_LINEAR = {
    "layer_types": ["linear_attention", "full_attention", "full_attention", "linear_attention"],
    "linear_key_head_dim": 8,
    "linear_value_head_dim": 8,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
}


def _qwen3_5_config(text: dict, vision: dict, ids: dict) -> PretrainedConfig:
    """Qwen3.5: Qwen3-VL's vision tower without DeepStack; a hybrid decoder whose layer types
    repeat ``linear, full, full, linear`` over the (possibly overridden) depth."""
    types = _QWEN3_5_LINEAR["layer_types"]
    linear = {**_QWEN3_5_LINEAR,
              "layer_types": [types[i % 4] for i in range(text["num_hidden_layers"])]}
    vision = {k: v for k, v in vision.items() if k != "deepstack_visual_indexes"}
    return Qwen3_5Config(text_config={**linear, **text}, vision_config=vision, **ids)


def tiny_model(
    family: str, *, attn_implementation: str = "sdpa", seed: int = 0, **text_overrides: object
) -> PreTrainedModel:
    """Random-weight float32 ``family`` model in eval mode; equal ``seed`` -> identical weights.

    The global torch RNG state is left untouched. ``generation_config`` inherits the pad / bos /
    eos ids from the config, so ``generate`` needs no extra arguments.
    """
    config = tiny_config(family, **text_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _MODEL_CLASSES[family]._from_config(
            config, attn_implementation=attn_implementation, dtype=torch.float32
        )
    return model.eval()
