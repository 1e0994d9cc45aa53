"""The decoder cut's padded path: rows of a batch that keep different numbers of rows.

A chooser returns ``(index, slots)``; padding slots must be invisible to every query in the cut
layer and all later ones, in prefill and in every decode step, whatever mask the layer got
(4-D with batch padding, None on sdpa's fast path, which must then be materialised, or flash
attention's 2-D padding mask, rebuilt for the rows each layer sees).
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch
from torch.nn.attention.flex_attention import create_mask
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

from tests.flash_like import NAME as FLASH_LIKE
from tests.flash_like import use_flash_like
from tests.flex_like import NAME as FLEX_LIKE
from tests.flex_like import flex_like_mask
from tests.helpers import cached_model
from vlprune.adapters import get_adapter
from vlprune.hooks import decoder, decoder_steps
from vlprune.hooks.calls import CallTracker
from vlprune.hooks.decoder import DecoderCut
from vlprune.hooks.decoder_state import CutContext
from vlprune.hooks.masks import causal_slot_mask, layer_mask, mask_slots, query_rows
from vlprune.hooks.vision import VisionCut
from vlprune.methods.base import keep_rows_padded
from vlprune.testing import FAMILIES, tiny_inputs, tiny_model

ATTNS = ("sdpa", "eager")
CUT = 2
MAX_NEW = 4


def _drop_chooser(drop: list[bool]):
    """At the cut, rows flagged in ``drop`` lose every visual row; the others keep all."""

    def chooser(ctx: CutContext):
        flags = torch.tensor(drop, device=ctx.is_image.device)
        return keep_rows_padded(~(ctx.is_image & flags[:, None]))

    return chooser


def _run(model, inputs, drop: list[bool], **kwargs):
    """Greedy generate with the cut installed: (new tokens, first-step logits, cut state)."""
    adapter = get_adapter(model)
    calls = CallTracker(adapter)
    vision = VisionCut(adapter, calls, None)
    cut = DecoderCut(adapter, [CUT], _drop_chooser(drop), vision)
    handles = [*calls.install(), *vision.install(), *cut.install()]
    try:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    new = out.sequences[:, inputs["input_ids"].shape[1]:]
    return new, out.logits[0], cut.last


@functools.cache
def _model(family: str, attn: str):
    """The shared tiny model, or an own one switched to flash's conventions."""
    if attn == FLASH_LIKE:
        return use_flash_like(tiny_model(family))
    return cached_model(family, attn)


def _row(inputs, i: int, family: str, n_words: list[int], seed: int):
    """Sample i of the batch, built on its own (no padding)."""
    return tiny_inputs(family, batch=1, n_words=[n_words[i]], seed=seed + i)


@pytest.mark.parametrize("attn, lengths", [("sdpa", "padded"), ("sdpa", "equal"),
                                           ("eager", "padded"), (FLASH_LIKE, "padded"),
                                           (FLASH_LIKE, "equal")])
@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_batch_equals_single_rows(family: str, attn: str, lengths: str) -> None:
    """Row 0 drops all its visual rows at layer 2, row 1 keeps them: each row's first-step
    logits (atol 1e-4) and greedy tokens equal that row run alone (``equal``: same prompt
    lengths, so sdpa and flash get no mask and one is built; eager always gets a 4-D mask)."""
    model = _model(family, attn)
    n_words = [5, 9] if lengths == "padded" else [6, 6]
    batch = tiny_inputs(family, batch=2, n_words=n_words, seed=3)
    tokens, logits, state = _run(model, batch, [True, False])
    n_visual = int((batch["input_ids"][1] == model.config.image_token_id).sum())
    assert state.is_image.sum(1).tolist() == [0, n_visual]
    assert state.slots is not None and (~state.slots).sum(1).tolist() == [n_visual, 0]
    for i, drop in enumerate([True, False]):
        single = _row(batch, i, family, n_words, seed=3)
        ref_tokens, ref_logits, _ = _run(model, single, [drop])
        torch.testing.assert_close(logits[i:i + 1], ref_logits, atol=1e-4, rtol=0)
        assert torch.equal(tokens[i:i + 1], ref_tokens)


