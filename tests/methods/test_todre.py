"""Tests for ``todre``: greedy max-sum / k-center on planted embeddings, the pivot from planted
[CLS] (thumbnail) and global-query attention, stage 2's per-sample decision on planted attention,
stage switches, and the method on tiny models of every family (counts, batched generate,
keep-all, a batch whose samples decide differently equals each sample alone)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import vlprune
import vlprune.methods.todre as todre_module
from tests.helpers import cached_model
from vlprune.adapters import get_adapter
from vlprune.adapters.base import ImageLayout
from vlprune.budget import Budget
from vlprune.hooks.signals import GlobalQueryAttention, VisionAttentionProbe
from vlprune.methods.base import DecoderBatch, VisionBatch
from vlprune.methods.todre import ToDRE, diverse_order, relevance_ratio
from vlprune.testing import FAMILIES, tiny_inputs

BIG = 10**6


def _clusters(n_axes: int, copies: int) -> torch.Tensor:
    """``copies`` identical tokens along each of ``n_axes`` orthogonal axes, axis-major."""
    return torch.eye(n_axes).repeat_interleave(copies, dim=0)


# ------------------------------------------------------------------------------ stage 1


@pytest.mark.parametrize("variant", ["maxsum", "kcenter"])
def test_greedy_takes_one_token_per_orthogonal_cluster(variant: str) -> None:
    """4 orthogonal clusters of 3 copies, pivot 4 (cluster 1): every later pick is the first
    token of an untouched cluster (ties → lower index), never a copy of a picked one."""
    order = diverse_order(_clusters(4, 3), pivot=4, k=4, variant=variant)
    assert order.tolist() == [4, 0, 6, 9]


def test_max_sum_and_k_center_differ_as_defined() -> None:
    """Picks p = e1, then q = e2 (cos 0 with p: lowest sum, farthest). Third: A has cos 0.5 with
    both (sum 1.0, nearest distance 0.5), B cos 0.8 / −0.5 (sum 0.3, nearest distance 0.2):
    max-sum (v2) takes B, k-center (v1) takes A."""
    feats = torch.tensor([
        [1.0, 0.0, 0.0],
        [0.0, 1.0, 0.0],
        [0.5, 0.5, math.sqrt(0.5)],
        [0.8, -0.5, math.sqrt(0.11)],
    ])
    assert diverse_order(feats, 0, 3, "maxsum").tolist() == [0, 1, 3]
    assert diverse_order(feats, 0, 3, "kcenter").tolist() == [0, 1, 2]


def _cls_probe(patch_scores: list[torch.Tensor]) -> SimpleNamespace:
    """A stand-in CLIP probe: per sequence one head whose CLS row puts ``patch_scores`` on the
    patches (CLS key 0)."""
    seqs = [torch.cat([torch.zeros(1), s])[None, None, :] for s in patch_scores]
    return SimpleNamespace(rows=lambda queries: seqs)


def _vision_batch(layouts, keep, feats, probes) -> VisionBatch:
    return VisionBatch(layouts, keep, feats, [0] * len(layouts), torch.zeros(1, 1), None, probes)


def test_cls_pivot_then_diversity_on_a_4x4_image() -> None:
    """4×4 LLaVA grid of 4 orthogonal clusters (rows); [CLS] attends most to token 9 (row 2),
    so row 2 is represented by token 9 and the other rows by their first token."""
    layout = ImageLayout(num_tokens=16, grid=(4, 4))
    attention = torch.zeros(16)
    attention[9] = 1.0
    batch = _vision_batch([layout], [4], [_clusters(4, 4)], {"cls": _cls_probe([attention])})
    assert ToDRE().select(batch)[0].tolist() == [0, 4, 9, 12]


def test_next_pivot_comes_from_the_thumbnail() -> None:
    """LLaVA-NeXT: the pivot is the thumbnail cell with the highest thumbnail-[CLS] attention
    (cell 2), even when a crop's [CLS] peaks higher; features all equal, so the greedy then
    simply takes the lowest indices."""
    layout = ImageLayout(num_tokens=4 + 2 * 5, grid=(2, 2), crop_grid=(1, 2), highres=(2, 4),
                         newline=True)
    scores = [torch.tensor([0.1, 0.2, 0.6, 0.1])] + [torch.tensor([0.0, 0.0, 0.0, 1.0])] * 2
    feats = torch.ones(layout.num_tokens, 3)
    batch = _vision_batch([layout], [3], [feats], {"cls": _cls_probe(scores)})
    assert ToDRE().select(batch)[0].tolist() == [0, 1, 2]
    assert ToDRE(newline="drop").select(batch)[0].tolist() == [0, 1, 2]
    batch = _vision_batch([layout], [4], [feats], {"cls": _cls_probe(scores)})
    assert ToDRE(newline="drop").select(batch)[0].tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("family", FAMILIES)
def test_default_pivot_layer(family: str) -> None:
    """-2 with [CLS] (tiny CLIP: 3 layers, layer 1); without, the encoder's feature layer (tiny
    SigLIP: its last of 3, layer 2; the Qwen ViTs' last block)."""
    adapter = get_adapter(cached_model(family))
    expected = {"llava": 1, "llava_next": 1, "llava_onevision": 2, "qwen2_vl": 1}.get(family, 3)
    assert ToDRE()._pivot_layer(adapter) == expected


