"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP ViT with CLS, MLP projector, LLaMA."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vlprune.adapters.base import Adapter, ImageLayout
from vlprune.hooks.signals import ClipAttentionProbe


class LlavaAdapter(Adapter):
    """One image = a ``(image_size / patch)²`` grid in raster order (CLS dropped, ``default``)."""

    family = "llava"
    model_classes = ("LlavaForConditionalGeneration",)
    rope = "1d"
    has_cls = True
    vision_path = "model.vision_tower"
    vision_layers_path = "model.vision_tower.encoder.layers"
    projector_path = "model.multi_modal_projector"

    def vision_probe(self, layer: int) -> ClipAttentionProbe:
        """CLIP self-attention of encoder layer ``layer``; one sequence (CLS + patches) per
        image."""
        return ClipAttentionProbe(self.vision_layers[layer].self_attn)

    def _grid_side(self) -> int:
        vision = self.model.config.vision_config
        return vision.image_size // vision.patch_size

    def _prefix(self) -> int:
        return 0 if self.model.config.vision_feature_select_strategy == "default" else 1

    def image_layouts(self, inputs: Mapping[str, Any], n_image_tokens: int) -> list[ImageLayout]:
        side = self._grid_side()
        layout = ImageLayout(num_tokens=side * side + self._prefix(), grid=(side, side),
                             prefix=self._prefix())
        if n_image_tokens % layout.num_tokens:
            raise ValueError(
                f"{n_image_tokens} image placeholders is not a multiple of {layout.num_tokens} "
                "tokens per image"
            )
        return [layout] * (n_image_tokens // layout.num_tokens)

    def encoder_layouts(self, inputs: Mapping[str, Any], n_sequences: int) -> list[ImageLayout]:
        """One image per encoder sequence."""
        side = self._grid_side()
        return self.image_layouts(inputs, n_sequences * (side * side + self._prefix()))
