"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): windowed ViT, RMSNorm merger, M-RoPE."""

from __future__ import annotations

import torch
from transformers.vision_utils import get_vision_window_index

from vlprune.adapters.qwen2_vl import Qwen2VLAdapter


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    """Same token layout as Qwen2-VL; its ViT runs in window order (merger output is raster)."""

    family = "qwen2_5_vl"
    model_classes = ("Qwen2_5_VLForConditionalGeneration",)

    def token_of_patch(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """(P,) merged-token index of each patch in block order: the blocks see merge groups
        permuted into windows, so group g is token ``window_index[g]`` (transformers' own
        ``get_vision_window_index``, as ``Qwen2_5_VisionTransformerPretrainedModel`` uses)."""
        vision = self.model.config.vision_config
        window_index, _ = get_vision_window_index(
            grid_thw, vision.spatial_merge_size, vision.window_size, vision.patch_size
        )
        return window_index.to(grid_thw.device).repeat_interleave(self.merge_size**2)
