"""Qwen2-VL (``Qwen2VLForConditionalGeneration``): native-resolution ViT, 2×2 merger, M-RoPE."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vlprune.adapters.base import Adapter, ImageLayout
from vlprune.hooks.signals import QwenVisionAttentionProbe


class Qwen2VLAdapter(Adapter):
    """One image = ``t × (h/2) × (w/2)`` merged tokens in raster order; no CLS token."""

    family = "qwen2_vl"
    model_classes = ("Qwen2VLForConditionalGeneration",)
    rope = "mrope"
    has_cls = False
    vision_path = "model.visual"
    vision_layers_path = "model.visual.blocks"
    projector_path = "model.visual.merger"

    def vision_probe(self, layer: int) -> QwenVisionAttentionProbe:
        """Attention of vision block ``layer``: one sequence per image (full-attention blocks)
        or per window (Qwen2.5-VL windowed blocks), over pre-merge patches in the block's order."""
        return QwenVisionAttentionProbe(self.vision_layers[layer].attn)

    @property
    def merge_size(self) -> int:
        """Side of the square patch group merged into one LLM token (2)."""
        return int(self.model.config.vision_config.spatial_merge_size)

    def image_layouts(self, inputs: Mapping[str, Any], n_image_tokens: int) -> list[ImageLayout]:
        grids = inputs.get("image_grid_thw")
        if grids is None:
            raise ValueError(f"{self.family} needs `image_grid_thw` in the model inputs")
        m = self.merge_size
        layouts = [
            ImageLayout(num_tokens=t * (h // m) * (w // m), grid=(h // m, w // m), frames=t)
            for t, h, w in self._as_list(grids)
        ]
        total = sum(layout.num_tokens for layout in layouts)
        if total != n_image_tokens:
            raise ValueError(
                f"image_grid_thw gives {total} tokens but the prompt has {n_image_tokens} placeholders"
            )
        return layouts
