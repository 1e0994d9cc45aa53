"""Vision attention probes of the new towers recompute exactly the weights the model computes.

Reference: the model's own eager attention weights. Qwen3-VL / Qwen3.5 blocks discard them, so
the eager function of their modeling module is wrapped to record what it returns; SigLIP
(LLaVA-OneVision) returns them with ``output_attentions=True``.
"""

from __future__ import annotations

import sys

import pytest
import torch

from vlprune.adapters import get_adapter
from vlprune.testing import tiny_inputs, tiny_model

LAYER = 1


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_5"])
def test_qwen3_block_probe_equals_eager_weights(family: str, monkeypatch) -> None:
    """Two images of different sizes (two ``cu_seqlens`` segments): per segment, the probe's
    (H, n, n) rows of block 1 == the eager softmax the block computed (2-D vision RoPE)."""
    model = tiny_model(family, attn_implementation="eager")
    inputs = tiny_inputs(family, batch=2, image_sizes=[(192, 128), (128, 160)])
    visual = model.model.visual
    module = sys.modules[type(visual.blocks[0].attn).__module__]
    original = module.eager_attention_forward
    weights: list[torch.Tensor] = []

    def record(*args, **kwargs):
        out, w = original(*args, **kwargs)
        weights.append(w)
        return out, w

    monkeypatch.setattr(module, "eager_attention_forward", record)
    probe = get_adapter(model).vision_probe(LAYER)
    handle = probe.install()
    try:
        with torch.no_grad():
            visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
            rows = probe.rows()
    finally:
        handle.remove()
    per_block = len(weights) // len(visual.blocks)
    assert per_block == len(rows) == 2
    for got, want in zip(rows, weights[LAYER * per_block:(LAYER + 1) * per_block]):
        torch.testing.assert_close(got, want[0].float(), atol=1e-6, rtol=0)


def test_siglip_probe_equals_output_attentions() -> None:
    """LLaVA-OneVision's SigLIP: one sequence per crop (thumbnail + 4 crops per image), no CLS;
    the probe's rows == ``output_attentions`` of the same layer."""
    model = tiny_model("llava_onevision", attn_implementation="eager")
    inputs = tiny_inputs("llava_onevision", batch=2)
    pixels = inputs["pixel_values"].flatten(0, 1)
    probe = get_adapter(model).vision_probe(LAYER)
    handle = probe.install()
    try:
        with torch.no_grad():
            attentions = model.model.vision_tower(pixels, output_attentions=True).attentions
            rows = probe.rows()
    finally:
        handle.remove()
    assert len(rows) == pixels.shape[0] == 10
    torch.testing.assert_close(torch.stack(rows), attentions[LAYER].float(), atol=1e-6, rtol=0)
