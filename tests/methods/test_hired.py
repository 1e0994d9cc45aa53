"""Tests for ``hired``: crop regions (2-D and the official flat bands), content scores, the exact
budget split, selection inside each partition on planted CLS attention, the official rule on
real CLIP attention, and the method on tiny LLaVA / LLaVA-NeXT models."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import vlprune
from tests.helpers import cached_model
from vlprune.adapters.base import ImageLayout
from vlprune.methods._vision_common import apportion, partition_tokens
from vlprune.methods.base import VisionBatch
from vlprune.methods.hired import HiRED, crop_content, crop_regions, hired_split
from vlprune.testing import FAMILIES, tiny_inputs, tiny_model

# 4×4 thumbnail, 2×2 crops, no padding: 16 thumbnail tokens, then 8 rows of 8 + newline.
NEXT_2X2 = ImageLayout(
    num_tokens=16 + 8 * 9, grid=(4, 4), crop_grid=(2, 2), highres=(8, 8), newline=True
)
LEFT_HALF = [0, 1, 4, 5, 8, 9, 12, 13]


def _cls_rows(patch_scores: list[torch.Tensor]) -> SimpleNamespace:
    """A stand-in vision probe: per sequence, one head whose CLS row puts ``patch_scores`` on the
    patch keys (the CLS key gets 0)."""
    seqs = [torch.cat([torch.zeros(1), s])[None, None, :] for s in patch_scores]
    return SimpleNamespace(rows=lambda queries: seqs)


def _batch(layouts, keep, probes) -> VisionBatch:
    feats = [torch.zeros(layout.num_tokens, 2) for layout in layouts]
    return VisionBatch(layouts, keep, feats, [0] * len(layouts), torch.zeros(1, 1), None, probes)


def _per_partition(kept: torch.Tensor, layout: ImageLayout) -> list[int]:
    return [int(torch.isin(t, kept).sum()) for t in partition_tokens(layout)]


# ----------------------------------------------------------------------------- pure steps


def test_crop_regions_grid_and_official_bands() -> None:
    """4×4 thumbnail, 2×2 crops: ``"grid"`` gives quadrants; ``"band"`` (official flat
    reshape) gives crop k the k-th row; a 1×2 grid splits left / right vs top / bottom."""
    grid = crop_regions((4, 4), (2, 2), "grid").view(4, 4)
    assert grid.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    band = crop_regions((4, 4), (2, 2), "band").view(4, 4)
    assert band.tolist() == [[0] * 4, [1] * 4, [2] * 4, [3] * 4]
    assert crop_regions((4, 4), (1, 2), "grid").view(4, 4)[0].tolist() == [0, 0, 1, 1]
    assert crop_regions((4, 4), (1, 2), "band").view(4, 4)[:, 0].tolist() == [0, 0, 1, 1]


def test_crop_content_count_and_sum() -> None:
    """Top ⌊(1-α)·16⌋ = 8 thumbnail tokens = the left half → counts [4, 0, 4, 0] by quadrant,
    [2, 2, 2, 2] by band; ``"sum"`` adds the attention itself."""
    init = torch.zeros(16)
    init[LEFT_HALF] = 1.0
    grid, band = crop_regions((4, 4), (2, 2), "grid"), crop_regions((4, 4), (2, 2), "band")
    assert crop_content(init, grid, 4, 0.5, "count").tolist() == [4, 0, 4, 0]
    assert crop_content(init, band, 4, 0.5, "count").tolist() == [2, 2, 2, 2]
    init[0] = 3.0
    assert crop_content(init, grid, 4, 0.5, "sum").tolist() == [6, 0, 4, 0]


def test_split_is_exact() -> None:
    """c=20, α=0.5: thumbnail 10, crops 10 ∝ [4, 0, 4, 0] → [5, 0, 5, 0]; ∝ [2, 2, 2, 2] → the
    remainder goes to the lower crops [3, 3, 2, 2]; a thumbnail share above its size moves to
    the crops; crops unable to hold theirs give it back to the thumbnail."""
    caps = [16, 16, 16, 16, 16]
    assert hired_split(20, caps, [4, 0, 4, 0], 0.5) == [10, 5, 0, 5, 0]
    assert hired_split(20, caps, [2, 2, 2, 2], 0.5) == [10, 3, 3, 2, 2]
    assert hired_split(40, caps, [1, 1, 1, 1], 1.0) == [16, 6, 6, 6, 6]
    assert hired_split(20, [16, 1, 1, 0, 0], [1, 1, 1, 1], 0.2) == [18, 1, 1, 0, 0]


def test_more_content_never_gets_fewer_tokens() -> None:
    """Random contents: the allocation sums to the total and is monotone in the content."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        content = torch.rand(4, generator=gen).tolist()
        total = int(torch.randint(0, 64, (1,), generator=gen))
        alloc = apportion(total, content, [16] * 4)
        assert sum(alloc) == total
        for a in range(4):
            for b in range(4):
                if content[a] > content[b]:
                    assert alloc[a] >= alloc[b]


# ------------------------------------------------------------------ select on planted probes


