"""The patch contract on timm ViTs, over every config in ``CONFIGS`` and every timm method.

Oracles: keep-all equals the unpatched model; a pruned forward equals the unpatched blocks fed
only the kept rows after the cut block (built by hand here); a batch equals its images run one
by one; ``unpatch`` restores bit-identical outputs with no hook or attribute left behind.
"""

from __future__ import annotations

import pytest
import torch

import vlprune
from tests.timm_vit.timm_vits import METHODS, method_configs

timm = pytest.importorskip("timm")

SINGLE_CUT = [method for method in METHODS if method != "flowcut"]
PATCHES = 64


def no_hooks(model: torch.nn.Module) -> bool:
    """No forward / pre-hook on any module and no instance attribute shadowing a method."""
    hooked = any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    return not hooked and "forward_intermediates" not in vars(model)


def reference(
    model: torch.nn.Module, x: torch.Tensor, cut: int, kept: torch.Tensor
) -> torch.Tensor:
    """Unpatched model, rows after the prefix gathered to ``kept`` (B, k) after block ``cut``."""
    prefix = model.num_prefix_tokens
    h = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    for i, block in enumerate(model.blocks):
        h = block(h)
        if i == cut:
            rows = h[:, prefix:].gather(1, kept[..., None].expand(-1, -1, h.shape[-1]))
            h = torch.cat([h[:, :prefix], rows], dim=1)
    return model.forward_head(model.norm(h))


@pytest.mark.parametrize(("config", "method"), method_configs(METHODS))
def test_keep_all_and_unpatch(make_vit, images, config, method):
    """A budget of every patch leaves the logits bit-identical; unpatch restores the model and
    removes every hook; the class is never swapped."""
    model = make_vit(config)
    cls = type(model)
    with torch.no_grad():
        before = model(images)
        with vlprune.patch(model, method, budget=PATCHES) as handle:
            assert type(model) is cls
            assert torch.equal(model(images), before)
            assert handle.stats.kept_tokens == [PATCHES] * 3
        assert no_hooks(model)
        with vlprune.patch(model, method, ratio=0.25, cut_block=1):
            pruned = model(images)
        assert not torch.equal(pruned, before)
        assert no_hooks(model) and type(model) is cls
        assert torch.equal(model(images), before)


@pytest.mark.parametrize(("config", "method"), method_configs(METHODS))
def test_counts_and_batch_equals_singles(make_vit, images, config, method):
    """Each image keeps exactly the budget, prefix tokens on top; a batch of 3 gives the logits
    and kept patches of 3 runs at batch 1 (selection is per image)."""
    model = make_vit(config)
    prefix = model.num_prefix_tokens
    with torch.no_grad(), vlprune.patch(model, method, budget=12, cut_block=2) as handle:
        features = model.forward_features(images)
        assert features.shape == (3, prefix + 12, 32)
        stats = handle.stats
        assert stats.kept_tokens == stats.kept_per_image == [12] * 3
        assert stats.visual_tokens == [PATCHES] * 3 and stats.grid == (8, 8)
        assert stats.seq_len == prefix + PATCHES and stats.kept_seq_len == prefix + 12
        assert stats.vision_layer_tokens[0][0] == prefix + PATCHES
        assert stats.vision_layer_tokens[0][-1] == prefix + 12
        kept = handle.kept_indices
        assert kept.shape == (3, 12) and bool((kept.diff(dim=1) > 0).all())
        assert stats.kept_indices == kept.tolist()
        batch = model(images)
        for i in range(3):
            single = model(images[i:i + 1])
            torch.testing.assert_close(single, batch[i:i + 1], atol=1e-5, rtol=1e-5)
            assert torch.equal(handle.kept_indices[0], kept[i])
    if method not in ("random", "uniform"):
        assert not all(torch.equal(kept[0], row) for row in kept[1:])


