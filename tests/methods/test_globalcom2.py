"""Tests for ``globalcom2``: crop retention ratios, the bilinear guidance map on the unpadded
canvas, holistic crop scores, per-partition budgets, newline policies, the pre-softmax probe, and
the method on tiny LLaVA / LLaVA-NeXT models."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import vlprune
from tests.helpers import cached_model
from vlprune.adapters import get_adapter
from vlprune.adapters.base import ImageLayout
from vlprune.hooks.signals import VisionAttentionScores
from vlprune.methods._vision_common import fill_budget, partition_tokens
from vlprune.methods.base import VisionBatch
from vlprune.methods.globalcom2 import GlobalCom2, crop_ratios, guidance, holistic_scores
from vlprune.testing import FAMILIES, tiny_inputs, tiny_model

# 4×4 thumbnail, 1×2 crops, no padding: 16 thumbnail tokens, then 4 rows of 8 + newline.
NEXT_WIDE = ImageLayout(
    num_tokens=16 + 4 * 9, grid=(4, 4), crop_grid=(1, 2), highres=(4, 8), newline=True
)
# Same crops, padded canvas 4×8 unpadded to 4×6 (column offset 1): each crop keeps 3 columns.
NEXT_SMALL = ImageLayout(
    num_tokens=16 + 4 * 7, grid=(4, 4), crop_grid=(1, 2), highres=(4, 6), highres_offset=(0, 1),
    newline=True,
)
LEFT_HALF = [0, 1, 4, 5, 8, 9, 12, 13]


def _logits(patch_scores: list[torch.Tensor]) -> SimpleNamespace:
    """A stand-in for :class:`VisionAttentionScores`: one head whose CLS row has the planted
    logits on the patch keys."""
    seqs = [torch.cat([torch.zeros(1), s])[None, None, :] for s in patch_scores]
    return SimpleNamespace(logits=lambda queries: seqs)


def _batch(layouts, keep, probes) -> VisionBatch:
    feats = [torch.zeros(layout.num_tokens, 2) for layout in layouts]
    return VisionBatch(layouts, keep, feats, [0] * len(layouts), torch.zeros(1, 1), None, probes)


# ----------------------------------------------------------------------------- pure steps


def test_crop_ratios_follow_region_logit_sums() -> None:
    """Left half of the thumbnail at 1.25 → S = [10, 0], σ = softmax([0, -1]) (τ = 10),
    r = R·(1 + σ - 1/2) with R = 0.5; the mean ratio stays R."""
    thumbnail = torch.zeros(16)
    thumbnail[LEFT_HALF] = 1.25
    sigma0 = 1 / (1 + math.exp(-1))
    ratios = crop_ratios(thumbnail, NEXT_WIDE, 0.5, 10.0)
    torch.testing.assert_close(ratios, torch.tensor([0.5 * (0.5 + sigma0), 0.5 * (1.5 - sigma0)]))
    assert float(ratios.mean()) == pytest.approx(0.5)


def test_crop_ratios_are_capped_at_one() -> None:
    """R = 0.9 and a sharp softmax (τ small): the favoured crop's ratio is clipped to 1."""
    thumbnail = torch.zeros(16)
    thumbnail[LEFT_HALF] = 5.0
    assert crop_ratios(thumbnail, NEXT_WIDE, 0.9, 1.0).tolist()[0] == 1.0


def test_guidance_is_bilinear_on_the_canvas_tokens() -> None:
    """2×2 thumbnail [[0, 1], [0, 1]] → 2×4 canvas (align_corners=False): every row is
    [0, .25, .75, 1] at layout tokens 4 + r·5 + c; thumbnail and newline tokens get 0."""
    layout = ImageLayout(
        num_tokens=4 + 2 * 5, grid=(2, 2), crop_grid=(1, 2), highres=(2, 4), newline=True
    )
    out = guidance(torch.tensor([0.0, 1.0, 0.0, 1.0]), layout)
    row = [0.0, 0.25, 0.75, 1.0]
    torch.testing.assert_close(out, torch.tensor([0.0] * 4 + row + [0.0] + row + [0.0]))


def test_holistic_scores_mix_normalised_local_and_global() -> None:
    """z = [3, 4, 0] → [.6, .8, 0]; G = [0, 0, 2] → [0, 0, 1]; equal weights → [.3, .4, .5].
    Invalid cells do not enter the norms."""
    valid = torch.tensor([True, True, True, False])
    scores = holistic_scores(
        torch.tensor([3.0, 4.0, 0.0, 99.0]), torch.tensor([0.0, 0.0, 2.0, 99.0]), valid, 0.5
    )
    torch.testing.assert_close(scores[:3], torch.tensor([0.3, 0.4, 0.5]))


def test_fill_budget_newline_policies() -> None:
    """Content priority: row 0 of the canvas (16..21), then row 1 (23..28). k = 8:
    ``"drop"`` → 8 content; ``"row"`` → 6 content + row 0's newline 22 + one empty-row newline
    (29) to meet k; ``"all"`` → 4 content + all 4 newlines; ``"all"`` with k ≤ rows acts as
    ``"row"``."""
    order = torch.tensor([16, 17, 18, 19, 20, 21, 23, 24, 25, 26, 27, 28])

    def content(c: int) -> torch.Tensor:
        return order[:c].sort().values

    def fill(k: int, policy: str) -> list[int]:
        return fill_budget(NEXT_SMALL, k, 40, content, policy).tolist()

    assert fill(8, "drop") == [16, 17, 18, 19, 20, 21, 23, 24]
    assert fill(8, "row") == [16, 17, 18, 19, 20, 21, 22, 29]
    assert fill(8, "all") == [16, 17, 18, 19, 22, 29, 36, 43]
    assert fill(3, "all") == [16, 17, 22]


