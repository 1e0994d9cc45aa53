"""Clear errors before any hook or compute: unsupported timm architectures (``TypeError`` naming
why), methods that need a language model, bad options, masks, double patching."""

from __future__ import annotations

import pytest
import torch

import vlprune

timm = pytest.importorskip("timm")


def no_hooks(model: torch.nn.Module) -> bool:
    return not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_hierarchical_and_convolutional_models_raise_type_error():
    """Swin (patch merging) and ConvNeXt (no tokens) are refused, saying why."""
    from timm.models.convnext import ConvNeXt
    from timm.models.swin_transformer import SwinTransformer

    swin = SwinTransformer(img_size=32, patch_size=4, window_size=4, embed_dim=16,
                           depths=(1, 1), num_heads=(1, 2), num_classes=3)
    with pytest.raises(TypeError, match="SwinTransformer: it is hierarchical"):
        vlprune.patch(swin, "random", budget=8)
    convnext = ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 8, 8, 8), num_classes=3)
    with pytest.raises(TypeError, match="ConvNeXt: it is convolutional"):
        vlprune.patch(convnext, "hiprune", budget=8)
    assert no_hooks(swin) and no_hooks(convnext)


def test_attention_methods_need_fused_qkv_attention():
    """A ViT whose blocks have no timm ``Attention`` works with random / uniform only."""
    from timm.models.vision_transformer import ParallelScalingBlock

    from tests.timm_vit.timm_vits import build_vit

    model = build_vit(block_fn=ParallelScalingBlock)
    with pytest.raises(TypeError, match="not timm's Block / ResPostBlock with its fused-qkv"):
        vlprune.patch(model, "hiprune", budget=8)
    assert no_hooks(model)
    with torch.no_grad(), vlprune.patch(model, "uniform", budget=8, cut_block=0):
        assert model.forward_features(torch.randn(1, 3, 64, 64)).shape[1] == 9


@pytest.mark.parametrize(("method", "reason"), [
    ("fastv", "prunes inside a language model"),
    ("transprune", "prunes inside a language model"),
    ("mmtok", "has no language model"),
])
def test_methods_without_a_vision_only_path(make_vit, method, reason):
    """Methods that read the language model refuse a timm ViT."""
    model = make_vit()
    with pytest.raises(ValueError, match=reason):
        vlprune.patch(model, method, budget=8)
    assert no_hooks(model)


@pytest.mark.parametrize("config", ["avg-noclass", "siglip-map"])
@pytest.mark.parametrize("method", ["hired", "globalcom2"])
def test_class_token_methods_need_a_class_token(make_vit, config, method):
    """HiRED and GlobalCom² score by the class token's attention: a ViT without one raises a
    TypeError saying so, before any hook."""
    model = make_vit(config)
    with pytest.raises(TypeError, match=f"{method}' scores patches by the class token's "
                                        "attention, and this VisionTransformer has no class"):
        vlprune.patch(model, method, budget=8)
    assert no_hooks(model) and vlprune.get_handle(model) is None


def test_todre_stage2_is_refused(make_vit):
    """ToDRE runs stage 1 on timm; asking for stage 2 names the missing language model."""
    model = make_vit()
    with pytest.raises(ValueError, match="no language model"):
        vlprune.patch(model, "todre", budget=8, stage2=True)
    with vlprune.patch(model, "todre", budget=8) as handle:
        assert handle.stats.settings["stage2"] is False


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"budget": 8, "cut_block": 4}, "cut_block"),
    ({"budget": 8, "cut_block": -5}, "cut_block"),
    ({"budget": 8, "cut_block": 1.0}, "cut_block"),
    ({"budget": 0}, "budget"),
    ({"ratio": 1.5}, "ratio"),
    ({"budget": 8, "ratio": 0.5}, "exactly one"),
    ({"budget": 8, "alpha": 2.0}, "alpha"),
    ({"budget": 8, "object_layer": 3, "cut_block": 1}, "object_layer"),
])
def test_bad_values(make_vit, kwargs, match):
    """Bad values raise ``ValueError`` naming the parameter; nothing is installed."""
    model = make_vit()
    with pytest.raises(ValueError, match=match):
        vlprune.patch(model, "hiprune", **kwargs)
    assert no_hooks(model)


def test_attn_mask_and_double_patch(make_vit, images):
    """A mask over every token is refused; a second patch raises ``AlreadyPatchedError``."""
    model = make_vit()
    with vlprune.patch(model, "random", budget=8):
        with pytest.raises(ValueError, match="attn_mask"):
            model(images, attn_mask=torch.ones(64 + 1, 64 + 1, dtype=torch.bool))
        with pytest.raises(vlprune.AlreadyPatchedError):
            vlprune.patch(model, "uniform", budget=8)
    assert no_hooks(model)


def test_flowcut_schedule_must_reach_the_budget(make_vit, images):
    """With a class token FlowCut's last cut is one block before ``cut_block``: block 0 is too
    early, and the first forward says so instead of returning unpruned tokens."""
    model = make_vit()
    with vlprune.patch(model, "flowcut", budget=8, cut_block=0), pytest.raises(
        RuntimeError, match="does not reach the budget"
    ):
        model(images)
