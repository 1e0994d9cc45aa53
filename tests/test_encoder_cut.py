"""The encoder cut (``vlprune.hooks.encoder``): rows dropped between vision-encoder layers.

Driven by a test-only method that keeps fixed unit ids (raster patch / merged-token positions)
after one encoder layer. Invariants: an identity cut equals the unpatched model; a cut after the
feature layer equals the vision-side ``fixed`` cut of the same tokens (geometry: LLaVA-NeXT
crops and unpadding, Qwen2.5-VL window order); a cut after an early layer equals a hand-run
encoder on the kept rows (CLIP, Qwen2-VL, Qwen2.5-VL windows); batches equal single runs; cached
generation equals uncached; unpatching leaves nothing behind.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import pytest
import torch
from transformers.vision_utils import (
    get_vision_cu_seqlens,
    get_vision_position_ids,
    get_vision_window_index,
)

import vlprune
from tests.helpers import cached_inputs, cached_model
from vlprune import registry
from vlprune.budget import Budget
from vlprune.hooks.encoder_state import remap_seqlens
from vlprune.methods._vision_common import partition_tokens
from vlprune.methods.base import EncoderBatch, Method, VisionBatch
from vlprune.methods.flowcut import FlowCut
from vlprune.testing import FAMILIES, tiny_inputs

BIG = 10**6
UNITS = [0, 3, 7, 14, 20, 23]  # raster unit ids valid in every family (Qwen frames: 24 units)


class KeepUnits(Method):
    """Test-only: after encoder layer ``layer`` (None: the feature layer) keep the units whose
    raster id is in ``units`` (every unit when empty) in every sequence."""

    stage = "vision"
    internal = True

    def __init__(self, *, units: Sequence[int] = (), layer: int | None = None) -> None:
        self.units = list(units)
        self.layer = layer

    def encoder_layers(self, output_layer: int) -> list[int]:
        return [output_layer if self.layer is None else self.layer]

    def encoder_choose(self, batch: EncoderBatch, budget: Budget) -> list[torch.Tensor]:
        out = []
        for ids in batch.units:
            keep = torch.isin(ids, torch.tensor(self.units)) if self.units else ids >= 0
            out.append(keep.nonzero().squeeze(1))
        return out

    def select(self, batch: VisionBatch) -> list[torch.Tensor]:
        return FlowCut.select(self, batch)


@pytest.fixture(autouse=True)
def keep_units_method(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(KeepUnits, "name", "keep_units")
    monkeypatch.setitem(registry._METHODS, "keep_units", KeepUnits)


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _lm_embeds(model, inputs) -> torch.Tensor:
    """The language model's ``inputs_embeds`` in a forward (after any vision-side cut)."""
    seen = {}

    def hook(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        _logits(model, inputs)
    finally:
        handle.remove()
    return seen["embeds"]


def _image_rows(model, inputs, embeds: torch.Tensor, n_kept: int) -> torch.Tensor:
    """The ``n_kept`` kept image rows of sample 0 (batch 1: the text before the image stays)."""
    first = int((inputs["input_ids"][0] == model.config.image_token_id).nonzero()[0])
    return embeds[0, first:first + n_kept]


def _expected_tokens(layout, units: list[int], n_sequences: int) -> list[int]:
    parts = partition_tokens(layout)
    ids = torch.tensor(units)
    if layout.crop_grid is None:
        return ids.tolist()
    tokens = torch.cat([parts[s][ids] for s in range(n_sequences)])
    return tokens[tokens >= 0].sort().values.tolist()


# ------------------------------------------------------------------------------ unit cases


def test_remap_seqlens_counts_kept_rows_per_segment() -> None:
    """Segments [0,4) [4,8) [8,12) keeping rows 1, 2, 9, 10, 11 → lengths 2, 0, 3; the empty
    one disappears."""
    cu = torch.tensor([0, 4, 8, 12], dtype=torch.int32)
    out = remap_seqlens(cu, torch.tensor([1, 2, 9, 10, 11]))
    assert out.tolist() == [0, 2, 5] and out.dtype == torch.int32


def test_cut_after_the_feature_layer_is_rejected() -> None:
    """Rows cut after the feature layer would not reach the projector: a clear ValueError."""
    model = cached_model("llava")
    with pytest.raises(ValueError, match="encoder cut layers"):
        vlprune.patch(model, "keep_units", budget=BIG, layer=2)


# ------------------------------------------------------------------------------ contract


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_identity_cut_equals_unpatched(family: str, attn: str) -> None:
    """Keeping every unit after layer 0 runs the gather / kwargs remap / restore path and
    changes nothing: logits (and, sdpa, greedy tokens) equal the unpatched model."""
    model, inputs = cached_model(family, attn), cached_inputs(family, batch=2)
    ref = _logits(model, inputs)

    def generate() -> torch.Tensor:
        return model.generate(**inputs, max_new_tokens=4, do_sample=False)

    with torch.no_grad():
        ref_tokens = generate() if attn == "sdpa" else None
    with vlprune.patch(model, "keep_units", budget=BIG, layer=0) as handle, torch.no_grad():
        out = _logits(model, inputs)
        assert handle._vision.last.encode.encoder.cut
        if ref_tokens is not None:
            assert torch.equal(generate(), ref_tokens)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_cut_after_feature_layer_equals_fixed(family: str) -> None:
    """Cutting units after the feature layer leaves the kept rows' features untouched, so it
    equals the vision-side ``fixed`` cut of their tokens: thumbnail + unpadded crop tokens on
    LLaVA-NeXT, raster merged tokens on Qwen2.5-VL (undoing the window order)."""
    model, inputs = cached_model(family), cached_inputs(family, batch=2)
    with vlprune.patch(model, "keep_units", budget=BIG, units=UNITS) as handle:
        out = _logits(model, inputs)
        state = handle._vision.last.encode.encoder
        n_seq = state.image.count(0)
        tokens = _expected_tokens(state.layouts[0], UNITS, n_seq)
        kept = handle.stats.kept_per_image
    assert kept == [len(tokens)] * 2
    with vlprune.patch(model, "fixed", budget=BIG, indices=tokens):
        ref = _logits(model, inputs)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_equals_single_and_cache_equals_no_cache(family: str) -> None:
    """A cut after layer 0 is per sequence: a padded batch of 2 equals two single runs (last
    logits), and cached greedy generation equals uncached."""
    model, inputs = cached_model(family), cached_inputs(family, batch=2)
    singles = [tiny_inputs(family, batch=1, n_words=[n], seed=i) for i, n in enumerate((5, 9))]
    with vlprune.patch(model, "keep_units", budget=BIG, units=UNITS, layer=0) as handle:
        batched = _logits(model, inputs)[:, -1]
        alone = torch.cat([_logits(model, s)[:, -1] for s in singles])
        with torch.no_grad():
            cached = model.generate(**inputs, max_new_tokens=6, do_sample=False)
            uncached = model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=False)
        rows = handle.stats.vision_layer_tokens
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)
    assert torch.equal(cached, uncached)
    assert len(rows) == 2 and rows[0] == rows[1]
    assert rows[0][1] < rows[0][0]


