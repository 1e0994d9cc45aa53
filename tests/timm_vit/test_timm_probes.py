"""Attention probes of timm blocks equal the block's own eager attention (``fused_attn=False``),
and the selection methods make from them is the one the eager maps give."""

from __future__ import annotations

import pytest
import torch

import vlprune
from vlprune.hooks.signals import VisionAttentionScores
from vlprune.methods.hiprune import hiprune_keep
from vlprune.timm.adapter import TimmViTAdapter

timm = pytest.importorskip("timm")


def eager_maps(model: torch.nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """(B, H, N, N) softmax maps of every block, from timm's own non-fused path."""
    maps: list[torch.Tensor] = []
    hooks = []
    for block in model.blocks:
        block.attn.fused_attn = False
        hooks.append(block.attn.attn_drop.register_forward_hook(
            lambda module, args, out: maps.append(out.detach())))
    with torch.no_grad():
        model(images)
    for hook in hooks:
        hook.remove()
    return maps


@pytest.mark.parametrize("config", ["cls-token", "clip-prenorm", "cls-reg2", "siglip-map"])
def test_probe_rows_equal_eager_attention(make_vit, images, config):
    """Rows of the class query (or of every query) equal the eager map over the rows shown:
    class token + patches; with registers, renormalised over those rows."""
    model = make_vit(config)
    adapter = TimmViTAdapter(model)
    shown = ([0] if adapter.has_cls else []) + list(range(adapter.prefix, adapter.prefix + 64))
    probe = adapter.vision_probe(2)
    handle = probe.install()
    with torch.no_grad():
        model(images)
    handle.remove()
    eager = eager_maps(model, images)[2][:, :, shown][..., shown]
    eager = eager / eager.sum(-1, keepdim=True)
    rows = probe.rows(torch.tensor([0]))
    for b in range(3):
        torch.testing.assert_close(rows[b], eager[b, :, :1], atol=1e-5, rtol=1e-4)
    received = VisionAttentionScores(probe).received()
    for b in range(3):
        torch.testing.assert_close(received[b], eager[b].mean(0).sum(0), atol=1e-4, rtol=1e-4)


def test_hiprune_selection_matches_eager_scores(make_vit, images):
    """HiPrune on a 4-block ViT (object block 1, deep block 2) keeps what its own algorithm
    keeps on column sums of the eager maps."""
    model = make_vit("cls-token")
    maps = eager_maps(model, images)
    for block in model.blocks:
        block.attn.fused_attn = True
    with torch.no_grad(), vlprune.patch(model, "hiprune", budget=20, alpha=0.5) as handle:
        model(images)
        kept = handle.kept_indices
    valid = torch.ones(64, dtype=torch.bool)
    for b in range(3):
        obj = maps[1][b].mean(0).sum(0)[1:]
        deep = maps[2][b].mean(0).sum(0)[1:]
        expected = hiprune_keep(obj, deep, valid, (1, 8, 8), 20, alpha=0.5)
        assert torch.equal(kept[b], expected)


def test_probe_projects_only_requested_queries(make_vit, images):
    """The class-row request projects one query row per image, not the whole sequence."""
    model = make_vit("cls-token")
    adapter = TimmViTAdapter(model)
    probe = adapter.vision_probe(0)
    handle = probe.install()
    with torch.no_grad():
        model(images)
    handle.remove()
    seen = []
    q_proj = probe.attention.q_proj
    probe.attention.q_proj = lambda x: (seen.append(x.shape), q_proj(x))[1]
    probe.rows(torch.tensor([0]))
    assert seen == [torch.Size([3, 1, 32])]