@pytest.mark.parametrize(("config", "method"), method_configs(SINGLE_CUT))
@pytest.mark.parametrize("cut", [1, -1])
def test_pruned_equals_oracle(make_vit, images, config, method, cut):
    """The pruned logits equal the unpatched blocks fed only the prefix and the kept rows after
    the cut block (the pooling runs over the kept tokens: token, avg or map)."""
    model = make_vit(config)
    with torch.no_grad():
        with vlprune.patch(model, method, budget=10, cut_block=cut) as handle:
            pruned = model(images)
            kept = handle.kept_indices.clone()
        expected = reference(model, images, cut % len(model.blocks), kept)
    torch.testing.assert_close(pruned, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config", ["cls-token", "dinov2-reg"])
def test_output_cut_keeps_prefix_tokens(make_vit, images, config):
    """After the last block the prefix rows are the unpatched ones, the patch rows are the
    unpatched rows at the kept indices; token pooling therefore leaves the logits unchanged."""
    model = make_vit(config)
    prefix = model.num_prefix_tokens
    with torch.no_grad():
        full = model.forward_features(images)
        logits = model(images)
        with vlprune.patch(model, "hiprune", budget=9) as handle:
            cut = model.forward_features(images)
            kept = handle.kept_indices
            torch.testing.assert_close(model(images), logits, atol=1e-6, rtol=1e-6)
    assert torch.equal(cut[:, :prefix], full[:, :prefix])
    rows = full[:, prefix:].gather(1, kept[..., None].expand(-1, -1, full.shape[-1]))
    assert torch.equal(cut[:, prefix:], rows)


def test_avg_pool_over_kept_tokens(make_vit, images):
    """avg pooling of the output cut is the mean of the unpatched final tokens it kept."""
    model = make_vit("avg-noclass")
    with torch.no_grad():
        full = model.forward_features(images)
        with vlprune.patch(model, "uniform", budget=16) as handle:
            logits = model(images)
            kept = handle.kept_indices
        rows = full.gather(1, kept[..., None].expand(-1, -1, full.shape[-1]))
        expected = model.head(model.fc_norm(rows.mean(dim=1)))
    torch.testing.assert_close(logits, expected, atol=1e-6, rtol=1e-6)


def test_forward_intermediates_output_cut(make_vit, images):
    """NLC intermediates from the cut block on hold the kept tokens, earlier ones every token;
    NCHW raises where it would need a full grid, and works where nothing is cut."""
    model = make_vit("cls-reg2")
    with torch.no_grad(), vlprune.patch(model, "todre", budget=20, cut_block=2) as handle:
        final, inter = model.forward_intermediates(images, output_fmt="NLC")
        assert final.shape[1] == 3 + 20
        assert [t.shape[1] for t in inter] == [64, 64, 20, 20]
        assert handle.kept_indices.shape == (3, 20)
        feats = model.get_intermediate_layers(images, n=[1, 3])
        assert [t.shape[1] for t in feats] == [64, 20]
        early = model.forward_intermediates(images, indices=[0, 1], intermediates_only=True)
        assert early[0].shape == (3, 32, 8, 8)
        with pytest.raises(ValueError, match="output_fmt"):
            model.forward_intermediates(images, indices=[1, 2])
        with pytest.raises(ValueError, match="output_fmt"):
            model.get_intermediate_layers(images, n=1, reshape=True)
    with vlprune.patch(model, "todre", budget=64):
        grid = model.forward_intermediates(images, intermediates_only=True)
    assert grid[-1].shape == (3, 32, 8, 8)


def test_flowcut_cuts_progressively(make_vit, images):
    """FlowCut drops rows after several blocks and ends on the budget at its last cut (peaked
    attention: random weights attend almost uniformly, which FlowCut's entropy rule reads as
    "prune nothing yet")."""
    model = make_vit("cls-token", depth=6)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(6.0)
    with torch.no_grad(), vlprune.patch(model, "flowcut", budget=8) as handle:
        model(images)
    rows = handle.stats.vision_layer_tokens[0]
    assert rows[0] == 65 and rows[-1] == 9
    assert len(set(rows)) > 2 and rows == sorted(rows, reverse=True)


def test_dynamic_image_size(images):
    """A ViT with ``dynamic_img_size`` takes the grid of each input."""
    from tests.timm_vit.timm_vits import build_vit

    model = build_vit(dynamic_img_size=True)
    x = torch.randn(2, 3, 48, 80)
    with torch.no_grad(), vlprune.patch(model, "hiprune", ratio=0.5, cut_block=1) as handle:
        model(x)
    assert handle.stats.grid == (6, 10) and handle.stats.kept_tokens == [30, 30]