def test_global_query_attention_by_hand() -> None:
    """The mean query of a sequence attends like any query: keys k = [[0], [ln 3]] (d = 1, one
    head, scale 1) and queries averaging to 1 give softmax([0, ln 3]) = [0.25, 0.75]."""

    class _Planted(VisionAttentionProbe):
        def query_key(self):
            q = torch.tensor([[[0.5], [1.5]]])
            k = torch.tensor([[[0.0], [math.log(3.0)]]])
            return [(q, k)]

    probe = _Planted(SimpleNamespace(scale=1.0))
    probe.inputs = {}
    torch.testing.assert_close(GlobalQueryAttention(probe).rows()[0], torch.tensor([0.25, 0.75]))


def test_stage1_off_keeps_every_token() -> None:
    """With stage 1 off the vision side keeps everything, whatever the budget."""
    layout = ImageLayout(num_tokens=16, grid=(4, 4))
    method = ToDRE(stage1=False)
    assert method.budgets([layout], Budget(tokens=3)) == [16]
    batch = _vision_batch([layout], [16], [torch.zeros(16, 2)], {})
    assert method.select(batch)[0].tolist() == list(range(16))
    assert ToDRE(stage2=False).cut_layers(32) == []
    assert ToDRE().cut_layers(32) == [28]


# ------------------------------------------------------------------------------ stage 2


def _text_probe(rows: torch.Tensor) -> SimpleNamespace:
    """A stand-in text probe returning fixed head-mean rows (B, 1, Q, L) for any queries."""
    return SimpleNamespace(rows=lambda queries: rows[:, None])


def test_relevance_ratio_by_hand() -> None:
    """Mean attention mass of the text queries on the visual keys (a non-query row ignored)."""
    attention = torch.tensor([[[0.5, 0.3, 0.2, 0.0], [0.2, 0.1, 0.1, 0.6], [0.0, 1.0, 0, 0]]])
    is_image = torch.tensor([[False, True, True, False]])
    queries = torch.tensor([[True, True, False]])
    torch.testing.assert_close(relevance_ratio(attention, is_image, queries),
                               torch.tensor([(0.5 + 0.2) / 2]))


