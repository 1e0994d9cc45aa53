"""Real architectures with random weights, built from configs written here (no hub access).

Full-size presets copy the published ``config.json`` of the Hugging Face checkpoints named in
each builder. ``*-mini`` presets keep everything that decides token counts (image size, patch
size, AnyRes pinpoints, merge / window sizes, full-attention blocks, numbers of vision and
decoder layers, GQA) and shrink only the widths and the vocabulary, so they run on a 2-core CPU
and a method cuts them at the same layers, to the same counts, as the full model.

:func:`synthetic_inputs` builds prompts directly (``input_ids`` with the right number of image
placeholders, random ``pixel_values`` and the family's extra inputs) from any config of the four
families: presets and real checkpoints alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import (
    AutoModelForImageTextToText,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
    unpad_image,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from vlprune.adapters import get_adapter

__all__ = [
    "PRESETS",
    "ImageGeometry",
    "Preset",
    "ProfileModel",
    "build_preset_model",
    "image_geometry",
    "load_model",
    "synthetic_inputs",
]

MODEL_CLASSES: dict[str, type[PreTrainedModel]] = {
    "llava": LlavaForConditionalGeneration,
    "llava_next": LlavaNextForConditionalGeneration,
    "qwen2_vl": Qwen2VLForConditionalGeneration,
    "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
}

# Special-token ids of the mini presets: those of ``vlprune.testing.tiny_tokenizer``.
_MINI_IDS = {"pad": 0, "bos": 1, "eos": 2, "image": 4, "vision_start": 5, "vision_end": 6,
             "image_pad": 7, "video_pad": 8}
_MINI_VOCAB = 1024
_QWEN_MAX_PIXELS = 28 * 28 * 16384  # Qwen2-VL/2.5-VL preprocessor_config.json "max_pixels"
_QWEN_MIN_PIXELS = 56 * 56
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


@dataclass(frozen=True)
class Preset:
    """A named architecture: family, config builder and default image (width, height).

    ``twin``: for a full-size preset, the mini preset with identical token geometry (used to
    obtain a method's per-layer token counts on CPU when the full model cannot run).
    """

    name: str
    family: str
    build: Callable[[bool], PretrainedConfig]
    image_size: tuple[int, int]
    mini: bool
    twin: str | None = None

    def config(self) -> PretrainedConfig:
        """A fresh config of this preset."""
        return self.build(self.mini)


def _register(name: str, family: str, build: Callable[[bool], PretrainedConfig],
              image: tuple[int, int], mini_image: tuple[int, int]) -> dict[str, Preset]:
    return {
        name: Preset(name, family, build, image, mini=False, twin=f"{name}-mini"),
        f"{name}-mini": Preset(f"{name}-mini", family, build, mini_image, mini=True),
    }


# Default images: LLaVA-1.5 always sees 336 px (576 tokens); LLaVA-NeXT 672x672 (5 crops,
# 2928 tokens); Qwen 672x672 (48x48 patches, 576 merged tokens). The NeXT and Qwen2-VL minis
# default to smaller images (1176 and 256 tokens) to stay CPU-friendly; pass --image-size to
# match the full preset exactly.
PRESETS: dict[str, Preset] = {
    **_register("llava-1.5-7b", "llava", llava_15_7b, (336, 336), (336, 336)),
    **_register("llava-next-7b", "llava_next", llava_next_7b, (672, 672), (336, 336)),
    **_register("qwen2-vl-7b", "qwen2_vl", qwen2_vl_7b, (672, 672), (448, 448)),
    **_register("qwen2.5-vl-7b", "qwen2_5_vl", qwen2_5_vl_7b, (672, 672), (672, 672)),
}


_FULL = {"llava": "llava-1.5-7b", "llava_next": "llava-next-7b", "qwen2_vl": "qwen2-vl-7b",
         "qwen2_5_vl": "qwen2.5-vl-7b"}


@dataclass
class ProfileModel:
    """A model to profile: the module, its config, family and default image size (a real
    checkpoint takes its family's preset default)."""

    name: str
    family: str
    config: PretrainedConfig
    model: torch.nn.Module
    image_size: tuple[int, int]


def build_preset_model(preset: Preset, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                       attn_implementation: str = "sdpa", seed: int = 0) -> PreTrainedModel:
    """Random-weight model of ``preset`` on ``device`` (``"meta"``: shapes only, no memory)."""
    config = preset.config()
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        model = MODEL_CLASSES[preset.family]._from_config(
            config, attn_implementation=attn_implementation, dtype=dtype)
    return model.eval()


def load_model(name: str, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
               attn_implementation: str = "sdpa") -> ProfileModel:
    """A preset name (random weights) or a local path / hub id of a real checkpoint."""
    if name in PRESETS:
        preset = PRESETS[name]
        model = build_preset_model(preset, device=device, dtype=dtype,
                                   attn_implementation=attn_implementation)
        return ProfileModel(name, preset.family, model.config, model, preset.image_size)
    model = AutoModelForImageTextToText.from_pretrained(
        name, dtype=dtype, attn_implementation=attn_implementation).to(device).eval()
    family = get_adapter(model).family
    return ProfileModel(name, family, model.config, model, PRESETS[_FULL[family]].image_size)


@dataclass(frozen=True)
class ImageGeometry:
    """What the vision tower processes for one image.

    ``tokens``: image placeholders in the prompt; ``crops``: CLIP sequences (1 for LLaVA-1.5,
    thumbnail + crops for NeXT) of ``crop_patches`` patches each (plus CLS); ``grid_thw``:
    Qwen patch grid (t, h, w).
    """

    tokens: int
    crops: int = 1
    crop_patches: int = 0
    grid_thw: tuple[int, int, int] | None = None
    size: tuple[int, int] | None = None  # (height, width) for LLaVA-NeXT


def image_geometry(config: PretrainedConfig, family: str, image_size: tuple[int, int]
                   ) -> ImageGeometry:
    """Token geometry of one ``image_size`` = (width, height) image for ``config``."""
    width, height = image_size
    if family in ("llava", "llava_next"):
        vision = config.vision_config
        side = vision.image_size // vision.patch_size
        extra = 0 if config.vision_feature_select_strategy == "default" else 1
        if family == "llava":
            return ImageGeometry(tokens=side * side + extra, crop_patches=side * side)
        pinpoints = config.image_grid_pinpoints
        crops = image_size_to_num_patches((height, width), pinpoints, vision.image_size)
        grid_h, grid_w = get_anyres_image_grid_shape((height, width), pinpoints, vision.image_size)
        rows, cols = unpad_image(torch.empty(0, grid_h * side, grid_w * side),
                                 (height, width)).shape[1:]
        return ImageGeometry(tokens=side * side + rows * (cols + 1), crops=crops,
                             crop_patches=side * side, size=(height, width))
    vision = config.vision_config
    factor = vision.patch_size * vision.spatial_merge_size
    h, w = smart_resize(height, width, factor=factor, min_pixels=_QWEN_MIN_PIXELS,
                        max_pixels=_QWEN_MAX_PIXELS)
    grid = (1, h // vision.patch_size, w // vision.patch_size)
    return ImageGeometry(tokens=grid[1] * grid[2] // vision.spatial_merge_size ** 2,
                         grid_thw=grid)


def _word_ids(config: PretrainedConfig, gen: torch.Generator, n: int) -> list[int]:
    """``n`` random ordinary token ids of ``config``'s vocabulary (see :func:`synthetic_inputs`)."""
    high = min(1000, config.get_text_config().vocab_size)
    special = {
        getattr(cfg, key, None) for cfg in (config, config.get_text_config())
        for key in ("image_token_id", "video_token_id", "vision_start_token_id",
                    "vision_end_token_id", "bos_token_id", "eos_token_id", "pad_token_id")
    }
    words = torch.tensor([i for i in range(min(12, high // 2), high) if i not in special])
    return words[torch.randint(len(words), (n,), generator=gen)].tolist()


def synthetic_inputs(config: PretrainedConfig, family: str, *, image_size: tuple[int, int],
                     text_tokens: int = 64, batch: int = 1, seed: int = 0,
                     device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
                     ) -> dict[str, torch.Tensor]:
    """A batch of identical prompts: one image and ``text_tokens`` other tokens each.

    LLaVA / NeXT: ``[bos, image x N, words]``; Qwen: ``[vision_start, image_pad x N,
    vision_end, words]``. Words are random ids below ``min(1000, vocab_size)``, from 12 up
    (fewer only in a tiny vocabulary), never one of the config's special token ids. Pixels are
    standard normal (cost does not depend on them).
    """
    geom = image_geometry(config, family, image_size)
    gen = torch.Generator().manual_seed(seed)
    image_id = int(config.image_token_id)
    if family in ("llava", "llava_next"):
        bos = config.text_config.bos_token_id
        head = [bos] if bos is not None else []
        tail: list[int] = []
    else:
        head, tail = [int(config.vision_start_token_id)], [int(config.vision_end_token_id)]
    n_words = max(0, text_tokens - len(head) - len(tail))
    words = _word_ids(config, gen, n_words)
    ids = torch.tensor([head + [image_id] * geom.tokens + tail + words] * batch)
    inputs: dict[str, torch.Tensor] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    vision = config.vision_config
    if family == "llava":
        shape = (batch, 3, vision.image_size, vision.image_size)
        inputs["pixel_values"] = torch.randn(shape, generator=gen)
    elif family == "llava_next":
        shape = (batch, geom.crops, 3, vision.image_size, vision.image_size)
        inputs["pixel_values"] = torch.randn(shape, generator=gen)
        inputs["image_sizes"] = torch.tensor([list(geom.size)] * batch)
    else:
        t, h, w = geom.grid_thw
        patch = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
        inputs["pixel_values"] = torch.randn(batch * t * h * w, patch, generator=gen)
        inputs["image_grid_thw"] = torch.tensor([list(geom.grid_thw)] * batch)
        inputs["mm_token_type_ids"] = (ids == image_id).long()
    return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device))
            for k, v in inputs.items()}
