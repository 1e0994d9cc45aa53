"""Tests for ``hiprune``: neighbours, anchors/buffers/registers on planted grids, the LLaVA-NeXT
equal split over thumbnail and unpadded crops, Qwen patch → token mapping, the official
algorithm on real CLIP attention, and the method on tiny models of every family."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import vlprune
from tests.helpers import cached_model
from vlprune.adapters import get_adapter
from vlprune.adapters.base import ImageLayout
from vlprune.hooks.signals import VisionAttentionScores
from vlprune.methods._vision_common import apportion, scale_layer
from vlprune.methods.base import VisionBatch
from vlprune.methods.hiprune import HiPrune, hiprune_keep, neighbours
from vlprune.testing import FAMILIES, tiny_inputs, tiny_model

GRID6 = (1, 6, 6)


def _set(x: torch.Tensor) -> set[int]:
    return set(x.tolist())


def _batch(layouts, keep, probes) -> VisionBatch:
    feats = [torch.zeros(layout.num_tokens, 2) for layout in layouts]
    return VisionBatch(layouts, keep, feats, [0] * len(layouts), torch.zeros(1, 1), None, probes)


def _received(seqs: list[torch.Tensor]) -> SimpleNamespace:
    """A stand-in for :class:`VisionAttentionScores` returning planted per-sequence scores."""
    return SimpleNamespace(received=lambda: seqs)


# ----------------------------------------------------------------------------- pure steps


def test_neighbours_are_the_four_in_grid_cells() -> None:
    """4×4 grid: interior 5 → {1, 4, 6, 9}; left-edge 4 → {0, 5, 8} (no wrap); corner 15 →
    {11, 14}."""
    shape = (1, 4, 4)
    assert _set(neighbours(torch.tensor([5]), shape, wrap=False)) == {1, 4, 6, 9}
    assert _set(neighbours(torch.tensor([4]), shape, wrap=False)) == {0, 5, 8}
    assert _set(neighbours(torch.tensor([15]), shape, wrap=False)) == {11, 14}


def test_official_neighbours_wrap_and_clamp() -> None:
    """``wrap=True`` pins the official ``i±1, i±W`` clamped to [0, N-1]: 4 → 3 (end of row 0),
    0 → 0 and 1 and 4 (up / left collapse onto 0), 15 → 14, 15, 11."""
    shape = (1, 4, 4)
    assert _set(neighbours(torch.tensor([4]), shape, wrap=True)) == {3, 5, 0, 8}
    assert _set(neighbours(torch.tensor([0]), shape, wrap=True)) == {0, 1, 4}
    assert _set(neighbours(torch.tensor([15]), shape, wrap=True)) == {14, 15, 11}


def test_neighbours_stay_in_their_frame() -> None:
    """Two 2×2 frames: token 2 (frame 0, row 1) has no neighbour below in frame 1 (wrap off)."""
    assert _set(neighbours(torch.tensor([2]), (2, 2, 2), wrap=False)) == {0, 3}


def test_anchor_buffers_then_registers_on_6x6() -> None:
    """6×6, k=10, α=0.5 → N_a = round(1.0) = 1 anchor: the object peak 15 (row 2, col 3) with
    buffers {9, 14, 16, 21}; the 5 registers are the best deep scores outside S (35..31), even
    though S's own deep scores are the highest of all."""
    obj = torch.zeros(36)
    obj[15] = 5.0
    deep = torch.arange(36.0)
    deep[[9, 14, 15, 16, 21]] = 100.0
    keep = hiprune_keep(obj, deep, torch.ones(36, dtype=torch.bool), GRID6, 10, alpha=0.5)
    assert keep.tolist() == [9, 14, 15, 16, 21, 31, 32, 33, 34, 35]


def test_anchor_count_uses_bankers_rounding() -> None:
    """α·k/5 = 0.5 rounds to 0 anchors (k=5, α=0.5): a pure top-5 of the deep layer; 1.5
    rounds to 2 (k=15): two anchors, each with its buffer cross."""
    obj = torch.zeros(36)
    obj[[7, 28]] = torch.tensor([9.0, 8.0])
    deep = -torch.arange(36.0)  # registers prefer low indices
    valid = torch.ones(36, dtype=torch.bool)
    assert hiprune_keep(obj, deep, valid, GRID6, 5, alpha=0.5).tolist() == [0, 1, 2, 3, 4]
    keep = _set(hiprune_keep(obj, deep, valid, GRID6, 15, alpha=0.5))
    crosses = {7, 1, 6, 8, 13, 28, 22, 27, 29, 34}
    assert crosses <= keep
    assert keep - crosses == {0, 2, 3, 4, 5}


