"""Tiny random-weight vision-language models for tests, built fully offline.

- ``configs``: the families, their tiny configs and :func:`tiny_model`;
- ``processors``: the shared tokenizer and torchvision-free processors;
- ``inputs``: deterministic images, prompts and ready-to-run inputs.

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

from vlprune.testing.configs import (
    FAMILIES,
    LLAVA_FAMILIES,
    SPECIAL_TOKENS,
    tiny_config,
    tiny_model,
)
from vlprune.testing.inputs import DEFAULT_IMAGE_SIZE, tiny_image, tiny_inputs, tiny_prompt
from vlprune.testing.processors import tiny_processor, tiny_tokenizer

__all__ = [
    "DEFAULT_IMAGE_SIZE",
    "FAMILIES",
    "LLAVA_FAMILIES",
    "SPECIAL_TOKENS",
    "tiny_config",
    "tiny_image",
    "tiny_inputs",
    "tiny_model",
    "tiny_processor",
    "tiny_prompt",
    "tiny_tokenizer",
]
