"""The model behind ``vlprune show``: the module, its processor and how to prompt it.

:func:`load_showcase` takes ``toy`` (the shipped trained toy LLaVA), a profiler preset name
(random weights; a full-size preset runs as its ``-mini`` twin, which has the same token
geometry and depths, with a processor built for it) or a local directory / hub id of a
checkpoint (its own processor; Qwen and LLaVA-OneVision without torchvision through
:func:`vlprune.eval.processors.load_processor`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from vlprune.keptmap import processor_fit

__all__ = ["Showcase", "load_showcase", "prompt_builder"]


@dataclass
class Showcase:
    """A model to show: the module, its processor, how a text becomes its prompt (``prompt``),
    the default text and how its processor lays an image onto the token grid (``fit``)."""

    name: str
    model: torch.nn.Module
    processor: Any
    prompt: Callable[[str], str]
    default_text: str
    fit: str


def load_showcase(name: str, *, device: str = "cpu", dtype: str = "auto") -> Showcase:
    """``toy``, a profiler preset name or a checkpoint path / hub id (see the module docstring)."""
    from vlprune.eval.profiler.presets import PRESETS, build_preset_model

    if name == "toy":
        from vlprune.eval.toy.model import load_toy_model, prompt, toy_processor

        model = load_toy_model().to(device)
        processor = toy_processor()
        return Showcase(name, model, processor, prompt, "how many circles are there ?",
                        processor_fit(processor.image_processor))
    torch_dtype = _dtype(dtype, device)
    if name in PRESETS:
        preset = PRESETS[name] if PRESETS[name].mini else PRESETS[PRESETS[name].twin]
        model = build_preset_model(preset, device=device, dtype=torch_dtype)
        processor = _preset_processor(model.config, preset.family)
    else:
        from transformers import AutoModelForImageTextToText

        from vlprune.adapters import get_adapter
        from vlprune.eval.processors import load_processor

        model = AutoModelForImageTextToText.from_pretrained(name, dtype=torch_dtype)
        model = model.to(device).eval()
        processor = load_processor(name, get_adapter(model).family)
    return Showcase(name, model, processor, prompt_builder(processor, model.config),
                    "describe the image", processor_fit(processor.image_processor))


def _dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    choices = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in choices:
        raise ValueError(f"`dtype` must be auto or one of {', '.join(choices)}, got {dtype!r}")
    return choices[dtype]


def _preset_processor(config: Any, family: str) -> Any:
    """A torchvision-free processor matching a mini preset's geometry and token ids (the
    presets use :func:`vlprune.testing.tiny_tokenizer`'s ids)."""
    from transformers import LlavaNextProcessor, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.llava_next.image_processing_pil_llava_next import (
        LlavaNextImageProcessorPil,
    )
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    from vlprune.testing.processors import (
        LlavaOnevisionProcessorNoVideo,
        Qwen2_5_VLProcessorNoVideo,
        Qwen2VLProcessorNoVideo,
        Qwen3VLProcessorNoVideo,
        tiny_tokenizer,
    )

    vision = config.vision_config
    if family in ("llava", "llava_next"):
        side = vision.image_size
        sizes = {"size": {"shortest_edge": side}, "crop_size": {"height": side, "width": side}}
        common = {"tokenizer": tiny_tokenizer(), "patch_size": vision.patch_size,
                  "vision_feature_select_strategy": config.vision_feature_select_strategy,
                  "num_additional_image_tokens": 1}
        if family == "llava":
            return LlavaProcessor(image_processor=CLIPImageProcessorPil(**sizes), **common)
        images = LlavaNextImageProcessorPil(**sizes,
                                            image_grid_pinpoints=config.image_grid_pinpoints)
        return LlavaNextProcessor(image_processor=images, **common)
    if family == "llava_onevision":
        side = vision.image_size
        images = LlavaOnevisionImageProcessorPil(
            size={"height": side, "width": side}, image_grid_pinpoints=config.image_grid_pinpoints)
        return LlavaOnevisionProcessorNoVideo(
            image_processor=images, tokenizer=tiny_tokenizer(),
            num_image_tokens=(side // vision.patch_size) ** 2,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            vision_aspect_ratio=config.vision_aspect_ratio, video_token="<|video_pad|>")
    factor = (vision.patch_size * vision.spatial_merge_size) ** 2  # pixels of a merged token
    images = Qwen2VLImageProcessorPil(
        size={"shortest_edge": 4 * factor, "longest_edge": 1024 * factor},
        patch_size=vision.patch_size, temporal_patch_size=vision.temporal_patch_size,
        merge_size=vision.spatial_merge_size,
    )
    cls = {"qwen2_vl": Qwen2VLProcessorNoVideo,
           "qwen2_5_vl": Qwen2_5_VLProcessorNoVideo}.get(family, Qwen3VLProcessorNoVideo)
    return cls(image_processor=images, tokenizer=tiny_tokenizer())


def prompt_builder(processor: Any, config: Any) -> Callable[[str], str]:
    """``text → prompt`` with one image: the processor's chat template (one user turn: the image,
    then the text) or, without one, the image placeholder (wrapped in the vision start / end
    tokens where the config has them), a newline and the text."""
    image = processor.image_token
    start = getattr(config, "vision_start_token_id", None)
    end = getattr(config, "vision_end_token_id", None)
    if start is not None and end is not None:
        start, end = processor.tokenizer.convert_ids_to_tokens([start, end])
        image = f"{start}{image}{end}"

    def build(text: str) -> str:
        if getattr(processor, "chat_template", None):
            content = [{"type": "image"}, {"type": "text", "text": text}]
            return processor.apply_chat_template([{"role": "user", "content": content}],
                                                 add_generation_prompt=True, tokenize=False)
        return f"{image}\n{text}"

    return build