def test_kept_count_is_exact_and_skips_invalid_cells() -> None:
    """Column 0 removed (unpadding): the anchor at 6 (row 1, col 0) is never picked; the anchor
    moves to the best valid cell 7 and buffers never land on column 0; |keep| == k always."""
    obj = torch.zeros(36)
    obj[6], obj[7] = 10.0, 9.0
    valid = torch.ones(6, 6, dtype=torch.bool)
    valid[:, 0] = False
    valid = valid.flatten()
    deep = torch.rand(36, generator=torch.Generator().manual_seed(0))
    for k in range(0, 31):
        keep = hiprune_keep(obj, deep, valid, GRID6, k, alpha=1.0)
        assert keep.numel() == k and bool(valid[keep].all())
        assert keep.unique().numel() == k and bool((keep.diff() > 0).all())
    assert {7, 1, 8, 13} <= _set(hiprune_keep(obj, deep, valid, GRID6, 10, alpha=1.0))


def test_scale_layer_keeps_official_layers_at_reference_depth() -> None:
    """floor(l·depth/ref): identity at 24 / 32 layers; CLIP 8 → 1 and Qwen 15 → 1 at depth 3 / 4."""
    assert scale_layer(8, 24, 24) == 8 and scale_layer(15, 32, 32) == 15
    assert scale_layer(8, 24, 3) == 1 and scale_layer(15, 32, 4) == 1


# Default (object, deep) layers of the tiny encoders, by hand. CLIP (3 layers, feature layer -2
# = 1): object floor(8·3/24) = 1, deep -2 = 1. SigLIP (3 layers, feature layer -1 = 2): CLIP's
# object rule, deep = its feature layer 2. Qwen ViTs (depth d): floor(15·d/32), the last block.
DEFAULT_LAYERS = {"llava": (1, 1), "llava_next": (1, 1), "llava_onevision": (1, 2),
                  "qwen2_vl": (0, 1), "qwen2_5_vl": (1, 3), "qwen3_vl": (1, 3),
                  "qwen3_vl_moe": (1, 3), "qwen3_5": (1, 3)}


@pytest.mark.parametrize("family", FAMILIES)
def test_default_layers_per_encoder(family: str) -> None:
    """The official layers where they exist (CLIP, Qwen2.5-VL); the CLIP rule on a batched
    encoder without CLS (SigLIP: deep = its own feature layer); Qwen2.5-VL's elsewhere."""
    assert HiPrune().layers(get_adapter(cached_model(family))) == DEFAULT_LAYERS[family]


# ------------------------------------------------------------------ select on planted probes

# 4×4 thumbnail + 1×2 crops whose padded 4×8 canvas loses column 0 and column 7 (offset 1):
# each crop keeps 3 of its 4 columns. Tokens: 16 thumbnail, then 4 rows of 6 + newline.
NEXT_SMALL = ImageLayout(
    num_tokens=16 + 4 * 7, grid=(4, 4), crop_grid=(1, 2), highres=(4, 6), highres_offset=(0, 1),
    newline=True,
)


def _cls_padded(patch_scores: torch.Tensor) -> torch.Tensor:
    """Prepend a CLS key (never kept) to a patch score vector."""
    return torch.cat([torch.tensor([1e3]), patch_scores])


def test_next_equal_split_maps_crop_cells_to_canvas_tokens() -> None:
    """budget 9 = 3 per partition (α=0: registers only). Thumbnail peaks 0, 5, 10 are kept as
    is. Crop 0's best patch (0,0) lies in the removed column, so (1,1), (2,2), (3,3) win →
    canvas (r, c-1) → tokens 23, 31, 39; crop 1's (0,0), (0,1), (3,2) → canvas (r, 3+c) →
    19, 20, 42. No newline is kept (``newline="drop"``)."""
    thumb = torch.zeros(16)
    thumb[[0, 5, 10]] = 1.0
    crop0 = torch.zeros(16)
    crop0[[0, 5, 10, 15]] = torch.tensor([9.0, 3.0, 2.0, 1.0])
    crop1 = torch.zeros(16)
    crop1[[0, 1, 14]] = 1.0
    seqs = [_cls_padded(s) for s in (thumb, crop0, crop1)]
    probes = {"object": _received(seqs), "deep": _received(seqs)}
    kept = HiPrune(alpha=0.0).select(_batch([NEXT_SMALL], [9], probes))
    assert kept[0].tolist() == [0, 5, 10, 19, 20, 23, 31, 39, 42]


