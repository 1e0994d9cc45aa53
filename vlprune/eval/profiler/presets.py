"""Named real architectures with random weights (configs in ``profiler.configs``; no hub access).

Full-size presets copy the published ``config.json`` of the Hugging Face checkpoints named in
each builder. ``*-mini`` presets keep everything that decides token counts (image size, patch
size, AnyRes pinpoints, merge / window sizes, full-attention blocks, DeepStack layers, numbers
of vision and decoder layers, GQA, experts per token) and shrink only the widths, the number of
experts and the vocabulary, so they run on a 2-core CPU and a method cuts them at the same
layers, to the same counts, as the full model.

:func:`synthetic_inputs` builds prompts directly (``input_ids`` with the right number of image
placeholders, random ``pixel_values`` and the family's extra inputs) from any config of the
supported families: presets and real checkpoints alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import (
    AutoModelForImageTextToText,
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionForConditionalGeneration,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeForConditionalGeneration,
)
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
    unpad_image,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from vlprune.adapters import get_adapter
from vlprune.adapters.llava_onevision import anyres_max
from vlprune.eval.profiler.configs import (
    LLAVA_NEXT_PINPOINTS,
    llava_15_7b,
    llava_next_7b,
    llava_onevision_7b,
    qwen2_5_vl_7b,
    qwen2_vl_7b,
    qwen3_vl_8b,
    qwen3_vl_30b_a3b,
)

__all__ = [
    "LLAVA_NEXT_PINPOINTS",
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
    "qwen3_vl": Qwen3VLForConditionalGeneration,
    "qwen3_vl_moe": Qwen3VLMoeForConditionalGeneration,
    "llava_onevision": LlavaOnevisionForConditionalGeneration,
}
LLAVA_FAMILIES = ("llava", "llava_next", "llava_onevision")

_QWEN_MAX_PIXELS = 28 * 28 * 16384  # Qwen2-VL/2.5-VL preprocessor_config.json "max_pixels"
_QWEN_MIN_PIXELS = 56 * 56
_QWEN3_MAX_PIXELS = 16777216  # Qwen3-VL preprocessor_config.json size.longest_edge
_QWEN3_MIN_PIXELS = 65536  # size.shortest_edge


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
# 2928 tokens); Qwen2/2.5-VL 672x672 (48x48 patches, 576 merged tokens); Qwen3-VL 672x672
# (patch 16: 42x42 patches, 441 merged tokens); LLaVA-OneVision 672x672 (5 crops of 27x27,
# 729 + 54·55 = 3699 tokens). The NeXT, Qwen2-VL, Qwen3-VL and OneVision minis default to
# smaller images (1176, 256, 196 and 1485 tokens) to stay CPU-friendly; pass --image-size to
# match the full preset exactly.
PRESETS: dict[str, Preset] = {
    **_register("llava-1.5-7b", "llava", llava_15_7b, (336, 336), (336, 336)),
    **_register("llava-next-7b", "llava_next", llava_next_7b, (672, 672), (336, 336)),
    **_register("qwen2-vl-7b", "qwen2_vl", qwen2_vl_7b, (672, 672), (448, 448)),
    **_register("qwen2.5-vl-7b", "qwen2_5_vl", qwen2_5_vl_7b, (672, 672), (672, 672)),
    **_register("qwen3-vl-8b", "qwen3_vl", qwen3_vl_8b, (672, 672), (448, 448)),
    **_register("qwen3-vl-30b-a3b", "qwen3_vl_moe", qwen3_vl_30b_a3b, (672, 672), (448, 448)),
    **_register("llava-onevision-7b", "llava_onevision", llava_onevision_7b, (672, 672),
                (384, 384)),
}


_FULL = {"llava": "llava-1.5-7b", "llava_next": "llava-next-7b", "qwen2_vl": "qwen2-vl-7b",
         "qwen2_5_vl": "qwen2.5-vl-7b", "qwen3_vl": "qwen3-vl-8b",
         "qwen3_vl_moe": "qwen3-vl-30b-a3b", "llava_onevision": "llava-onevision-7b",
         "qwen3_5": "qwen3-vl-8b"}
"""Family → the preset whose default image a checkpoint of that family gets (Qwen3.5, which has
no preset, shares Qwen3-VL's vision geometry; the profiler then refuses its hybrid decoder)."""


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

    ``tokens``: image placeholders in the prompt; ``crops``: vision sequences (1 for
    LLaVA-1.5, thumbnail + crops for NeXT / OneVision) of ``crop_patches`` patches each (plus
    CLS on CLIP); ``grid_thw``: Qwen patch grid (t, h, w).
    """

    tokens: int
    crops: int = 1
    crop_patches: int = 0
    grid_thw: tuple[int, int, int] | None = None
    size: tuple[int, int] | None = None  # (height, width) for LLaVA-NeXT / OneVision


def _anyres_geometry(config: PretrainedConfig, height: int, width: int) -> ImageGeometry:
    """LLaVA-NeXT / LLaVA-OneVision: thumbnail + crops, unpadded canvas (OneVision:
    ``anyres_max`` downsampling), a newline per canvas row; CLS only with ``default``."""
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    pinpoints = config.image_grid_pinpoints
    crops = image_size_to_num_patches((height, width), pinpoints, vision.image_size)
    grid_h, grid_w = get_anyres_image_grid_shape((height, width), pinpoints, vision.image_size)
    rows, cols = unpad_image(torch.empty(0, grid_h * side, grid_w * side),
                             (height, width)).shape[1:]
    aspect = getattr(config, "vision_aspect_ratio", None)
    if aspect is not None:
        ratio = math.sqrt(rows * cols / (anyres_max(aspect) * side**2))
        if ratio > 1.1:
            rows, cols = int(rows // ratio), int(cols // ratio)
    return ImageGeometry(tokens=side * side + rows * (cols + 1), crops=crops,
                         crop_patches=side * side, size=(height, width))


def image_geometry(config: PretrainedConfig, family: str, image_size: tuple[int, int]
                   ) -> ImageGeometry:
    """Token geometry of one ``image_size`` = (width, height) image for ``config``."""
    width, height = image_size
    if family == "llava":
        vision = config.vision_config
        side = vision.image_size // vision.patch_size
        extra = 0 if config.vision_feature_select_strategy == "default" else 1
        return ImageGeometry(tokens=side * side + extra, crop_patches=side * side)
    if family in LLAVA_FAMILIES:
        return _anyres_geometry(config, height, width)
    vision = config.vision_config
    factor = vision.patch_size * vision.spatial_merge_size
    qwen3 = family.startswith("qwen3")
    h, w = smart_resize(height, width, factor=factor,
                        min_pixels=_QWEN3_MIN_PIXELS if qwen3 else _QWEN_MIN_PIXELS,
                        max_pixels=_QWEN3_MAX_PIXELS if qwen3 else _QWEN_MAX_PIXELS)
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

    LLaVA / NeXT / OneVision: ``[bos, image x N, words]``; Qwen: ``[vision_start, image_pad x N,
    vision_end, words]``. Words are random ids below ``min(1000, vocab_size)``, from 12 up
    (fewer only in a tiny vocabulary), never one of the config's special token ids. Pixels are
    standard normal (cost does not depend on them).
    """
    geom = image_geometry(config, family, image_size)
    gen = torch.Generator().manual_seed(seed)
    image_id = int(config.image_token_id)
    if family in LLAVA_FAMILIES:
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
    elif family in LLAVA_FAMILIES:
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
