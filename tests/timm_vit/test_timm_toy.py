"""The shipped toy CLIP tower loaded into timm runs the same computation as transformers'."""

from __future__ import annotations

import pytest
import torch

from vlprune.eval.toy.model import load_toy_model

timm = pytest.importorskip("timm")


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_toy_vit_equals_the_clip_tower(pool):
    """Every block's output equals the CLIP layer's hidden state; the pooled, normed class token
    equals CLIP's ``pooler_output`` (token pooling)."""
    from vlprune.timm.toy import toy_vit

    tower = load_toy_model().model.vision_tower
    model = toy_vit(global_pool=pool)
    x = torch.randn(2, 3, 336, 336, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hf = tower(pixel_values=x, output_hidden_states=True)
        final, inter = model.forward_intermediates(x, output_fmt="NLC", return_prefix_tokens=True)
        for (patches, prefix), expected in zip(inter, hf.hidden_states[1:]):
            torch.testing.assert_close(torch.cat([prefix, patches], 1), expected,
                                       atol=1e-4, rtol=1e-4)
        if pool == "token":
            torch.testing.assert_close(model.forward_head(final, pre_logits=True),
                                       hf.pooler_output, atol=1e-4, rtol=1e-4)