def test_next_budget_beyond_content_fills_with_newlines() -> None:
    """40 content tokens: budget 42 keeps them all plus the first two newlines (22, 29)."""
    seqs = [_cls_padded(torch.rand(16)) for _ in range(3)]
    probes = {"object": _received(seqs), "deep": _received(seqs)}
    kept = HiPrune().select(_batch([NEXT_SMALL], [42], probes))[0]
    newlines = {22, 29, 36, 43}
    assert kept.numel() == 42 and _set(kept) & newlines == {22, 29}


def test_equal_split_is_exact_with_capacities() -> None:
    """Equal shares, remainder to the first parts, overflow of a full part re-split."""
    assert apportion(10, [1, 1, 1], [16, 12, 12]) == [4, 3, 3]
    assert apportion(30, [1, 1, 1], [16, 12, 2]) == [16, 12, 2]
    assert apportion(20, [1, 1, 1], [16, 12, 2]) == [9, 9, 2]


def test_qwen_scores_follow_the_patch_to_token_map() -> None:
    """2×2 merged tokens from 16 patches in a permuted (window-like) order: patches 8..11 belong
    to token 3. Planting the deep score on them keeps token 3 (mean over its 4 patches)."""
    layout = ImageLayout(num_tokens=4, grid=(2, 2))
    token_of_patch = torch.tensor([2, 2, 2, 2, 0, 0, 0, 0, 3, 3, 3, 3, 1, 1, 1, 1])
    deep = torch.zeros(16)
    deep[8:12] = 1.0
    deep[4] = 3.0  # one hot patch of token 0: its 4-patch mean (0.75) stays below token 3's
    probes = {
        "object": _received([torch.zeros(16)]),
        "deep": _received([deep]),
        "patches": SimpleNamespace(token_of_patch=lambda: token_of_patch),
    }
    assert HiPrune(alpha=0.0).select(_batch([layout], [1], probes))[0].tolist() == [3]


# ----------------------------------------------------------------------------- real models


def _capture(handle: vlprune.PatchHandle) -> list[list[torch.Tensor]]:
    """Record every selection the method returns."""
    calls: list[list[torch.Tensor]] = []
    select = handle.method.select

    def recording(batch: VisionBatch) -> list[torch.Tensor]:
        kept = select(batch)
        calls.append(kept)
        return kept

    handle.method.select = recording
    return calls


def test_official_algorithm_on_eager_clip_attention() -> None:
    """Tiny LLaVA, eager CLIP attentions as the reference (no probe): object layer 0, deep layer
    1, α=1, budget 10 → 2 anchors, official buffer arithmetic. Kept indices equal the official
    steps run on ``output_attentions``: mean over heads and all queries, CLS key dropped,
    unique(anchors ∪ clamp(i±1, i±6)), registers = top of (deep - 1[S]), sorted."""
    model = tiny_model("llava", attn_implementation="eager")
    inputs = tiny_inputs("llava", batch=2)
    with torch.no_grad():
        attn = model.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions
    handle = vlprune.patch(
        model, "hiprune", budget=10, alpha=1.0, object_layer=0, deep_layer=1, wrap_neighbours=True
    )
    calls = _capture(handle)
    with torch.no_grad():
        model(**inputs)
    handle.unpatch()
    for image in range(2):
        obj = attn[0][image].mean(0).mean(0)[1:]
        deep = attn[1][image].mean(0).mean(0)[1:]
        anchors = obj.topk(2).indices
        buffers = torch.cat([anchors - 1, anchors + 1, anchors - 6, anchors + 6]).clamp(0, 35)
        chosen = torch.cat([anchors, buffers]).unique()
        registers = (deep - torch.isin(torch.arange(36), chosen).float()).topk(10 - chosen.numel())
        expected = torch.cat([chosen, registers.indices]).sort().values
        assert calls[0][image].tolist() == expected.tolist()


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_patch_token_map_matches_the_merger(family: str) -> None:
    """Merging the encoder's patches in sequence order and reading them through
    ``token_of_patch`` gives the model's own (raster) merged features, for two image sizes
    (Qwen2.5-VL: several windows)."""
    model = tiny_model(family)
    inputs = tiny_inputs(family, batch=2, image_sizes=[(168, 112), (224, 280)])
    adapter = get_adapter(model)
    probe = adapter.patch_token_probe()
    merged: dict[str, torch.Tensor] = {}
    hooks = [
        probe.install(),
        adapter.projector.register_forward_hook(lambda m, i, o: merged.setdefault("out", o)),
    ]
    with torch.no_grad():
        pooled = model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    for hook in hooks:
        hook.remove()
    groups = probe.token_of_patch().view(-1, 4)
    assert bool((groups == groups[:, :1]).all())
    torch.testing.assert_close(pooled.pooler_output[groups[:, 0]], merged["out"])


