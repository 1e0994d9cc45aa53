"""Attention probes of timm blocks equal the block's own eager attention (``fused_attn=False``):
the model's probabilities, register tokens in every softmax, reported over ``[CLS] + patches``;
and the selection methods make from them is the one the eager maps give."""

from __future__ import annotations

import pytest
import torch

import vlprune
from tests.timm_vit.timm_vits import CONFIGS
from vlprune.hooks.signals import GlobalQueryAttention, VisionAttentionScores, VisionQKV
from vlprune.kernels import select_topk
from vlprune.methods.flowcut import clip_scores
from vlprune.methods.hiprune import hiprune_keep
from vlprune.timm.adapter import TimmViTAdapter

timm = pytest.importorskip("timm")

BLOCK = 2


def eager_maps(model: torch.nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """(B, H, N, N) softmax maps of every block over all N rows (registers included), from
    timm's own non-fused path."""
    maps: list[torch.Tensor] = []
    hooks = []
    for block in model.blocks:
        block.attn.fused_attn = False
        hooks.append(block.attn.attn_drop.register_forward_hook(
            lambda module, args, out: maps.append(out.detach())))
    with torch.no_grad():
        model(images)
    for hook, block in zip(hooks, model.blocks):
        hook.remove()
        block.attn.fused_attn = True
    return maps


def timm_qkv(model: torch.nn.Module, images: torch.Tensor, block: int) -> tuple[torch.Tensor, ...]:
    """(B, H, N, d) q, k, v of ``block`` over all N rows, computed as timm's ``Attention`` does
    from its input."""
    attn = model.blocks[block].attn
    seen = []
    hook = attn.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        model(images)
        hook.remove()
        x = seen[0]
        q, k, v = attn.qkv(x).reshape(*x.shape[:2], 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        return attn.q_norm(q), attn.k_norm(k), v


def shown_rows(adapter: TimmViTAdapter, patches: int = 64) -> list[int]:
    """Rows a method sees: the class row (if any), then the patches (registers left out)."""
    return ([0] if adapter.has_cls else []) + list(range(adapter.prefix, adapter.prefix + patches))


def probed(model: torch.nn.Module, images: torch.Tensor):
    """The adapter and block ``BLOCK``'s probe after one forward of ``images``."""
    adapter = TimmViTAdapter(model)
    probe = adapter.vision_probe(BLOCK)
    handle = probe.install()
    with torch.no_grad():
        model(images)
    handle.remove()
    return adapter, probe


@pytest.mark.parametrize("config", list(CONFIGS))
def test_probe_rows_equal_eager_attention(make_vit, images, config):
    """Every row, the class row, the column sums and the pre-softmax scores over ``[CLS] +
    patches`` equal the eager map of the model restricted to those rows: register keys are in
    the softmax (with registers a row sums to less than 1)."""
    model = make_vit(config)
    adapter, probe = probed(model, images)
    shown = shown_rows(adapter)
    eager = eager_maps(model, images)[BLOCK][:, :, shown][..., shown]
    scores = VisionAttentionScores(probe)
    received = scores.received()
    every = probe.rows()
    for b in range(3):
        torch.testing.assert_close(every[b], eager[b], atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(received[b], eager[b].mean(0).sum(0), atol=1e-5, rtol=1e-4)
    if adapter.prefix > int(adapter.has_cls):
        assert float(eager.sum(-1).max()) < 1 - 1e-3
    if not adapter.has_cls:
        return
    cls_rows = probe.rows(torch.tensor([0]))
    logits = scores.logits(torch.tensor([0]))
    for b in range(3):
        torch.testing.assert_close(cls_rows[b], eager[b, :, :1], atol=1e-6, rtol=1e-4)
        log_p = eager[b, :, :1].log()
        torch.testing.assert_close(logits[b] - logits[b][..., :1], log_p - log_p[..., :1],
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("config", ["cls-reg2", "dinov2-reg", "siglip-map"])
def test_global_query_and_qkv_keep_register_keys(make_vit, images, config):
    """``GlobalQueryAttention`` (mean query of the rows shown) and ``VisionQKV`` (FlowCut) read
    timm's own q, k, v: shown rows first, register rows last, in every softmax; FlowCut's class
    attention equals the eager class row over the patches."""
    model = make_vit(config)
    adapter, probe = probed(model, images)
    shown = shown_rows(adapter)
    order = shown + list(range(int(adapter.has_cls), adapter.prefix))
    q, k, v = timm_qkv(model, images, BLOCK)
    scale = probe.scale
    glob = GlobalQueryAttention(probe).rows()
    for b, (pq, pk, pv) in enumerate(VisionQKV(probe).qkv()):
        torch.testing.assert_close(pq, q[b][:, shown], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(pk, k[b][:, order], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(pv, v[b][:, order], atol=1e-6, rtol=1e-5)
        mean_query = q[b][:, shown].mean(1, keepdim=True)
        expected = ((mean_query @ k[b].transpose(1, 2)) * scale).softmax(-1).mean(0)[0, shown]
        torch.testing.assert_close(glob[b], expected, atol=1e-6, rtol=1e-4)
    if adapter.has_cls:
        eager = eager_maps(model, images)[BLOCK]
        for b, (pq, pk, pv) in enumerate(VisionQKV(probe).qkv()):
            _, attention = clip_scores(pq, pk, pv, scale)
            expected = eager[b, :, 0, shown[1:]].mean(0)
            torch.testing.assert_close(attention, expected, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("config", ["cls-token", "dinov2-reg"])
def test_hiprune_selection_matches_eager_scores(make_vit, images, config):
    """HiPrune on a 4-block ViT (object block 1, deep block 2) keeps what its own algorithm
    keeps on the column sums of the model's eager maps over ``[CLS] + patches``."""
    model = make_vit(config)
    adapter = TimmViTAdapter(model)
    shown = shown_rows(adapter)
    maps = [m[:, :, shown][..., shown] for m in eager_maps(model, images)]
    with torch.no_grad(), vlprune.patch(model, "hiprune", budget=20, alpha=0.5) as handle:
        model(images)
        kept = handle.kept_indices
    valid = torch.ones(64, dtype=torch.bool)
    for b in range(3):
        obj = maps[1][b].mean(0).sum(0)[1:]
        deep = maps[2][b].mean(0).sum(0)[1:]
        expected = hiprune_keep(obj, deep, valid, (1, 8, 8), 20, alpha=0.5)
        assert torch.equal(kept[b], expected)


def test_class_token_methods_match_eager_scores(make_vit, images):
    """With registers, HiRED keeps the top patches by the head-summed class row of the eager map
    (final layer -2: block 2 of 4), GlobalCom² by the head-mean pre-softmax class row
    ``q·kᵀ·scale`` of timm's own q, k (layer -1: block 3)."""
    model = make_vit("dinov2-reg")
    shown = shown_rows(TimmViTAdapter(model))
    hired_scores = eager_maps(model, images)[2][:, :, 0, shown[1:]].sum(1)
    q, k, _ = timm_qkv(model, images, 3)
    scale = model.blocks[3].attn.scale
    logits = ((q[:, :, :1] @ k[:, :, shown[1:]].transpose(2, 3)) * scale).mean(1)[:, 0]
    for method, scores in (("hired", hired_scores), ("globalcom2", logits)):
        with torch.no_grad(), vlprune.patch(model, method, budget=12) as handle:
            model(images)
            kept = handle.kept_indices
        for b in range(3):
            assert torch.equal(kept[b], select_topk(scores[b], 12)), method


def test_probe_projects_only_requested_queries(make_vit, images):
    """The class-row request projects one query row per image, not the whole sequence."""
    _, probe = probed(make_vit("cls-reg2"), images)
    seen = []
    q_proj = probe.attention.q_proj
    probe.attention.q_proj = lambda x: (seen.append(x.shape), q_proj(x))[1]
    probe.rows(torch.tensor([0]))
    assert seen == [torch.Size([3, 1, 32])]
