"""Tests for ``flowcut``: the adaptive count, the scores, the official per-layer schedule (CLIP
and Qwen, on synthetic encoders with planted attention), the mapping of surviving units to
tokens, the LLM step, and the method on tiny models of every family."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import LlavaForConditionalGeneration

import vlprune
from tests.helpers import cached_inputs, cached_model
from vlprune.adapters.base import ImageLayout
from vlprune.budget import Budget
from vlprune.methods.base import DecoderBatch, EncoderBatch, VisionBatch
from vlprune.methods.flowcut import (
    FlowCut,
    clip_scores,
    global_query_scores,
    llm_scores,
    prune_count,
)
from vlprune.testing import (
    FAMILIES,
    tiny_config,
    tiny_image,
    tiny_inputs,
    tiny_processor,
)

BUDGET = {"llava": 10, "llava_next": 16, "qwen2_vl": 6, "qwen2_5_vl": 6, "qwen3_vl": 6,
          "qwen3_vl_moe": 6, "llava_onevision": 16, "qwen3_5": 6}
# The tiny LLaVA-NeXT image: thumbnail 6×6, 2×2 crops of 6×6, unpadded canvas 8×12 at row
# offset 2 (crop rows 0-1 of the top crops and 4-5 of the bottom crops are letterbox), a
# newline after each of the 8 canvas rows: 36 + 8·13 = 140 tokens.
NEXT_LAYOUT = ImageLayout(
    num_tokens=140, grid=(6, 6), crop_grid=(2, 2), highres=(8, 12), highres_offset=(2, 0),
    newline=True,
)


# ----------------------------------------------------------------------- adaptive count


def test_prune_count_flat_peaked_and_forced() -> None:
    """Flat relevance (ρ = 1) prunes nothing; one-hot (ρ = 0) prunes ``(n - T) / √r``;
    ``r = 0`` forces the cut to the target."""
    flat, peaked = torch.ones(100), torch.zeros(100)
    peaked[7] = 1.0
    assert prune_count(100, 20, 4, flat, 0.0) == 0
    assert prune_count(100, 20, 4, peaked, 0.0) == 40
    assert prune_count(100, 20, 4, peaked, 1e-7) == 40
    assert prune_count(100, 20, 0, flat, 0.0) == 100


def test_prune_count_two_level_matches_hand_formula() -> None:
    """p = (4, 4, 1, 1, 1, 1)/12: ρ = H(p)/ln 6, P = round(10/√2 · (1 - ρ²))."""
    p = [4 / 12] * 2 + [1 / 12] * 4
    rho = -sum(x * math.log(x) for x in p) / math.log(6)
    expected = round(10 / math.sqrt(2) * (1 - rho**2))
    assert prune_count(16, 6, 2, torch.tensor([4.0, 4, 1, 1, 1, 1]), 0.0) == expected


# ----------------------------------------------------------------------------- scores


def test_clip_scores_on_planted_attention() -> None:
    """One head, scale 1: CLS logits (0 | 0, ln 2, ln 4) → a ∝ (1, 2, 4) over patches; CLS
    value 0 → uniform semantic term; densities (1, 1, 2)."""
    q = torch.tensor([[[1.0, 0], [0, 0], [0, 0], [0, 0]]])
    k = torch.tensor([[[0.0, 0], [0, 0], [math.log(2), 0], [math.log(4), 0]]])
    v = torch.tensor([[[0.0, 0], [1, 0], [0, 1], [1, -1]]])
    score, attention = clip_scores(q, k, v, 1.0)
    torch.testing.assert_close(attention, torch.tensor([1.0, 2, 4]) / 8)
    expected = (torch.tensor([1.0, 2, 4]) / 7 + 1 / 3) * torch.tensor([1.0, 1, 2])
    torch.testing.assert_close(score, expected)


def test_global_query_scores_average_each_merge_group() -> None:
    """Mean query (1, 0); key logits (0, 0, ln 3, ln 3) → attention (1, 1, 3, 3)/8; unit
    densities 1 → group scores (1/8, 3/8)."""
    q = torch.tensor([[[1.0, 0], [1, 0], [1, 0], [1, 0]]])
    k = torch.tensor([[[0.0, 0], [0, 0], [math.log(3), 0], [math.log(3), 0]]])
    v = torch.tensor([[[1.0, 0], [0, 1], [-1, 0], [0, -1]]])
    score, attention = global_query_scores(q, k, v, 1.0, group=2)
    torch.testing.assert_close(attention, torch.tensor([1.0, 1, 3, 3]) / 8)
    torch.testing.assert_close(score, torch.tensor([1.0, 3]) / 8)


# -------------------------------------------------------------------- official schedule


class PlantedEncoder:
    """A fake vision probe: unit u has key logit ``logit[u]`` for the CLS / global query, unit
    values of equal norm (density and semantic terms flat), so scores rank by ``logit``."""

    def __init__(self, logit: torch.Tensor, prefix: int, group: int) -> None:
        self.logit, self.prefix, self.group = logit, prefix, group
        self.units: list[torch.Tensor] = []
        self.scale = 1.0

    def clear(self) -> None:
        """Nothing held."""

    def qkv(self, bounds=None):
        out = []
        for units in self.units:
            keys = self.logit[units].repeat_interleave(self.group)
            keys = torch.cat([torch.zeros(self.prefix), keys])
            rows = keys.numel()
            q = torch.zeros(1, rows, 2)
            q[0, :, 0] = 1.0
            k = torch.zeros(1, rows, 2)
            k[0, :, 0] = keys
            v = torch.zeros(1, rows, 2)
            v[0, self.prefix:, 1] = 1.0
            out.append((q, k, v))
        return out


def _run_schedule(method, layout, sizes, prefix, group, n_layers, output_layer, budget):
    """Drive ``encoder_choose`` layer by layer like the hook does; units entering each layer."""
    n_units = sizes[0]
    logit = torch.where(torch.arange(n_units) % 8 == 0, 3.0, 0.0)
    probe = PlantedEncoder(logit, prefix, group)
    units = [torch.arange(n) for n in sizes]
    memory: dict = {}
    counts = []
    for layer in range(n_layers):
        counts.append(units[0].numel())
        if layer > output_layer:
            continue
        probe.units = units
        bounds = [0]
        for u in units:
            bounds.append(bounds[-1] + u.numel() * group)
        batch = EncoderBatch(
            layer=layer, output_layer=output_layer, hidden=torch.empty(0), units=units,
            sizes=sizes, image=[0] * len(sizes), layouts=[layout], packed=not prefix,
            bounds=bounds if not prefix else None, prefix=prefix, group=group,
            probes={f"vision{layer}": probe}, memory=memory,
        )
        kept = method.encoder_choose(batch, budget)
        if kept is not None:
            units = [u[k] for u, k in zip(units, kept)]
    return counts, units


def _official_counts(n, target, horizon, n_layers, relevance_rows, eps):
    """The official loop written out: prune after layers with ``r = horizon - ℓ - 1`` even,
    keeping the highest logits (ties: lower index)."""
    logit = torch.where(torch.arange(n) % 8 == 0, 3.0, 0.0)
    alive = torch.arange(n)
    counts = []
    for layer in range(n_layers):
        counts.append(alive.numel())
        r = horizon - layer - 1
        if alive.numel() <= target or r < 0 or r % 2:
            continue
        if r == 0:
            drop = alive.numel()
        else:
            p = logit[alive].exp().repeat_interleave(relevance_rows)
            p = (p / p.sum()).tolist()
            rho = -sum(x * math.log(x + eps) for x in p) / math.log(len(p))
            drop = round((alive.numel() - target) / math.sqrt(r) * (1 - rho**2))
        keep = max(alive.numel() - drop, target)
        order = sorted(range(alive.numel()), key=lambda i: (-float(logit[alive[i]]), i))
        alive = alive[sorted(order[:keep])]
    return counts, alive


def test_clip_schedule_follows_official_code() -> None:
    """LLaVA-1.5 geometry (24 layers, feature layer -2 = output of layer 22, 576 patches,
    budget 64): prune after layers 1, 3, …, 21 with the adaptive count, forced to 64 at 21;
    the survivors are the best-scored patches."""
    layout = ImageLayout(num_tokens=576, grid=(24, 24))
    counts, units = _run_schedule(FlowCut(), layout, [576], 1, 1, 24, 22, Budget(tokens=64))
    expected, alive = _official_counts(576, 64, 22, 24, 1, 0.0)
    assert counts == expected
    changes = [layer for layer in range(1, 24) if counts[layer] != counts[layer - 1]]
    assert set(changes) <= {2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22} and 22 in changes
    assert counts[-1] == 64 and torch.equal(units[0], alive)


def test_qwen_schedule_follows_official_code() -> None:
    """Qwen2-VL geometry (32 blocks, 256 merged tokens of 4 patches, budget 32): the encoder
    keeps 2·32 merge groups; prunes after blocks 1, 3, …, 31 (the last block is cut), the
    entropy taken over patches with ``ln(p + 1e-7)``."""
    layout = ImageLayout(num_tokens=256, grid=(16, 16))
    counts, units = _run_schedule(FlowCut(), layout, [256], 0, 4, 32, 31, Budget(tokens=32))
    expected, alive = _official_counts(256, 64, 32, 32, 4, 1e-7)
    assert counts == expected
    assert units[0].numel() == 64 and torch.equal(units[0], alive)


def test_crops_of_one_forward_keep_equal_counts() -> None:
    """LLaVA-NeXT: every crop keeps ``budget // 2`` patches and all crops stay equal-sized
    (the largest count of the batch)."""
    layout = ImageLayout(num_tokens=2928, grid=(24, 24), crop_grid=(2, 2), highres=(48, 48),
                         newline=True)
    _, units = _run_schedule(FlowCut(), layout, [576] * 5, 1, 1, 24, 22, Budget(tokens=160))
    assert [u.numel() for u in units] == [80] * 5


# -------------------------------------------------------------------- units → tokens


def _vision_batch(layout: ImageLayout, units: list[list[int]]) -> VisionBatch:
    return VisionBatch(
        layouts=[layout], keep=[0], features=[torch.empty(0)], sample=[0],
        input_ids=torch.empty(0), text_embeds=torch.empty(0), probes={},
        encoder_units=[[torch.tensor(u, dtype=torch.long) for u in units]],
    )


def test_select_maps_crop_patches_through_unpadding() -> None:
    """Crop (0,0) patch 13 = (2,1) → canvas (0,1) → token 36 + 1; patch 0 is letterbox.
    Crop (0,1) patches 12 = (2,0), 20 = (3,2) → canvas (0,6), (1,8) → 42, 36 + 13 + 8. Crop
    (1,0) patch 0 → canvas (4,0) → 88; patch 35 = (5,5) is letterbox. Crop (1,1) patches
    6 = (1,0), 7 = (1,1) → canvas (5,6), (5,7) → 107, 108. Canvas row R's tokens start at
    36 + 13·R (12 cells + its newline); no newline token is kept; the thumbnail's units are
    their own tokens."""
    units = [[0, 35], [0, 13], [12, 20], [0, 35], [6, 7]]
    kept = FlowCut().select(_vision_batch(NEXT_LAYOUT, units))[0]
    assert kept.tolist() == [0, 35, 37, 42, 57, 88, 107, 108]


def test_select_keeps_everything_of_an_uncut_image() -> None:
    """Nothing pruned → the image is untouched, newline tokens included."""
    units = [list(range(36))] * 5
    assert torch.equal(FlowCut().select(_vision_batch(NEXT_LAYOUT, units))[0],
                       torch.arange(140))


# ------------------------------------------------------------------------------ LLM step


def test_llm_scores_softmax_over_visual_keys_only() -> None:
    """One head, rows (text, v, v, text=last): the relevance softmax ignores the text keys."""
    is_image = torch.tensor([[False, True, True, False]])
    logits = torch.tensor([[[5.0, 0.0, math.log(3), 9.0]]])
    values = torch.zeros(1, 1, 4, 2)
    values[0, 0, 1] = torch.tensor([1.0, 0])
    values[0, 0, 2] = torch.tensor([1.0, 0])
    scores = llm_scores(logits, values, is_image, 1.0)
    torch.testing.assert_close(scores[0, 1:3], torch.tensor([0.25 + 0.5, 0.75 + 0.5]))


def test_choose_keeps_each_rows_budget_exactly() -> None:
    """Rows with 5 and 3 visual tokens (one image each, budget 2) keep exactly their 2 best:
    the rows differ in length, so padded slots come back."""
    is_image = torch.tensor([[False, True, True, True, True, True, False],
                             [False, False, False, True, True, True, False]])
    relevance = torch.tensor([[0.0, 1, 5, 2, 4, 3, 0], [0, 0, 0, 3, 1, 2, 0]])
    probe = SimpleNamespace(
        logits=lambda last: relevance[:, None, None, :],
        values=lambda: torch.ones(2, 1, 7, 2),
        scale=1.0,
    )
    ctx = DecoderBatch(layer=2, hidden=torch.zeros(2, 7, 4), is_image=is_image,
                       probes={"llm": probe}, image_tokens=[[5], [3]])
    index, slots = FlowCut().choose(ctx, Budget(tokens=2))
    kept = [index[b][slots[b]].tolist() for b in range(2)]
    assert kept == [[0, 2, 4, 6], [0, 1, 2, 3, 5, 6]]


# ----------------------------------------------------------------------- tiny models


@pytest.mark.parametrize("family", FAMILIES)
def test_kept_count_equals_budget_forward_and_generate(family: str) -> None:
    """The language model sees exactly the budget per image (after the LLM step on NeXT /
    Qwen); the encoder keeps B (LLaVA), B/2 per crop (NeXT), 2B (Qwen). Batch 2, left padding:
    greedy generation starts with the forward's argmax; cached generation equals uncached (the
    uncached steps keep the first step's selection, LLM step included)."""
    model, inputs, budget = cached_model(family), cached_inputs(family, batch=2), BUDGET[family]
    with vlprune.patch(model, "flowcut", budget=budget) as handle, torch.no_grad():
        first = model(**inputs).logits[:, -1].argmax(-1)
        stats = handle.stats
        cached = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        uncached = model.generate(**inputs, max_new_tokens=6, do_sample=False,
                                  use_cache=False)
    assert stats.kept_tokens == [budget] * 2
    assert torch.equal(cached[:, inputs["input_ids"].shape[1]], first)
    assert torch.equal(cached, uncached)
    rows = stats.vision_layer_tokens
    if family == "llava":
        assert stats.kept_per_image == [budget] * 2
        assert all(len(set(row)) == 1 for row in stats.layer_tokens)  # no LLM step
        assert rows == [[37, budget + 1, budget + 1]] * 2
    elif family == "llava_next":
        assert all(k <= 5 * budget // 2 for k in stats.kept_per_image)
        assert rows == [[5 * 37] + [5 * (budget // 2 + 1)] * 2] * 2
    elif family == "llava_onevision":  # no CLS: FlowCut-Qwen's schedule, cut after the last
        assert all(k <= 5 * budget // 2 for k in stats.kept_per_image)
        assert all(row[0] == 5 * 36 and row[-1] > 5 * (budget // 2) for row in rows)
    else:
        assert stats.kept_per_image == [2 * budget] * 2
        assert all(row[2] == row[1] - budget for row in stats.layer_tokens)


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_equals_unpatched(family: str) -> None:
    """A budget above every image's size prunes nothing anywhere."""
    model, inputs = cached_model(family), cached_inputs(family, batch=2)
    with torch.no_grad():
        reference = model(**inputs).logits
        with vlprune.patch(model, "flowcut", budget=10**6):
            pruned = model(**inputs).logits
    torch.testing.assert_close(pruned, reference, atol=1e-5, rtol=0)


def test_deep_clip_prunes_on_the_official_layers() -> None:
    """An 8-layer CLIP (feature layer 6) with sharpened attention (so the adaptive count is
    not 0): rows change exactly entering layers 2, 4, 6 (cuts after 1, 3 and the forced one
    after 5) and the feature layer runs on CLS + budget rows."""
    config = tiny_config("llava")
    config.vision_config.num_hidden_layers = 8
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration._from_config(config).eval()
    with torch.no_grad():
        for layer in model.model.vision_tower.encoder.layers:
            layer.self_attn.q_proj.weight.mul_(20.0)
    with vlprune.patch(model, "flowcut", budget=8) as handle, torch.no_grad():
        model(**cached_inputs("llava", batch=2))
        rows = handle.stats.vision_layer_tokens[0]
    changes = [layer for layer in range(1, 8) if rows[layer] != rows[layer - 1]]
    assert changes == [2, 4, 6]
    assert rows[6] == rows[7] == 9


def test_rows_with_different_images_keep_their_own_budgets() -> None:
    """LLaVA-NeXT images of 5 and 3 crops leave different visual counts after the encoder;
    the LLM step still keeps exactly 4 per row. Qwen2-VL: a sample holding two images keeps
    4 + 4, the other 4."""
    model = cached_model("llava_next")
    inputs = tiny_inputs("llava_next", batch=2, image_sizes=[(150, 100), (84, 84)])
    with vlprune.patch(model, "flowcut", budget=4) as handle, torch.no_grad():
        model(**inputs)
        assert handle.stats.visual_tokens == [140, 78]
        assert handle.stats.kept_tokens == [4, 4]
    model = cached_model("qwen2_vl")
    pad = "<|vision_start|><|image_pad|><|vision_end|>"
    text = [f"<|im_start|> {pad} w1 {pad} w2 w3", f"<|im_start|> {pad} w4 w5 w6 w7"]
    images = [tiny_image(i, size) for i, size in enumerate([(168, 112), (112, 112), (224, 168)])]
    inputs = tiny_processor("qwen2_vl")(text=text, images=images, padding=True,
                                        return_tensors="pt")
    with vlprune.patch(model, "flowcut", budget=4) as handle, torch.no_grad():
        model(**inputs)
        assert handle.stats.kept_per_image == [8, 8, 8]
        assert handle.stats.kept_tokens == [8, 4]


def test_ratio_budget_on_llava_next() -> None:
    """``ratio`` keeps ⌈ratio · 140⌉ tokens of each 140-token image."""
    model, inputs = cached_model("llava_next"), cached_inputs("llava_next", batch=2)
    with vlprune.patch(model, "flowcut", ratio=0.1) as handle, torch.no_grad():
        model(**inputs)
        assert handle.stats.kept_tokens == [14, 14]


@pytest.mark.parametrize(
    ("options", "name"),
    [({"llm_layer": -1}, "llm_layer"), ({"llm_layer": True}, "llm_layer"),
     ({"history": 1.0}, "history"), ({"stride": 0}, "stride")],
)
def test_bad_options_name_the_option(options: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        FlowCut(**options)


def test_llm_layer_beyond_the_model_is_rejected_at_patch_time() -> None:
    with pytest.raises(ValueError, match="llm_layer"):
        vlprune.patch(cached_model("qwen2_vl"), "flowcut", budget=4, llm_layer=3)
