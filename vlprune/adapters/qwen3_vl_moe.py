"""Qwen3-VL-MoE (``Qwen3VLMoeForConditionalGeneration``): Qwen3-VL with a sparse-MoE decoder.

Vision tower, DeepStack, token layout and M-RoPE are Qwen3-VL's; the decoder layers route each
token to ``num_experts_per_tok`` of ``num_experts`` experts, which changes FLOPs, not pruning.
"""

from __future__ import annotations

from vlprune.adapters.qwen3_vl import Qwen3VLAdapter


class Qwen3VLMoeAdapter(Qwen3VLAdapter):
    """Same facts as :class:`~vlprune.adapters.qwen3_vl.Qwen3VLAdapter`."""

    family = "qwen3_vl_moe"
    model_classes = ("Qwen3VLMoeForConditionalGeneration",)
