"""Deterministic images, prompts and ready-to-run model inputs of the tiny models."""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
from PIL import Image
from transformers import BatchFeature

from vlprune.testing.configs import LLAVA_FAMILIES, N_WORDS, check_family
from vlprune.testing.processors import tiny_processor

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


def tiny_image(seed: int, size: tuple[int, int] | None = None) -> Image.Image:
    """Deterministic random RGB image of ``size`` = (width, height), default 84x84."""
    width, height = size if size is not None else DEFAULT_IMAGE_SIZE["llava"]
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), mode="RGB")


def tiny_prompt(family: str, n_words: int, seed: int = 0) -> str:
    """One leading text token, one image placeholder, then ``n_words`` random words ``wNNN``."""
    check_family(family)
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
    check_family(family)
    if n_words is None:
        n_words = [_DEFAULT_N_WORDS[i % len(_DEFAULT_N_WORDS)] for i in range(batch)]
    if image_sizes is None:
        image_sizes = [DEFAULT_IMAGE_SIZE[family]] * batch
    if len(n_words) != batch or len(image_sizes) != batch:
        raise ValueError(f"n_words and image_sizes need {batch} entries each")
    prompts = [tiny_prompt(family, n, seed=seed + i) for i, n in enumerate(n_words)]
    images = [tiny_image(seed + i, size) for i, size in enumerate(image_sizes)]
    return tiny_processor(family)(text=prompts, images=images, padding=True, return_tensors="pt")
