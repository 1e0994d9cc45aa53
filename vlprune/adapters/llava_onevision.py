"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): SigLIP, AnyRes-max-9, Qwen2.

One image of a single-image prompt = the base (thumbnail) grid, then the unpadded high-res
canvas with a newline token per row, as in LLaVA-NeXT, except that a canvas holding more than
``N`` crops' worth of patches (``vision_aspect_ratio="anyres_max_N"``, 9 in the released models)
is bilinearly downsampled by ``ratio = sqrt(rows·cols / (N·side²))`` when ``ratio > 1.1``. An
image of a multi-image prompt (``batch_num_images[b] > 1``) is its base grid plus one newline.
The layout mirrors ``LlavaOnevisionModel.pack_image_features`` with transformers' own
``get_anyres_image_grid_shape`` and ``unpad_image``. SigLIP has no CLS token; its attention
layers expose ``q_proj`` / ``k_proj`` like CLIP's, so the CLIP probe reads them. Video frames
are pooled by the model and never pruned (video tokens count as text).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from transformers.models.llava_onevision.modeling_llava_onevision import (
    get_anyres_image_grid_shape,
    unpad_image,
)

from vlprune.adapters.base import Adapter, ImageLayout, checked_crop_count, checked_token_count
from vlprune.hooks.signals import ClipAttentionProbe


def anyres_max(aspect_ratio: str) -> int:
    """``N`` of ``vision_aspect_ratio="anyres_max_N"``."""
    return int(aspect_ratio.removeprefix("anyres_max_"))


class LlavaOnevisionAdapter(Adapter):
    """Thumbnail grid, then the (possibly downsampled) unpadded canvas with row newlines."""

    family = "llava_onevision"
    model_classes = ("LlavaOnevisionForConditionalGeneration",)
    rope = "1d"
    has_cls = False
    vision_path = "model.vision_tower"
    vision_layers_path = "model.vision_tower.encoder.layers"
    projector_path = "model.multi_modal_projector"

    def vision_probe(self, layer: int) -> ClipAttentionProbe:
        """SigLIP self-attention of encoder layer ``layer``; one sequence per crop (thumbnail
        first, then ``crop_grid`` crops in raster order), no CLS row."""
        return ClipAttentionProbe(self.vision_layers[layer].self_attn)

    def _side(self) -> int:
        vision = self.model.config.vision_config
        return vision.image_size // vision.patch_size

    def _layout(self, image_size: list[int], anyres: bool, aspect_ratio: str) -> ImageLayout:
        config = self.model.config
        side = self._side()
        if not anyres:
            return ImageLayout(num_tokens=side * side + 1, grid=(side, side), suffix=1)
        crops_h, crops_w = get_anyres_image_grid_shape(
            image_size, config.image_grid_pinpoints, config.vision_config.image_size
        )
        padded_h, padded_w = crops_h * side, crops_w * side
        rows, cols = unpad_image(torch.empty(0, padded_h, padded_w), image_size).shape[1:]
        offset = ((padded_h - rows) // 2, (padded_w - cols) // 2)
        source = None
        ratio = math.sqrt(rows * cols / (anyres_max(aspect_ratio) * side**2))
        if ratio > 1.1:
            source = (rows, cols)
            rows, cols = int(rows // ratio), int(cols // ratio)
        return ImageLayout(
            num_tokens=side * side + rows * (cols + 1),
            grid=(side, side),
            crop_grid=(crops_h, crops_w),
            highres=(rows, cols),
            highres_offset=offset,
            newline=True,
            highres_source=source,
        )

    def _layouts(self, inputs: Mapping[str, Any]) -> list[ImageLayout]:
        if self.model.config.vision_feature_select_strategy != "full":
            raise NotImplementedError(
                "vlprune supports LLaVA-OneVision with the `full` feature strategy (SigLIP has "
                "no CLS token to drop)"
            )
        sizes = inputs.get("image_sizes")
        if sizes is None:
            raise ValueError("LLaVA-OneVision needs `image_sizes` in the model inputs")
        sizes = self._as_list(sizes)
        per_prompt = inputs.get("batch_num_images")
        anyres = [True] * len(sizes)
        if per_prompt is not None:
            anyres = [int(n) == 1 for n in self._as_flat(per_prompt) for _ in range(int(n))]
        aspect = inputs.get("vision_aspect_ratio") or self.model.config.vision_aspect_ratio
        return [self._layout(size, a, aspect) for size, a in zip(sizes, anyres)]

    def image_layouts(self, inputs: Mapping[str, Any], n_image_tokens: int) -> list[ImageLayout]:
        return checked_token_count(self._layouts(inputs), n_image_tokens)

    def encoder_layouts(self, inputs: Mapping[str, Any], n_sequences: int) -> list[ImageLayout]:
        """One layout per ``image_sizes`` entry; an AnyRes image is thumbnail + crops
        sequences, an image of a multi-image prompt one sequence."""
        return checked_crop_count(self._layouts(inputs), n_sequences)

    @staticmethod
    def _as_flat(value: Any) -> list[int]:
        if isinstance(value, torch.Tensor):
            return value.flatten().tolist()
        return [int(v) for v in value]