def test_unpatch_removes_every_hook() -> None:
    """Unpatching removes the layer / projector hooks and the ``get_image_features`` wrapper."""
    model = cached_model("qwen2_5_vl")
    before = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    handle = vlprune.patch(model, "keep_units", budget=BIG, units=UNITS, layer=1)
    assert "get_image_features" in vars(model.model)
    handle.unpatch()
    after = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    assert after == before and "get_image_features" not in vars(model.model)


# ------------------------------------------------------------------------------ oracles


def test_clip_early_cut_equals_hand_run_encoder() -> None:
    """LLaVA: keeping units after layer 0 == running layer 1 (the feature layer) by hand on
    CLS + those rows; the language model receives exactly their projected features."""
    model = cached_model("llava")
    inputs = cached_inputs("llava", batch=1)
    tower = model.model.vision_tower
    with torch.no_grad():
        hidden = tower.pre_layrnorm(tower.embeddings(inputs["pixel_values"]))
        hidden = tower.encoder.layers[0](hidden, None)
        hidden = hidden[:, [0, *(1 + u for u in UNITS)]]
        hidden = tower.encoder.layers[1](hidden, None)
        expected = model.model.multi_modal_projector(hidden[:, 1:])[0]
    with vlprune.patch(model, "keep_units", budget=BIG, units=UNITS, layer=0):
        embeds = _lm_embeds(model, inputs)
    torch.testing.assert_close(_image_rows(model, inputs, embeds, len(UNITS)), expected,
                               atol=1e-5, rtol=0)