def _next_probes() -> dict[str, SimpleNamespace]:
    """Init layer: thumbnail attention on its left half. Final layer: every partition ranks its
    patches by ``-index`` (earlier patches first)."""
    init_thumb = torch.zeros(16)
    init_thumb[LEFT_HALF] = 1.0
    ramp = -torch.arange(16.0) / 100 + 0.5
    return {"init": _cls_rows([init_thumb] + [ramp] * 4), "final": _cls_rows([ramp] * 5)}


@pytest.mark.parametrize(("region", "expected"), [("grid", [10, 5, 0, 5, 0]),
                                                   ("band", [10, 3, 3, 2, 2])])
def test_next_allocation_follows_initial_attention(region: str, expected: list[int]) -> None:
    """Budget 20 on 4×4 + 2×2 crops: thumbnail α·c = 10; the left-half content sends the crop
    tokens to the left crops (``"grid"``) or evenly (official ``"band"``). Each partition keeps
    its first patches (final-layer ramp): crop 0's 5 → canvas (0,0..3), (1,0) → tokens
    16..19, 25."""
    kept = HiRED(region=region).select(_batch([NEXT_2X2], [20], _next_probes()))[0]
    assert kept.numel() == 20
    assert _per_partition(kept, NEXT_2X2) == expected
    assert kept[:10].tolist() == list(range(10))
    if region == "grid":
        assert {16, 17, 18, 19, 25} <= set(kept.tolist())


def test_llava_single_partition_is_final_layer_top_k() -> None:
    """LLaVA-1.5 6×6: planted final-layer CLS attention on 3, 17, 30 (and weaker on 0): k=3
    keeps exactly those, in raster order."""
    layout = ImageLayout(num_tokens=36, grid=(6, 6))
    final = torch.zeros(36)
    final[[30, 3, 17, 0]] = torch.tensor([0.4, 0.3, 0.2, 0.1])
    probes = {"init": _cls_rows([torch.zeros(36)]), "final": _cls_rows([final])}
    assert HiRED().select(_batch([layout], [3], probes))[0].tolist() == [3, 17, 30]


def test_official_rule_on_eager_clip_attention() -> None:
    """Tiny LLaVA with eager attention: the kept set of every image is the top-k of its own
    layer-1 (feature layer -2) CLS row summed over heads (official code used image 0's)."""
    model = tiny_model("llava", attn_implementation="eager")
    inputs = tiny_inputs("llava", batch=2)
    with torch.no_grad():
        attn = model.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions
    with vlprune.patch(model, "hired", budget=9) as handle:
        calls = []
        select = handle.method.select
        handle.method.select = lambda batch: calls.append(select(batch)) or calls[-1]
        with torch.no_grad():
            model(**inputs)
    for image in range(2):
        expected = attn[1][image, :, 0, 1:].sum(0).topk(9).indices.sort().values
        assert calls[0][image].tolist() == expected.tolist()


# ----------------------------------------------------------------------------- real models

SIZES = {"llava": None, "llava_next": [(150, 100), (80, 160), (100, 150)]}


@pytest.fixture(scope="module", params=["llava", "llava_next"])
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def model(family: str):
    return cached_model(family)


@pytest.fixture(scope="module")
def inputs(family: str):
    return tiny_inputs(family, batch=3, image_sizes=SIZES[family])


@pytest.mark.parametrize("newline", ["drop", "row", "all"])
def test_kept_count_equals_budget_forward_and_generate(family, model, inputs, newline) -> None:
    """Left-padded batch of 3: every image keeps exactly the budget under every newline policy;
    ``generate`` runs."""
    budget = 13
    with vlprune.patch(model, "hired", budget=budget, newline=newline) as handle:
        with torch.no_grad():
            model(**inputs)
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert handle.stats.kept_per_image == [budget] * 3
    assert out.shape == (3, inputs["input_ids"].shape[1] + 3)


def test_keep_all_equals_unpatched(family, model, inputs) -> None:
    """A budget above every image's token count reproduces the unpatched logits."""
    with torch.no_grad():
        reference = model(**inputs).logits
        with vlprune.patch(model, "hired", ratio=1.0):
            pruned = model(**inputs).logits
    torch.testing.assert_close(pruned, reference, atol=1e-5, rtol=0)


NO_CLS = [f for f in FAMILIES if f not in ("llava", "llava_next")]


@pytest.mark.parametrize("family", NO_CLS)
def test_families_without_cls_are_rejected(family: str) -> None:
    """No CLS token and no crops (Qwen2/2.5/3-VL) or no CLS token
    (LLaVA-OneVision's SigLIP): ``patch`` refuses the model with a ``TypeError`` before
    installing anything."""
    model = tiny_model(family)
    with pytest.raises(TypeError, match="supports llava, llava_next"):
        vlprune.patch(model, "hired", budget=4)
    assert not any(module._forward_pre_hooks for module in model.modules())


@pytest.mark.parametrize(
    ("options", "name"),
    [({"alpha": -0.1}, "alpha"), ({"final_layer": 5}, "final_layer"),
     ({"init_layer": None}, "init_layer"), ({"region": "x"}, "region"),
     ({"crop_score": "x"}, "crop_score"), ({"newline": "x"}, "newline")],
)
def test_bad_options_name_the_option(options: dict, name: str) -> None:
    """Invalid options raise ``ValueError`` naming the option."""
    with pytest.raises(ValueError, match=name):
        vlprune.patch(tiny_model("llava"), "hired", budget=4, **options)