def test_stage2_drops_all_visual_rows_exactly_below_tau() -> None:
    """Rows [S, V, V, T, T]: sample 0's text puts 0.05 on the image (< τ = 0.1) and loses both
    visual rows (left-padded slots); sample 1 puts 0.5 and keeps them; nobody below → None;
    everybody below with equal counts → a plain (B, L − 2) index."""
    is_image = torch.tensor([[False, True, True, False, False]] * 2)
    low = torch.tensor([0.95, 0.03, 0.02, 0.0, 0.0])
    high = torch.tensor([0.5, 0.25, 0.25, 0.0, 0.0])

    def ctx(*samples: torch.Tensor) -> DecoderBatch:
        rows = torch.stack([s.expand(2, 5) for s in samples])
        return DecoderBatch(28, torch.zeros(2, 5, 1), is_image, {"text": _text_probe(rows)})

    index, slots = ToDRE().choose(ctx(low, high), Budget(tokens=1))
    assert index[0, 2:].tolist() == [0, 3, 4] and slots[0].tolist() == [False, False, True,
                                                                         True, True]
    assert index[1].tolist() == [0, 1, 2, 3, 4] and bool(slots[1].all())
    assert ToDRE().choose(ctx(high, high), Budget(tokens=1)) is None
    assert ToDRE().choose(ctx(low, low), Budget(tokens=1)).tolist() == [[0, 3, 4]] * 2
    assert ToDRE(tau=0.04).choose(ctx(low, high), Budget(tokens=1)) is None


# ------------------------------------------------------------------------- tiny models


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_models_count_generate_and_keep_all(family: str) -> None:
    """Stage 1 keeps ``ceil(0.25·N)`` per image; batch-2 generation runs; a budget above every
    image with τ = 0 (stage 2 never fires) equals the unpatched model."""
    model = cached_model(family)
    inputs = tiny_inputs(family, batch=2)
    with torch.no_grad():
        ref_logits = model(**inputs).logits
        ref_tokens = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    with vlprune.patch(model, "todre", ratio=0.25) as handle, torch.no_grad():
        model.generate(**inputs, max_new_tokens=5, do_sample=False)
        stats = handle.stats
    assert stats.kept_per_image == [math.ceil(0.25 * n) for n in stats.visual_tokens]
    with vlprune.patch(model, "todre", budget=BIG, tau=0.0), torch.no_grad():
        logits = model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    assert torch.equal(tokens, ref_tokens)


@pytest.mark.parametrize("family", FAMILIES)
def test_samples_deciding_differently_equal_single_runs(family: str, monkeypatch) -> None:
    """τ set between the two samples' ratios: only the lower one loses its visual rows from the
    check layer on, and each sample's greedy tokens equal the sample run alone."""
    model = cached_model(family)
    batch = tiny_inputs(family, batch=2, n_words=[4, 9], seed=7)
    seen: list[torch.Tensor] = []

    def record(*args):
        seen.append(relevance_ratio(*args))
        return seen[-1]

    monkeypatch.setattr(todre_module, "relevance_ratio", record)
    with vlprune.patch(model, "todre", ratio=0.5, tau=0.0), torch.no_grad():
        model(**batch)
    ratio = seen[-1]
    tau = float(ratio.mean())
    low = int(ratio.argmin())
    with vlprune.patch(model, "todre", ratio=0.5, tau=tau) as handle, torch.no_grad():
        tokens = model.generate(**batch, max_new_tokens=5, do_sample=False)
        kept = handle.stats.kept_tokens
        for i in range(2):
            single = tiny_inputs(family, batch=1, n_words=[[4, 9][i]], seed=7 + i)
            ref = model.generate(**single, max_new_tokens=5, do_sample=False)
            new = tokens[i:i + 1, batch["input_ids"].shape[1]:]
            assert torch.equal(new, ref[:, single["input_ids"].shape[1]:])
    assert kept[low] == 0 and kept[1 - low] > 0


def test_options_are_validated() -> None:
    """Bad options raise ``ValueError`` naming the option."""
    for options, name in [
        ({"stage1": False, "stage2": False}, "stage"),
        ({"variant": "greedy"}, "variant"),
        ({"pivot": "cls"}, "pivot"),
        ({"tau": 1.5}, "tau"),
        ({"newline": "keep"}, "newline"),
        ({"drop_layer": 1.5}, "drop_layer"),
        ({"stage1": 1}, "stage1"),
    ]:
        with pytest.raises(ValueError, match=name):
            ToDRE(**options)
    with pytest.raises(ValueError, match="drop_layer"):
        vlprune.patch(cached_model("llava"), "todre", ratio=0.5, drop_layer=4)
