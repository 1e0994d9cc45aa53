"""Qwen2-VL (``Qwen2VLForConditionalGeneration``): native-resolution ViT, 2×2 merger, M-RoPE."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from vlprune.adapters.base import Adapter, ImageLayout, checked_token_count
from vlprune.hooks.signals import PatchTokenProbe, QwenVisionAttentionProbe


class Qwen2VLAdapter(Adapter):
    """One image = ``t × (h/2) × (w/2)`` merged tokens in raster order; no CLS token."""

    family = "qwen2_vl"
    model_classes = ("Qwen2VLForConditionalGeneration",)
    rope = "mrope"
    has_cls = False
    packed_vision = True
    vision_path = "model.visual"
    vision_layers_path = "model.visual.blocks"
    projector_path = "model.visual.merger"

    def vision_probe(self, layer: int) -> QwenVisionAttentionProbe:
        """Attention of vision block ``layer``: one sequence per image (full-attention blocks)
        or per window (Qwen2.5-VL windowed blocks), over pre-merge patches in the block's order."""
        return QwenVisionAttentionProbe(self.vision_layers[layer].attn)

    def patch_token_probe(self) -> PatchTokenProbe:
        """Maps each pre-merge patch of a vision forward (in the blocks' order) to its merged LLM
        token (see :meth:`token_of_patch`)."""
        return PatchTokenProbe(self.vision_tower, self.token_of_patch)

    def token_of_patch(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """(P,) merged-token index of each patch in block order: ``merge_size²`` consecutive
        patches form one token (``get_vision_position_ids`` lays patches out block-major)."""
        n_patches = int(grid_thw.prod(-1).sum())
        return torch.arange(n_patches, device=grid_thw.device) // self.merge_size**2

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
        return checked_token_count(layouts, n_image_tokens, "image_grid_thw gives")

    def encoder_layouts(self, inputs: Mapping[str, Any], n_sequences: int) -> list[ImageLayout]:
        """One layout per ``image_grid_thw`` row (``n_sequences``, the packed rows, unused)."""
        grids = inputs.get("image_grid_thw")
        if grids is None:
            raise ValueError(f"{self.family} needs `image_grid_thw` in the model inputs")
        total = sum(t * h * w for t, h, w in self._as_list(grids)) // self.merge_size**2
        return self.image_layouts(inputs, total)

    def vision_unit_tokens(self, inputs: Mapping[str, Any]) -> torch.Tensor | None:
        """:meth:`token_of_patch` of the forward's ``image_grid_thw``."""
        return self.token_of_patch(torch.as_tensor(inputs["image_grid_thw"]))
