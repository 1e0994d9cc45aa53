"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): AnyRes thumbnail + crops, unpad, newline."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    unpad_image,
)

from vlprune.adapters.base import Adapter, ImageLayout, checked_crop_count, checked_token_count
from vlprune.hooks.signals import ClipAttentionProbe


class LlavaNextAdapter(Adapter):
    """One image = thumbnail grid, then the unpadded high-res canvas with a newline per row.

    Mirrors ``LlavaNextModel.pack_image_features`` (``spatial_unpad``), using transformers' own
    ``get_anyres_image_grid_shape`` and ``unpad_image`` so the layout always matches the model.
    """

    family = "llava_next"
    model_classes = ("LlavaNextForConditionalGeneration",)
    rope = "1d"
    has_cls = True
    vision_path = "model.vision_tower"
    vision_layers_path = "model.vision_tower.encoder.layers"
    projector_path = "model.multi_modal_projector"

    def vision_probe(self, layer: int) -> ClipAttentionProbe:
        """CLIP self-attention of encoder layer ``layer``; one sequence per crop, the crops of
        each image in order (thumbnail first, then ``crop_grid`` crops in raster order)."""
        return ClipAttentionProbe(self.vision_layers[layer].self_attn)

    def _layout(self, image_size: list[int]) -> ImageLayout:
        config = self.model.config
        side = config.vision_config.image_size // config.vision_config.patch_size
        crops_h, crops_w = get_anyres_image_grid_shape(
            image_size, config.image_grid_pinpoints, config.vision_config.image_size
        )
        padded_h, padded_w = crops_h * side, crops_w * side
        rows, cols = unpad_image(torch.empty(0, padded_h, padded_w), image_size).shape[1:]
        offset = ((padded_h - rows) // 2, (padded_w - cols) // 2)
        return ImageLayout(
            num_tokens=side * side + rows * (cols + 1),
            grid=(side, side),
            crop_grid=(crops_h, crops_w),
            highres=(rows, cols),
            highres_offset=offset,
            newline=True,
        )

    def image_layouts(self, inputs: Mapping[str, Any], n_image_tokens: int) -> list[ImageLayout]:
        if self.model.config.vision_feature_select_strategy != "default":
            raise NotImplementedError("vlprune supports LLaVA-NeXT with the `default` strategy")
        sizes = inputs.get("image_sizes")
        if sizes is None:
            raise ValueError("LLaVA-NeXT needs `image_sizes` in the model inputs")
        layouts = [self._layout(size) for size in self._as_list(sizes)]
        return checked_token_count(layouts, n_image_tokens)

    def encoder_layouts(self, inputs: Mapping[str, Any], n_sequences: int) -> list[ImageLayout]:
        """One layout per ``image_sizes`` entry; each image is thumbnail + crops sequences."""
        sizes = inputs.get("image_sizes")
        if sizes is None:
            raise ValueError("LLaVA-NeXT needs `image_sizes` in the model inputs")
        layouts = [self._layout(size) for size in self._as_list(sizes)]
        return checked_crop_count(layouts, n_sequences)
