"""The shared word-level tokenizer and torchvision-free processors of the tiny models.

Each processor's placeholder counts match :func:`~vlprune.testing.configs.tiny_model` of the
same family; Qwen and LLaVA-OneVision processors are built without a video processor (which
needs torchvision).
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    LlavaNextProcessor,
    LlavaOnevisionProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2_5_VLProcessor,
    Qwen2VLProcessor,
    Qwen3VLProcessor,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import (
    LlavaNextImageProcessorPil,
)
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from vlprune.testing.configs import (
    CLIP_VISION,
    N_WORDS,
    NEXT_PINPOINTS,
    ONEVISION_PINPOINTS,
    SIGLIP_VISION,
    SPECIAL_TOKENS,
    check_family,
)

_QWEN_MIN_PIXELS = 56 * 56
_QWEN_MAX_PIXELS = 28 * 28 * 256  # at most 256 merged tokens per image


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer built in memory: ``SPECIAL_TOKENS`` (ids 0..11), then ``w0``..``w999``.

    Words are split on whitespace; special tokens are matched anywhere. Padding side is left.
    """
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *(f"w{i}" for i in range(N_WORDS))])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=list(SPECIAL_TOKENS[4:]),
        padding_side="left",
    )


class _SkipNoneVideo:
    """Mixin: accept ``video_processor=None`` (the class check fails without torchvision)."""

    def check_argument_for_proper_class(self, argument_name: str, argument: object) -> object:
        if argument is None:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)


class Qwen2VLProcessorNoVideo(_SkipNoneVideo, Qwen2VLProcessor):
    """``Qwen2VLProcessor`` with images only (no video processor, no torchvision)."""


class Qwen2_5_VLProcessorNoVideo(_SkipNoneVideo, Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` with images only (no video processor, no torchvision)."""


class Qwen3VLProcessorNoVideo(_SkipNoneVideo, Qwen3VLProcessor):
    """``Qwen3VLProcessor`` with images only (no video processor, no torchvision)."""


class LlavaOnevisionProcessorNoVideo(_SkipNoneVideo, LlavaOnevisionProcessor):
    """``LlavaOnevisionProcessor`` with images only (no video processor, no torchvision)."""


def _onevision_processor(tokenizer: PreTrainedTokenizerFast) -> ProcessorMixin:
    side = SIGLIP_VISION["image_size"]
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": side, "width": side}, image_grid_pinpoints=ONEVISION_PINPOINTS
    )
    return LlavaOnevisionProcessorNoVideo(
        image_processor=image_processor,
        tokenizer=tokenizer,
        num_image_tokens=(side // SIGLIP_VISION["patch_size"]) ** 2,
        vision_feature_select_strategy="full",
        video_token="<|video_pad|>",
    )


def tiny_processor(family: str) -> ProcessorMixin:
    """Torchvision-free processor whose placeholder counts match :func:`tiny_model`."""
    check_family(family)
    tokenizer = tiny_tokenizer()
    if family in ("llava", "llava_next"):
        side = CLIP_VISION["image_size"]
        image_kwargs = {
            "size": {"shortest_edge": side},
            "crop_size": {"height": side, "width": side},
        }
        llava_kwargs = {
            "tokenizer": tokenizer,
            "patch_size": CLIP_VISION["patch_size"],
            "vision_feature_select_strategy": "default",
            "num_additional_image_tokens": 1,
        }
        if family == "llava":
            return LlavaProcessor(
                image_processor=CLIPImageProcessorPil(**image_kwargs), **llava_kwargs
            )
        image_processor = LlavaNextImageProcessorPil(
            **image_kwargs, image_grid_pinpoints=NEXT_PINPOINTS
        )
        return LlavaNextProcessor(image_processor=image_processor, **llava_kwargs)
    if family == "llava_onevision":
        return _onevision_processor(tokenizer)
    patch = 16 if family.startswith("qwen3") else 14
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": _QWEN_MIN_PIXELS, "longest_edge": _QWEN_MAX_PIXELS},
        patch_size=patch,
        temporal_patch_size=2,
        merge_size=2,
    )
    cls = {
        "qwen2_vl": Qwen2VLProcessorNoVideo,
        "qwen2_5_vl": Qwen2_5_VLProcessorNoVideo,
    }.get(family, Qwen3VLProcessorNoVideo)
    return cls(image_processor=image_processor, tokenizer=tokenizer)
