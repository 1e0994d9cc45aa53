"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): windowed ViT, RMSNorm merger, M-RoPE."""

from __future__ import annotations

from vlprune.adapters.qwen2_vl import Qwen2VLAdapter


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    """Same token layout as Qwen2-VL; its ViT runs in window order (merger output is raster)."""

    family = "qwen2_5_vl"
    model_classes = ("Qwen2_5_VLForConditionalGeneration",)
