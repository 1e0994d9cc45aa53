"""Tiny random-weight vision-language models for tests, built fully offline.

One tiny config per adapter family (:data:`FAMILIES`): ``"llava"`` (LLaVA-1.5),
``"llava_next"`` (LLaVA-NeXT / AnyRes), ``"qwen2_vl"``, ``"qwen2_5_vl"``, ``"qwen3_vl"``
(DeepStack), ``"qwen3_vl_moe"`` (DeepStack + sparse-MoE decoder), ``"llava_onevision"``
(SigLIP, AnyRes-max) and ``"qwen3_5"`` (hybrid decoder: linear-attention layers 0 and 3,
full-attention layers 1 and 2 with gated queries and half-rotary RoPE, so FastV's K = 2 and
ToDRE's check layer read attention while cuts reach a linear-attention layer). Every model
shares one in-memory word-level tokenizer (specials plus the words ``w0`` .. ``w999``), a text
model with hidden size 64, 4 layers, 4 query / 2 key-value heads (GQA), and a small vision
tower. Nothing is downloaded from the Hugging Face hub.

Default inputs per image (``tiny_inputs``):

- ``llava``: 84x84 image -> 36 visual tokens (6x6 CLIP patches, CLS dropped).
- ``llava_next``: 150x100 (W x H) image -> best pinpoint 168x168, 4 crops + base image:
  36 base tokens + 8x12 unpadded grid tokens + 8 newline tokens = 140 visual tokens.
- ``llava_onevision``: the same geometry at SigLIP patch 8 (48 px crops, no CLS): 150x100 ->
  140 visual tokens; its ``anyres_max_9`` downsampling needs more than 9 crops' worth of patches
  (``tiny_config(..., vision_aspect_ratio="anyres_max_1")`` triggers it on these images).
- ``qwen2_vl`` / ``qwen2_5_vl``: 168x112 (W x H) image -> patch grid 1x8x12 -> 24 merged tokens.
- ``qwen3_vl`` / ``qwen3_vl_moe`` / ``qwen3_5``: 192x128 (W x H) image, patch 16 -> grid 1x8x12
  -> 24 merged tokens; Qwen3-VL: DeepStack from vision blocks 0, 1, 2 (of 4) into decoder
  layers 0, 1, 2 (of 4).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BatchFeature,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionProcessor,
    LlavaProcessor,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
    Qwen3_5Config,
    Qwen3_5ForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
    Qwen3VLProcessor,
    SiglipVisionConfig,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import (
    LlavaNextImageProcessorPil,
)
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

__all__ = [
    "DEFAULT_IMAGE_SIZE",
    "FAMILIES",
    "LLAVA_FAMILIES",
    "SPECIAL_TOKENS",
    "attention_output_index",
    "kept_lm_extras",
    "tiny_config",
    "tiny_image",
    "tiny_inputs",
    "tiny_model",
    "tiny_processor",
    "tiny_prompt",
    "tiny_tokenizer",
]

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
_CLIP = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "image_size": 84,
    "patch_size": 14,
}
_NEXT_PINPOINTS = [[84, 168], [168, 84], [168, 168]]
_SIGLIP = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "image_size": 48,
    "patch_size": 8,
    "vision_use_head": False,
}
_ONEVISION_PINPOINTS = [[48, 96], [96, 48], [96, 96]]
_QWEN_MIN_PIXELS = 56 * 56
_QWEN_MAX_PIXELS = 28 * 28 * 256  # at most 256 merged tokens per image

DEFAULT_IMAGE_SIZE: dict[str, tuple[int, int]] = {
    "llava": (84, 84),
    "llava_next": (150, 100),
    "qwen2_vl": (168, 112),
    "qwen2_5_vl": (168, 112),
    "qwen3_vl": (192, 128),
    "qwen3_vl_moe": (192, 128),
    "llava_onevision": (150, 100),
    "qwen3_5": (192, 128),
}
"""Default image size (width, height) per family used by :func:`tiny_inputs`."""

_DEFAULT_N_WORDS = (5, 9, 3, 7)

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


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


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


def _token_id(token: str) -> int:
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
    _check_family(family)
    aspect_ratio = text_overrides.pop("vision_aspect_ratio", "anyres_max_9")
    text = {
        **_TEXT,
        "pad_token_id": _token_id("<pad>"),
        "bos_token_id": _token_id("<s>"),
        "eos_token_id": _token_id("</s>"),
        **text_overrides,
    }
    special_ids = {key: text[key] for key in ("pad_token_id", "bos_token_id", "eos_token_id")}
    if family in ("llava", "llava_next"):
        common = {
            "vision_config": CLIPVisionConfig(**_CLIP),
            "text_config": LlamaConfig(**text),
            "image_token_id": _token_id("<image>"),
            "vision_feature_layer": -2,
            "vision_feature_select_strategy": "default",
            "image_seq_length": (_CLIP["image_size"] // _CLIP["patch_size"]) ** 2,
            **special_ids,
        }
        if family == "llava":
            return LlavaConfig(**common)
        return LlavaNextConfig(**common, image_grid_pinpoints=_NEXT_PINPOINTS)
    if family == "llava_onevision":
        return LlavaOnevisionConfig(
            vision_config=SiglipVisionConfig(**_SIGLIP).to_dict(),
            text_config=Qwen2Config(**text).to_dict(),
            image_token_index=_token_id("<image>"),
            video_token_index=_token_id("<|video_pad|>"),
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
            image_grid_pinpoints=_ONEVISION_PINPOINTS,
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
        "image_token_id": _token_id("<|image_pad|>"),
        "video_token_id": _token_id("<|video_pad|>"),
        "vision_start_token_id": _token_id("<|vision_start|>"),
        "vision_end_token_id": _token_id("<|vision_end|>"),
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
    side = _SIGLIP["image_size"]
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": side, "width": side}, image_grid_pinpoints=_ONEVISION_PINPOINTS
    )
    return LlavaOnevisionProcessorNoVideo(
        image_processor=image_processor,
        tokenizer=tokenizer,
        num_image_tokens=(side // _SIGLIP["patch_size"]) ** 2,
        vision_feature_select_strategy="full",
        video_token="<|video_pad|>",
    )


def tiny_processor(family: str) -> ProcessorMixin:
    """Torchvision-free processor whose placeholder counts match :func:`tiny_model`."""
    _check_family(family)
    tokenizer = tiny_tokenizer()
    if family in ("llava", "llava_next"):
        side = _CLIP["image_size"]
        image_kwargs = {
            "size": {"shortest_edge": side},
            "crop_size": {"height": side, "width": side},
        }
        llava_kwargs = {
            "tokenizer": tokenizer,
            "patch_size": _CLIP["patch_size"],
            "vision_feature_select_strategy": "default",
            "num_additional_image_tokens": 1,
        }
        if family == "llava":
            return LlavaProcessor(
                image_processor=CLIPImageProcessorPil(**image_kwargs), **llava_kwargs
            )
        image_processor = LlavaNextImageProcessorPil(
            **image_kwargs, image_grid_pinpoints=_NEXT_PINPOINTS
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


def tiny_image(seed: int, size: tuple[int, int] | None = None) -> Image.Image:
    """Deterministic random RGB image of ``size`` = (width, height), default 84x84."""
    width, height = size if size is not None else DEFAULT_IMAGE_SIZE["llava"]
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), mode="RGB")


def tiny_prompt(family: str, n_words: int, seed: int = 0) -> str:
    """One leading text token, one image placeholder, then ``n_words`` random words ``wNNN``."""
    _check_family(family)
    rng = random.Random(seed)
    words = " ".join(f"w{rng.randrange(N_WORDS)}" for _ in range(n_words))
    if family in LLAVA_FAMILIES:
        return f"<s> <image> {words}"
    return f"<|im_start|> <|vision_start|><|image_pad|><|vision_end|> {words}"


def tiny_inputs(
    family: str,
    *,
    batch: int = 1,
    n_words: Sequence[int] | None = None,
    image_sizes: Sequence[tuple[int, int]] | None = None,
    seed: int = 0,
) -> BatchFeature:
    """Left-padded batch of ``batch`` prompts with one image each, ready for forward / generate.

    ``n_words`` defaults to 5, 9, 3, 7, 5, ... words per sample and ``image_sizes`` (width, height)
    to ``DEFAULT_IMAGE_SIZE[family]``. Keys: ``input_ids`` and ``attention_mask`` ``[B, L]``,
    ``pixel_values`` (LLaVA ``[B, 3, 84, 84]``; NeXT ``[B, crops, 3, 84, 84]`` plus
    ``image_sizes`` ``[B, 2]`` as (H, W); OneVision ``[B, crops, 3, 48, 48]`` plus
    ``image_sizes`` and ``batch_num_images`` ``[B]``; Qwen flattened patches
    ``[sum(t*h*w), 1176]`` (Qwen3: 1536) plus ``image_grid_thw`` ``[B, 3]`` and
    ``mm_token_type_ids`` ``[B, L]``).
    """
    _check_family(family)
    if n_words is None:
        n_words = [_DEFAULT_N_WORDS[i % len(_DEFAULT_N_WORDS)] for i in range(batch)]
    if image_sizes is None:
        image_sizes = [DEFAULT_IMAGE_SIZE[family]] * batch
    if len(n_words) != batch or len(image_sizes) != batch:
        raise ValueError(f"n_words and image_sizes need {batch} entries each")
    prompts = [tiny_prompt(family, n, seed=seed + i) for i, n in enumerate(n_words)]
    images = [tiny_image(seed + i, size) for i, size in enumerate(image_sizes)]
    return tiny_processor(family)(text=prompts, images=images, padding=True, return_tensors="pt")


def kept_lm_extras(lm_kwargs: dict, index: torch.Tensor) -> dict:
    """Oracle helper: the language model's DeepStack inputs (Qwen3-VL ``visual_pos_masks`` and
    ``deepstack_visual_embeds``, as captured from an unpatched forward) for the kept sequence
    positions ``index`` (B, Lp); ``{}`` for models without them.

    Built independently of ``vlprune.hooks``: every feature tensor is scattered onto the full
    (B, L) sequence, then the kept positions are read back in order.
    """
    mask = lm_kwargs.get("visual_pos_masks")
    embeds = lm_kwargs.get("deepstack_visual_embeds")
    if mask is None or embeds is None:
        return {}
    rows = torch.arange(index.shape[0])[:, None]
    kept = mask[rows, index]
    out = []
    for feature in embeds:
        full = feature.new_zeros(*mask.shape, feature.shape[-1])
        full[mask] = feature
        out.append(full[rows, index][kept])
    return {"visual_pos_masks": kept, "deepstack_visual_embeds": out}


def attention_output_index(model: PreTrainedModel, layer: int) -> int:
    """Index of decoder layer ``layer`` in ``output.attentions`` (``output_attentions=True``):
    hybrid decoders (Qwen3.5) return the attentions of their full-attention layers only."""
    types = getattr(model.config.get_text_config(), "layer_types", None)
    if not types:
        return layer
    attention = [i for i, kind in enumerate(types) if kind != "linear_attention"]
    return attention.index(layer)
