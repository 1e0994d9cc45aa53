"""Qwen3-VL (``Qwen3VLForConditionalGeneration``): patch-16 ViT with DeepStack, M-RoPE.

Token layout, merge and M-RoPE are Qwen2-VL's (``t × (h/2) × (w/2)`` merged tokens per image,
raster order, ``rope_deltas``). What is new is DeepStack: the vision blocks listed in
``vision_config.deepstack_visual_indexes`` (8/16/24 of 27 in the released models) each feed a
merger (``visual.deepstack_merger_list``); the language model adds those features to its hidden
states at the visual positions after decoder layers ``0 .. len - 1``
(``Qwen3VLTextModel._deepstack_process``). vlprune keeps them consistent with every cut
(``vlprune.hooks.deepstack``).
"""

from __future__ import annotations

from torch import nn

from vlprune.adapters.qwen2_vl import Qwen2VLAdapter


class Qwen3VLAdapter(Qwen2VLAdapter):
    """Qwen2-VL's layout and probes (same fused-``qkv`` vision attention, no windows), plus the
    DeepStack mergers."""

    family = "qwen3_vl"
    model_classes = ("Qwen3VLForConditionalGeneration",)

    @property
    def deepstack_mergers(self) -> list[nn.Module]:
        """``visual.deepstack_merger_list``: one merger per DeepStack vision layer."""
        return list(self._resolve("model.visual.deepstack_merger_list"))