def _qwen_hand_run(model, inputs, groups: list[int], layer: int) -> torch.Tensor:
    """The vision encoder run by hand, keeping merge groups ``groups`` (in the blocks' order)
    after block ``layer``; segment lengths recounted with Python loops. Returns merged tokens
    of the kept groups in raster order."""
    visual = model.model.visual
    grid = inputs["image_grid_thw"]
    merge = visual.spatial_merge_size
    unit = merge * merge
    windowed = hasattr(visual, "fullatt_block_indexes")
    with torch.no_grad():
        hidden = visual.patch_embed(inputs["pixel_values"])
        cu = get_vision_cu_seqlens(grid)
        cos, sin = visual.rotary_pos_emb(hidden, get_vision_position_ids(grid, merge))
        order = torch.arange(hidden.shape[0] // unit)
        cu_window = cu
        if windowed:
            order, cu_window = get_vision_window_index(
                grid, merge, visual.window_size, visual.patch_size
            )
            permute = functools.partial(visual.permute_input_for_window_attn,
                                        window_index=order, seq_len=hidden.shape[0])
            hidden, cos, sin = permute(hidden), permute(cos), permute(sin)
        kept_rows = torch.tensor([g * unit + r for g in groups for r in range(unit)])

        def recount(bounds: torch.Tensor) -> torch.Tensor:
            lengths = [sum(1 for row in kept_rows.tolist() if a <= row < b)
                       for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist())]
            cuts = [0]
            for n in lengths:
                if n:
                    cuts.append(cuts[-1] + n)
            return torch.tensor(cuts, dtype=torch.int32)

        for i, block in enumerate(visual.blocks):
            full = not windowed or i in visual.fullatt_block_indexes
            bounds = cu if full else cu_window
            if i > layer:
                bounds = recount(bounds)
            hidden = block(hidden, cu_seqlens=bounds, position_embeddings=(cos, sin))
            if i == layer:
                hidden, cos, sin = hidden[kept_rows], cos[kept_rows], sin[kept_rows]
        merged = visual.merger(hidden)
    raster = order[torch.tensor(groups)]
    return merged[raster.argsort()]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_early_cut_equals_hand_run_encoder(family: str) -> None:
    """Qwen: dropping merge groups after block 0 == the hand-run encoder with gathered 2-D
    RoPE and recounted ``cu_seqlens`` (per-window ``cu_window_seqlens`` on Qwen2.5-VL, where a
    window may end up empty); the language model receives those merged tokens in raster
    order."""
    model = cached_model(family)
    inputs = cached_inputs(family, batch=1)
    visual = model.model.visual
    grid = inputs["image_grid_thw"]
    if hasattr(visual, "fullatt_block_indexes"):
        order, _ = get_vision_window_index(
            grid, visual.spatial_merge_size, visual.window_size, visual.patch_size
        )
    else:
        order = torch.arange(int(grid.prod()) // 4)
    groups = [g for g in range(order.numel()) if int(order[g]) in UNITS]
    expected = _qwen_hand_run(model, inputs, groups, layer=0)
    with vlprune.patch(model, "keep_units", budget=BIG, units=UNITS, layer=0):
        embeds = _lm_embeds(model, inputs)
    torch.testing.assert_close(_image_rows(model, inputs, embeds, len(UNITS)), expected,
                               atol=1e-5, rtol=0)