# ------------------------------------------------------------------ select on planted probes


def test_crop_tokens_stay_in_their_canvas_cells() -> None:
    """Uniform thumbnail (equal ratios, flat guidance), budget 20 of 40 content → R = 0.5 →
    [8, 6, 6]. Thumbnail ties keep 0..7. Crop 0's planted 6 (its hottest cell (0,0) is padding)
    land at canvas (r, c-1) → 16-18, 23-25; crop 1's at (r, 3+c) → 33-35, 40-42 (the official
    placement bug would have moved them to the crop's first cells)."""
    crop0, crop1 = torch.zeros(16), torch.zeros(16)
    crop0[0], crop0[[1, 2, 3, 5, 6, 7]] = 100.0, 10.0
    crop1[3], crop1[[8, 9, 10, 12, 13, 14]] = 100.0, 10.0
    probes = {"logits": _logits([torch.ones(16), crop0, crop1])}
    kept = GlobalCom2(newline="drop").select(_batch([NEXT_SMALL], [20], probes))[0]
    assert kept.tolist() == [*range(8), 16, 17, 18, 23, 24, 25, 33, 34, 35, 40, 41, 42]


def test_attended_crop_gets_more_tokens() -> None:
    """Thumbnail left half at 2.5: S = [20, 0], σ = softmax([0, -2]), r = [.690, .310] at
    R = 24/48; targets [8, 11.05, 4.95] → exactly [8, 11, 5]; thumbnail keeps its left half."""
    thumbnail = torch.zeros(16)
    thumbnail[LEFT_HALF] = 2.5
    crops = [torch.rand(16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    probes = {"logits": _logits([thumbnail, *crops])}
    kept = GlobalCom2(newline="drop").select(_batch([NEXT_WIDE], [24], probes))[0]
    counts = [int(torch.isin(t, kept).sum()) for t in partition_tokens(NEXT_WIDE)]
    assert counts == [8, 11, 5]
    assert kept[:8].tolist() == LEFT_HALF


def test_default_keeps_every_newline_inside_the_budget() -> None:
    """``newline="all"``: budget 20 = 4 newlines + 16 content tokens."""
    probes = {"logits": _logits([torch.rand(16) for _ in range(3)])}
    kept = GlobalCom2().select(_batch([NEXT_SMALL], [20], probes))[0]
    assert kept.numel() == 20 and {22, 29, 36, 43} <= set(kept.tolist())


def test_logits_probe_is_the_pre_softmax_cls_row() -> None:
    """``VisionAttentionScores.logits`` softmaxed equals the eager CLS attention row."""
    model = tiny_model("llava", attn_implementation="eager")
    inputs = tiny_inputs("llava", batch=2)
    scores = VisionAttentionScores(get_adapter(model).vision_probe(2))
    hook = scores.install()
    with torch.no_grad():
        attn = model.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions
    hook.remove()
    rows = torch.stack([s[:, 0] for s in scores.logits(torch.tensor([0]))]).softmax(-1)
    torch.testing.assert_close(rows, attn[2][:, :, 0])


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


@pytest.mark.parametrize("budget", [5, 30])
def test_kept_count_equals_budget_forward_and_generate(family, model, inputs, budget) -> None:
    """Left-padded batch of 3: every image keeps exactly the budget (5 is below the newline
    count, 30 above); ``generate`` runs."""
    with vlprune.patch(model, "globalcom2", budget=budget) as handle:
        with torch.no_grad():
            model(**inputs)
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert handle.stats.kept_per_image == [budget] * 3
    assert out.shape == (3, inputs["input_ids"].shape[1] + 3)


def test_keep_all_equals_unpatched(family, model, inputs) -> None:
    """A budget above every image's token count reproduces the unpatched logits."""
    with torch.no_grad():
        reference = model(**inputs).logits
        with vlprune.patch(model, "globalcom2", budget=10_000):
            pruned = model(**inputs).logits
    torch.testing.assert_close(pruned, reference, atol=1e-5, rtol=0)


NO_CLS = [f for f in FAMILIES if f not in ("llava", "llava_next")]


@pytest.mark.parametrize("family", NO_CLS)
def test_families_without_cls_are_rejected(family: str) -> None:
    """No CLS token and no thumbnail (Qwen2/2.5/3-VL) or no CLS token
    (LLaVA-OneVision's SigLIP): ``patch`` refuses the model with a ``TypeError`` before
    installing anything."""
    model = tiny_model(family)
    with pytest.raises(TypeError, match="supports llava, llava_next"):
        vlprune.patch(model, "globalcom2", budget=4)
    assert not any(module._forward_pre_hooks for module in model.modules())


@pytest.mark.parametrize(
    ("options", "name"),
    [({"temperature": 0}, "temperature"), ({"global_weight": 2}, "global_weight"),
     ({"layer": -4}, "layer"), ({"newline": "x"}, "newline")],
)
def test_bad_options_name_the_option(options: dict, name: str) -> None:
    """Invalid options raise ``ValueError`` naming the option."""
    with pytest.raises(ValueError, match=name):
        vlprune.patch(tiny_model("llava"), "globalcom2", budget=4, **options)