def test_received_attention_matches_eager_column_sums() -> None:
    """``VisionAttentionScores.received`` (chunked) equals the eager maps' head-mean column
    sums."""
    model = tiny_model("llava", attn_implementation="eager")
    inputs = tiny_inputs("llava", batch=2)
    scores = VisionAttentionScores(get_adapter(model).vision_probe(1), max_elements=100)
    hook = scores.install()
    with torch.no_grad():
        attn = model.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions
    hook.remove()
    torch.testing.assert_close(torch.stack(scores.received()), attn[1].mean(1).sum(1))


SIZES = {
    "llava": None,
    "llava_next": [(150, 100), (80, 160), (100, 150)],
    "qwen2_vl": [(168, 112), (224, 280), (112, 112)],
    "qwen2_5_vl": [(168, 112), (224, 280), (112, 112)],
    "qwen3_vl": [(192, 128), (256, 320), (128, 128)],
    "qwen3_vl_moe": [(192, 128), (256, 320), (128, 128)],
    "llava_onevision": [(150, 100), (80, 160), (100, 150)],
    "qwen3_5": [(192, 128), (256, 320), (128, 128)],
}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def model(family: str):
    return cached_model(family)


@pytest.fixture(scope="module")
def inputs(family: str):
    return tiny_inputs(family, batch=3, image_sizes=SIZES[family])


def test_kept_count_equals_budget_forward_and_generate(family, model, inputs) -> None:
    """Left-padded batch of 3 (different image sizes): every image keeps exactly the budget,
    indices sorted and unique; ``generate`` runs; stats match."""
    budget = 7
    with vlprune.patch(model, "hiprune", budget=budget, alpha=0.5, newline="row") as handle:
        calls = _capture(handle)
        with torch.no_grad():
            logits = model(**inputs).logits
            out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert handle.stats.kept_per_image == [budget] * 3
    assert logits.shape[0] == 3 and out.shape == (3, inputs["input_ids"].shape[1] + 4)
    for kept in calls[0]:
        assert kept.numel() == budget and bool((kept.diff() > 0).all())


def test_keep_all_equals_unpatched(family, model, inputs) -> None:
    """A budget above every image's token count reproduces the unpatched logits."""
    with torch.no_grad():
        reference = model(**inputs).logits
        with vlprune.patch(model, "hiprune", budget=10_000):
            pruned = model(**inputs).logits
    torch.testing.assert_close(pruned, reference, atol=1e-5, rtol=0)


def test_ratio_and_explicit_windowed_layer() -> None:
    """Qwen2.5-VL with ``ratio`` and a windowed deep block (0): counts still exact."""
    model = tiny_model("qwen2_5_vl")
    inputs = tiny_inputs("qwen2_5_vl", batch=2, image_sizes=[(224, 280), (168, 112)])
    with vlprune.patch(model, "hiprune", ratio=0.3, deep_layer=0) as handle, torch.no_grad():
        model(**inputs)
        assert handle.stats.kept_per_image == [24, 8]  # ceil(0.3·80), ceil(0.3·24)


@pytest.mark.parametrize(
    ("options", "name"),
    [({"alpha": 1.5}, "alpha"), ({"object_layer": 3}, "object_layer"),
     ({"deep_layer": "x"}, "deep_layer"), ({"newline": "x"}, "newline"),
     ({"wrap_neighbours": 1}, "wrap_neighbours")],
)
def test_bad_options_name_the_option(options: dict, name: str) -> None:
    """Invalid options raise ``ValueError`` naming the option (layer 3 of a 3-layer CLIP)."""
    with pytest.raises(ValueError, match=name):
        vlprune.patch(tiny_model("llava"), "hiprune", budget=4, **options)