@pytest.mark.parametrize("attn", [*ATTNS, FLASH_LIKE])
def test_padded_cut_cached_equals_uncached(attn: str) -> None:
    """Decode reuses the pruned per-layer cache: cached greedy tokens == re-prefilling every
    step (``use_cache=False``), for a batch whose rows keep different counts."""
    model = _model("llava", attn)
    batch = tiny_inputs("llava", batch=2, n_words=[5, 9], seed=1)
    cached, _, _ = _run(model, batch, [False, True])
    uncached, _, _ = _run(model, batch, [False, True], use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize(("attn", "n_words", "builder", "shared_in_prefill"), [
    ("eager", [5, 9], "gather_mask_4d", False), ("sdpa", [6, 6], "layer_mask", True)])
def test_decode_builds_one_mask_per_step(attn: str, n_words: list[int], builder: str,
                                         shared_in_prefill: bool,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Layers holding the same rows share their decode-step mask: with one cut, each decode
    step builds one mask (4-D gathered from the step's own mask, or built by the
    implementation's builder where sdpa passes none), not one per layer from the cut on; the
    tokens are those of the unshared path. (The prefill gathers one 4-D mask per layer from the
    cut on, or builds one for all of them.)"""
    model = cached_model("llava", attn)
    batch = tiny_inputs("llava", batch=2, n_words=n_words, seed=1)
    expected, _, _ = _run(model, batch, [False, True])
    real = getattr(decoder_steps, builder)
    calls: list[int] = []

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    for module in (decoder, decoder_steps):
        if hasattr(module, builder):
            monkeypatch.setattr(module, builder, counted)
    tokens, _, _ = _run(model, batch, [False, True])
    assert torch.equal(tokens, expected)
    prefill_calls = 1 if shared_in_prefill else len(get_adapter(model).decoder_layers) - CUT
    assert len(calls) - prefill_calls == MAX_NEW - 1


def test_layer_tokens_count_real_rows_only() -> None:
    """``layer_tokens`` per sample counts real rows entering each layer, not padding slots."""
    model = cached_model("qwen2_vl", "sdpa")
    batch = tiny_inputs("qwen2_vl", batch=2, n_words=[4, 4], seed=0)
    _, _, state = _run(model, batch, [True, False])
    length = batch["input_ids"].shape[1]
    n_visual = int((batch["input_ids"][0] == model.config.image_token_id).sum())
    assert state.layer_tokens[0] == [length, length, length - n_visual, length - n_visual]
    assert state.layer_tokens[1] == [length] * 4


def test_keep_rows_padded_left_pads_shorter_rows() -> None:
    """Equal counts give plain sorted indices; unequal ones left-pad with masked slots."""
    keep = torch.tensor([[True, False, True, True], [True, True, False, True]])
    assert torch.equal(keep_rows_padded(keep), torch.tensor([[0, 2, 3], [0, 1, 3]]))
    keep = torch.tensor([[False, False, True, True], [True, True, False, True]])
    index, slots = keep_rows_padded(keep)
    assert torch.equal(index, torch.tensor([[0, 2, 3], [0, 1, 3]]))
    assert torch.equal(slots, torch.tensor([[False, True, True], [True, True, True]]))


@pytest.mark.parametrize("kind, builder", [("bool", sdpa_mask), ("float", eager_mask)])
def test_materialised_mask_follows_transformers_convention(kind: str, builder) -> None:
    """Without padding slots the materialised mask equals transformers' own causal mask of the
    same backend (bool for sdpa, additive float for eager), prefill and decode shapes."""
    for n_queries, n_keys in ((5, 5), (1, 7)):
        ours = causal_slot_mask(torch.ones(2, n_keys, dtype=torch.bool), n_queries, kind,
                                torch.float32)
        theirs = builder(batch_size=2, q_length=n_queries, kv_length=n_keys,
                         q_offset=n_keys - n_queries, allow_is_causal_skip=False,
                         dtype=torch.float32)
        assert ours.dtype == theirs.dtype
        assert torch.equal(ours, theirs.expand_as(ours))


def test_padding_slots_are_hidden_keys_and_see_themselves() -> None:
    """A padding slot is masked as a key for every other query and attends only to itself."""
    slots = torch.tensor([[False, True, True]])
    mask = causal_slot_mask(slots, 3, "bool", torch.float32)[0, 0]
    assert mask.tolist() == [[True, False, False], [False, True, False], [False, True, True]]
    full = torch.ones(1, 1, 3, 3, dtype=torch.bool).tril()
    assert torch.equal(mask_slots(full, slots, slots)[0, 0], mask)
    additive = torch.zeros(1, 1, 3, 3).masked_fill(~full, torch.finfo(torch.float32).min)
    out = mask_slots(additive, slots, slots)[0, 0]
    assert torch.equal(out == 0, mask)


def test_no_cut_layer_installs_no_hook() -> None:
    """An empty cut-layer list (a stage switched off) installs nothing."""
    adapter = get_adapter(cached_model("llava", "sdpa"))
    vision = VisionCut(adapter, CallTracker(adapter), None)
    assert DecoderCut(adapter, [], _drop_chooser([]), vision).install() == []


def _config(attn: str) -> SimpleNamespace:
    return SimpleNamespace(_attn_implementation=attn)


def test_layer_mask_is_built_by_the_implementations_builder() -> None:
    """Flash gets the 2-D padding mask itself (None without padding: its causal fast path);
    flex a ``BlockMask`` hiding the keys sdpa's materialised mask hides for every real query;
    an implementation without a registered mask builder is a NotImplementedError naming it."""
    keys = torch.tensor([[False, True, True, True], [True, True, True, True]])
    flash = _config("flash_attention_2")
    assert torch.equal(layer_mask(flash, keys, 4, torch.float32), keys)
    assert layer_mask(flash, torch.ones_like(keys), 1, torch.float32) is None
    sdpa = layer_mask(_config("sdpa"), keys, 2, torch.float32)[:, 0]
    AttentionMaskInterface.register(FLEX_LIKE, flex_like_mask)
    block = layer_mask(_config(FLEX_LIKE), keys, 2, torch.float32)
    assert tuple(block.seq_lengths) == (2, 4)
    flex = create_mask(block.mask_mod, 2, 1, 2, 4, device="cpu")[:, 0]
    real = keys[:, -2:]
    assert torch.equal(flex[real], sdpa[real])
    with pytest.raises(NotImplementedError, match="'no_such_attention'"):
        layer_mask(_config("no_such_attention"), keys, 2, torch.float32)


def test_probe_rows_are_read_from_every_mask_kind() -> None:
    """A probe's mask rows are the same read from sdpa's 4-D mask, flash's 2-D padding mask
    and flex's ``BlockMask``; None means causal only; any other object is a TypeError."""
    padding = torch.tensor([[False, False, True, True, True], [True] * 5])
    queries = torch.tensor([[4, 2], [4, 0]])
    four_d = sdpa_mask(batch_size=2, q_length=5, kv_length=5, attention_mask=padding,
                       allow_is_causal_skip=False)
    want = query_rows(four_d, queries, 5)
    assert want.shape == (2, 1, 2, 5) and not bool(want[0, 0, :, :2].any())
    assert torch.equal(query_rows(padding, queries, 5), want)
    assert torch.equal(query_rows(flex_like_mask(2, 5, 5, attention_mask=padding), queries, 5),
                       want)
    causal = sdpa_mask(batch_size=2, q_length=5, kv_length=5, allow_is_causal_skip=False)
    assert torch.equal(query_rows(None, queries, 5), query_rows(causal, queries, 5))
    with pytest.raises(TypeError, match="str"):
        query_rows("mask", queries, 5)
