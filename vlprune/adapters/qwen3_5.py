"""Qwen3.5 (``Qwen3_5ForConditionalGeneration``): Qwen3-VL's ViT (no DeepStack), hybrid decoder.

The vision tower, merge, token layout and M-RoPE are Qwen3-VL's, so every vision-side cut works
as on Qwen2-VL. The decoder interleaves full-attention layers (gated queries, q/k norms,
partial rotary) with linear-attention layers (Gated DeltaNet, ``layer_types`` =
``"linear_attention"``) that carry a recurrent state instead of a KV cache:

- a decoder cut may sit on any layer after the first full-attention one: linear-attention layers
  then run their recurrence over the kept rows only (``vlprune.hooks.recurrent``), which is what
  the unpatched layer computes when fed those rows. A cut at or before the first full-attention
  layer is refused (that layer's cache sizes every attention mask of later decode steps);
- attention signals exist only on full-attention layers: probing a linear-attention layer
  (e.g. FastV's ``layer - 1``) raises ``ValueError`` naming the full-attention layers.
"""

from __future__ import annotations

from vlprune.adapters.qwen2_vl import Qwen2VLAdapter
from vlprune.hooks.signals import TextAttentionProbe


class Qwen3_5Adapter(Qwen2VLAdapter):
    """Qwen2-VL's layout and vision probes; the linear-attention layers of the decoder."""

    family = "qwen3_5"
    model_classes = ("Qwen3_5ForConditionalGeneration",)

    @property
    def recurrent_layers(self) -> frozenset[int]:
        """Decoder layers whose token mixer is linear attention (Gated DeltaNet)."""
        types = self.model.config.text_config.layer_types
        return frozenset(i for i, kind in enumerate(types) if kind == "linear_attention")

    def text_probe(self, layer: int) -> TextAttentionProbe:
        """Attention probe on full-attention layer ``layer``; ``ValueError`` on a
        linear-attention layer (it computes no attention map)."""
        self.check_attention_layers([layer])
        return super().text_probe(layer)
