"""Loading a checkpoint's processor without torchvision (shared by ``vlprune show`` and the
lmms-eval model).

Qwen2-VL/2.5-VL/3-VL/3.5 and LLaVA-OneVision processors load a torchvision video processor,
which fails where torchvision is not installed (CPU machines); image work never uses it, so
:func:`load_processor` falls back to an images-only processor class there.
"""

from __future__ import annotations

import logging
from typing import Any

from transformers import (
    AutoProcessor,
    LlavaOnevisionProcessor,
    ProcessorMixin,
    Qwen2_5_VLProcessor,
    Qwen2VLProcessor,
    Qwen3VLProcessor,
)

__all__ = [
    "IMAGES_ONLY_PROCESSORS",
    "LlavaOnevisionProcessorImagesOnly",
    "Qwen2VLProcessorImagesOnly",
    "Qwen2_5_VLProcessorImagesOnly",
    "Qwen3VLProcessorImagesOnly",
    "load_processor",
]

logger = logging.getLogger(__name__)


class _ImagesOnly:
    """Processor mixin without the video processor.

    Qwen2-VL/2.5-VL/3-VL/3.5 and LLaVA-OneVision processors load a torchvision video processor,
    which fails where torchvision is not installed; image tasks never use it. Dropping
    ``video_processor`` from the processor's attributes lets ``from_pretrained`` and
    ``save_pretrained`` work without it
    (``vlprune.testing``'s no-video processors only skip the constructor's class check).
    """

    @classmethod
    def get_attributes(cls) -> list[str]:
        return [a for a in super().get_attributes() if a != "video_processor"]  # type: ignore[misc]

    def check_argument_for_proper_class(self, argument_name: str, argument: object) -> object:
        if argument is None:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)  # type: ignore[misc]


class Qwen2VLProcessorImagesOnly(_ImagesOnly, Qwen2VLProcessor):
    """``Qwen2VLProcessor`` for images (loads and saves without torchvision)."""


class Qwen2_5_VLProcessorImagesOnly(_ImagesOnly, Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` for images (loads and saves without torchvision)."""


class Qwen3VLProcessorImagesOnly(_ImagesOnly, Qwen3VLProcessor):
    """``Qwen3VLProcessor`` for images (loads and saves without torchvision); Qwen3-VL-MoE and
    Qwen3.5 checkpoints use this processor too."""


class LlavaOnevisionProcessorImagesOnly(_ImagesOnly, LlavaOnevisionProcessor):
    """``LlavaOnevisionProcessor`` for images (loads and saves without torchvision)."""


IMAGES_ONLY_PROCESSORS: dict[str, type[ProcessorMixin]] = {
    "qwen2_vl": Qwen2VLProcessorImagesOnly,
    "qwen2_5_vl": Qwen2_5_VLProcessorImagesOnly,
    "qwen3_vl": Qwen3VLProcessorImagesOnly,
    "qwen3_vl_moe": Qwen3VLProcessorImagesOnly,
    "llava_onevision": LlavaOnevisionProcessorImagesOnly,
    "qwen3_5": Qwen3VLProcessorImagesOnly,
}


def load_processor(pretrained: str, family: str, **kwargs: Any) -> ProcessorMixin:
    """``AutoProcessor.from_pretrained``; where it needs torchvision (Qwen, LLaVA-OneVision) and
    torchvision is missing, an images-only processor.

    The tokenizer pads on the left (batched generation).
    """
    try:
        processor = AutoProcessor.from_pretrained(pretrained, **kwargs)
    except ImportError as err:
        if family not in IMAGES_ONLY_PROCESSORS:
            raise
        reason = str(err).strip().splitlines()[0]
        logger.info("vlprune: loading the processor without its video part (%s)", reason)
        processor = IMAGES_ONLY_PROCESSORS[family].from_pretrained(pretrained, **kwargs)
    processor.tokenizer.padding_side = "left"
    return processor

