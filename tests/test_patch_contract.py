"""The contract of ``vlprune.patch`` for vision-side methods.

Keep-all equals the unpatched model; ``fixed`` equals a hand-built oracle (the unpatched
language model fed only the kept rows at their original positions), in forward and in greedy
generation; cached generation equals uncached generation; a padded batch equals per-sample
runs; unpatching restores the model bit for bit and leaves nothing behind; stats report what
was kept; a model can be patched only once at a time.
"""

from __future__ import annotations

import gc
import math

import pytest
import torch

import vlprune
from tests.helpers import (
    ATTNS,
    BIG,
    MAX_NEW,
    all_hooks,
    cached_inputs,
    cached_model,
    forward,
    generate,
    oracle_generate,
    oracle_inputs,
    oracle_logits,
    trim,
    vlprune_hook_count,
)
from vlprune.compat import call_cache, output_cache
from vlprune.testing import FAMILIES, tiny_inputs, tiny_model

# Local image-token indices kept by the ``fixed`` oracle: valid for every family's default
# image (the smallest, Qwen's 1x8x12 patch grid, has 24 merged tokens).
INDICES = [0, 5, 11, 17, 23]


# ------------------------------------------------------------------------------ keep-all


@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_vision_equals_unpatched(family: str, attn: str) -> None:
    """A budget above every image's size keeps all tokens: logits, greedy tokens unchanged."""
    model, inputs = cached_model(family, attn), cached_inputs(family, batch=2)
    ref_logits = forward(model, inputs).logits
    ref_tokens = generate(model, inputs)
    with vlprune.patch(model, "random", budget=BIG) as handle:
        logits = forward(model, inputs).logits
        stats = handle.stats
        tokens = generate(model, inputs)
    assert stats.kept_tokens == stats.visual_tokens
    assert stats.kept_seq_len == stats.seq_len == inputs["input_ids"].shape[1]
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    assert torch.equal(tokens, ref_tokens)


# -------------------------------------------------------------------------------- oracle


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("family", FAMILIES)
def test_fixed_forward_equals_hand_built_oracle(family: str, attn: str, batch: int) -> None:
    """``fixed`` logits == unpatched LM fed only text + chosen image rows at original positions."""
    model, inputs = cached_model(family, attn), cached_inputs(family, batch=batch)
    embeds, pos, mask, extras = oracle_inputs(model, inputs, INDICES)
    ref = oracle_logits(model, embeds, pos, mask, extras)
    with vlprune.patch(model, "fixed", budget=BIG, indices=INDICES) as handle:
        logits = forward(model, inputs).logits
        stats = handle.stats
    assert stats.kept_per_image == [len(INDICES)] * batch
    assert logits.shape == ref.shape
    valid = mask.bool()
    torch.testing.assert_close(logits[valid], ref[valid], atol=1e-5, rtol=0)


@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("family", FAMILIES)
def test_fixed_generate_equals_hand_written_greedy_loop(family: str, attn: str) -> None:
    """Patched greedy generate == a cached greedy loop on the kept rows (original positions)."""
    model, inputs = cached_model(family, attn), cached_inputs(family, batch=1)
    embeds, pos, mask, extras = oracle_inputs(model, inputs, INDICES)
    ref, _ = oracle_generate(model, embeds, pos, mask, extras)
    with vlprune.patch(model, "fixed", budget=BIG, indices=INDICES):
        tokens = generate(model, inputs)
    eos = model.generation_config.eos_token_id
    assert trim(tokens[0], eos) == trim(ref[0], eos)


@pytest.mark.parametrize("method", ["fixed", "uniform"])
@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_cache_equals_no_cache(family: str, attn: str, method: str) -> None:
    """Decode reuses the pruned cache: cached greedy tokens == re-running the prefill each step."""
    model, inputs = cached_model(family, attn), cached_inputs(family, batch=2)
    options = {"indices": INDICES, "budget": BIG} if method == "fixed" else {"budget": 6}
    with vlprune.patch(model, method, **options):
        cached = generate(model, inputs)
        uncached = generate(model, inputs, use_cache=False)
    assert torch.equal(cached, uncached)


# --------------------------------------------------------------------------------- batch


@pytest.mark.parametrize("method", ["random", "uniform"])
@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("family", FAMILIES)
def test_padded_batch_equals_single_runs(family: str, attn: str, method: str) -> None:
    """A left-padded batch of 3 prompts == each prompt alone (last logits, greedy tokens)."""
    n_words = (5, 9, 3)
    model = cached_model(family, attn)
    batch = cached_inputs(family, batch=3, n_words=n_words)
    options = {"budget": 7} if method == "random" else {"ratio": 0.25}
    eos = model.generation_config.eos_token_id
    with vlprune.patch(model, method, **options) as handle:
        logits = forward(model, batch).logits[:, -1]
        kept = handle.stats.kept_tokens
        tokens = generate(model, batch)
        for i, n in enumerate(n_words):
            single = cached_inputs(family, batch=1, n_words=(n,), seed=i)
            assert torch.equal(single["input_ids"][0], batch["input_ids"][i][-single[
                "input_ids"].shape[1]:])
            single_logits = forward(model, single).logits[0, -1]
            assert handle.stats.kept_tokens == [kept[i]]
            torch.testing.assert_close(logits[i], single_logits, atol=1e-4, rtol=0)
            single_tokens = generate(model, single)
            assert trim(tokens[i], eos) == trim(single_tokens[0], eos), f"sample {i}"


# ------------------------------------------------------------------------------- unpatch


@pytest.mark.parametrize("method", ["random", "fastv"])
@pytest.mark.parametrize("family", FAMILIES)
def test_unpatch_restores_bit_identical_outputs(family: str, method: str) -> None:
    """After patch/forward/generate/unpatch: bit-identical to a never-patched twin, no hooks."""
    patched, fresh = tiny_model(family, seed=3), tiny_model(family, seed=3)
    inputs = cached_inputs(family, batch=2)
    forward(patched, inputs)  # transformers installs its output-capture hooks lazily
    before = all_hooks(patched)
    handle = vlprune.patch(patched, method, budget=5)
    try:
        forward(patched, inputs)
        generate(patched, inputs)
        assert vlprune_hook_count(patched) > 0
    finally:
        handle.unpatch()
    assert not handle.active
    assert vlprune_hook_count(patched) == 0
    assert all_hooks(patched) == before
    assert "get_image_features" not in patched.model.__dict__
    assert torch.equal(forward(patched, inputs).logits, forward(fresh, inputs).logits)
    assert torch.equal(generate(patched, inputs), generate(fresh, inputs))
    handle.unpatch()  # idempotent
    assert vlprune_hook_count(patched) == 0


def test_many_patch_unpatch_cycles_leak_nothing() -> None:
    """1,000 patch/unpatch cycles leave no hooks and do not grow the live object count."""
    model = cached_model("qwen2_vl")
    for method in ("random", "fastv"):  # warm up imports / caches
        vlprune.patch(model, method, budget=5).unpatch()
    hooks_before = all_hooks(model)
    gc.collect()
    before = len(gc.get_objects())
    for i in range(1000):
        handle = vlprune.patch(model, "random" if i % 2 else "fastv", budget=5)
        handle.unpatch()
    del handle
    gc.collect()
    growth = len(gc.get_objects()) - before
    assert all_hooks(model) == hooks_before
    assert vlprune_hook_count(model) == 0
    assert "get_image_features" not in model.model.__dict__
    assert growth < 2000, f"{growth} new live objects after 1,000 cycles"


def test_context_manager_unpatches_on_exit_and_on_exception() -> None:
    """``with patch(...)`` removes the hooks on normal exit and when the body raises."""
    model = cached_model("llava")
    with vlprune.patch(model, "uniform", budget=4) as handle:
        assert handle.active and vlprune_hook_count(model) > 0
    assert not handle.active and vlprune_hook_count(model) == 0
    with pytest.raises(KeyError, match="boom"), vlprune.patch(model, "random", budget=4) as h2:
        assert h2.active
        raise KeyError("boom")
    assert not h2.active and vlprune_hook_count(model) == 0
    assert "get_image_features" not in model.model.__dict__
    vlprune.patch(model, "random", budget=4).unpatch()  # patchable again


# --------------------------------------------------------------------------------- stats


def test_stats_budget_shortens_prefill() -> None:
    """LLaVA, budget 5: 5 of 36 tokens kept, sequence shortened by 31, logits have that length."""
    model, inputs = cached_model("llava"), cached_inputs("llava", batch=1)
    length = inputs["input_ids"].shape[1]
    with vlprune.patch(model, "random", budget=5) as handle:
        assert handle.stats.kept_tokens == []  # nothing ran yet
        logits = forward(model, inputs).logits
        stats = handle.stats
    assert stats.visual_tokens == [36]
    assert stats.kept_tokens == [5]
    assert stats.kept_per_image == [5]
    assert stats.seq_len == length
    assert stats.kept_seq_len == length - 36 + 5
    assert logits.shape[1] == length - 36 + 5
    assert stats.layer_tokens == [[length - 31] * 4]
    assert stats.settings["budget"] == 5 and stats.method == "random"


def test_stats_ratio_rounds_up() -> None:
    """``ratio=0.25`` keeps ceil(0.25 * 36) = 9 tokens of a LLaVA image."""
    model, inputs = cached_model("llava"), cached_inputs("llava", batch=2)
    with vlprune.patch(model, "random", ratio=0.25) as handle:
        forward(model, inputs)
        stats = handle.stats
    assert stats.kept_tokens == [math.ceil(0.25 * 36)] * 2
    assert stats.kept_per_image == [9, 9]


@pytest.mark.parametrize("method", ["random", "uniform"])
def test_stats_next_images_of_different_sizes(method: str) -> None:
    """LLaVA-NeXT, two image sizes in one batch: each image keeps exactly the budget."""
    model = cached_model("llava_next")
    inputs = tiny_inputs("llava_next", batch=2, image_sizes=[(150, 100), (100, 220)])
    n_image = (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()
    assert n_image[0] != n_image[1]
    with vlprune.patch(model, method, budget=7) as handle:
        logits = forward(model, inputs).logits
        stats = handle.stats
        tokens = generate(model, inputs)
        uncached = generate(model, inputs, use_cache=False)
    assert stats.visual_tokens == n_image
    assert stats.kept_per_image == [7, 7]
    assert stats.kept_tokens == [7, 7]
    assert logits.shape[1] == stats.kept_seq_len
    assert torch.equal(tokens, uncached)


# ------------------------------------------------------------------------- patched twice


def test_patching_twice_raises_and_repatching_after_unpatch_works() -> None:
    """A second patch raises AlreadyPatchedError (no new hooks); after unpatch it works."""
    model = cached_model("qwen2_5_vl")
    handle = vlprune.patch(model, "random", budget=3)
    try:
        hooks = vlprune_hook_count(model)
        with pytest.raises(vlprune.AlreadyPatchedError):
            vlprune.patch(model, "uniform", budget=3)
        with pytest.raises(vlprune.AlreadyPatchedError):
            vlprune.patch(model, "fastv", budget=3)
        assert vlprune_hook_count(model) == hooks
        assert handle.active
    finally:
        handle.unpatch()
    with vlprune.patch(model, "uniform", budget=3) as again:
        forward(model, cached_inputs("qwen2_5_vl"))
        assert again.stats.kept_tokens == [3]


# ---------------------------------------------------------------- manual cached decoding


def _manual_decode_logits(model, inputs, tokens: torch.Tensor,
                          with_mask: bool = True) -> torch.Tensor:
    """Logits of a hand-rolled cached decode (the usual HF loop: new ``input_ids``, the grown
    2-D mask unless ``with_mask`` is False, the returned cache, no ``position_ids``) that feeds
    ``tokens`` (B, T)."""
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
        logits, mask, cache = [out.logits[:, -1]], inputs["attention_mask"], output_cache(out)
        for t in range(tokens.shape[1] - 1):
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
            out = model(input_ids=tokens[:, t:t + 1], attention_mask=mask if with_mask else None,
                        **call_cache(cache), use_cache=True)
            logits.append(out.logits[:, -1])
            cache = output_cache(out)
    return torch.stack(logits, 1)


def _generate_logits(model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, inputs["input_ids"].shape[1]:], torch.stack(out.logits, 1)


# Qwen is left out: transformers 5.24 itself cannot run this loop for Qwen2-VL (the 3-D
# position ids it derives from the full 2-D mask have the mask's length, not 1).
@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_manual_cached_decode_equals_generate_unpatched(family: str) -> None:
    """Control for the test below: unpatched, the hand-rolled loop reproduces generate."""
    model, inputs = cached_model(family), cached_inputs(family, batch=1)
    tokens, ref = _generate_logits(model, inputs)
    torch.testing.assert_close(_manual_decode_logits(model, inputs, tokens), ref,
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["random", "fixed"])
@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_manual_cached_decode_equals_generate(family: str, method: str) -> None:
    """After a vision-side cut, a hand-rolled cached decode gives generate's logits."""
    model, inputs = cached_model(family), cached_inputs(family, batch=1)
    options = {"indices": INDICES} if method == "fixed" else {}
    with vlprune.patch(model, method, budget=5, **options):
        tokens, ref = _generate_logits(model, inputs)
        manual = _manual_decode_logits(model, inputs, tokens)
    torch.testing.assert_close(manual, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["random", "fastv", "flowcut"])
@pytest.mark.parametrize("family", FAMILIES)
def test_manual_decode_without_mask_or_positions_equals_generate(family: str, method: str) -> None:
    """A hand-rolled cached decode passing neither mask nor positions (batch 1): the model
    counts positions from the pruned cache, which reports its unpruned length, so the logits
    are generate's (Qwen's M-RoPE included)."""
    model, inputs = cached_model(family), cached_inputs(family, batch=1)
    with vlprune.patch(model, method, budget=5):
        tokens, ref = _generate_logits(model, inputs)
        manual = _manual_decode_logits(model, inputs, tokens, with_mask=False)
    torch.testing.assert_close(manual, ref, atol=1e-5, rtol=0)


def test_two_models_patched_at_once_are_independent() -> None:
    """Patches are per instance: two models patched together keep their own stats/outputs."""
    llava, qwen = cached_model("llava"), cached_model("qwen2_vl")
    with vlprune.patch(llava, "random", budget=3) as h1, \
            vlprune.patch(qwen, "uniform", budget=6) as h2:
        forward(llava, cached_inputs("llava"))
        forward(qwen, cached_inputs("qwen2_vl"))
        assert h1.stats.kept_tokens == [3] and h2.stats.kept_tokens == [6]
    assert vlprune_hook_count(llava) == vlprune_hook_count(qwen) == 0


@pytest.mark.parametrize("n_words", [(5, 9), "equal"])
@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl"])
def test_rows_keeping_different_counts_are_left_padded(family: str, n_words) -> None:
    """Rows keeping different counts (ratio, image sizes differ) are left-padded; == batch 1."""
    # "equal": prompts of equal length, so generate passes no 2-D mask at all.
    sizes = [(150, 100), (100, 220)] if family == "llava_next" else [(168, 112), (224, 112)]
    if n_words == "equal":  # pad the image with fewer tokens with more words
        n_words = (5, 25) if family == "llava_next" else (13, 5)
    model = cached_model(family)
    batch = tiny_inputs(family, batch=2, n_words=list(n_words), image_sizes=sizes)
    n_visual = (batch["input_ids"] == model.config.image_token_id).sum(1).tolist()
    kept = [math.ceil(0.25 * n) for n in n_visual]
    assert kept[0] != kept[1]
    eos = model.generation_config.eos_token_id
    with vlprune.patch(model, "random", ratio=0.25) as handle:
        logits = forward(model, batch).logits[:, -1]
        stats = handle.stats
        tokens = generate(model, batch)
        assert torch.equal(tokens, generate(model, batch, use_cache=False))
        for i in range(2):
            single = tiny_inputs(family, batch=1, n_words=[n_words[i]], image_sizes=[sizes[i]],
                                 seed=i)
            torch.testing.assert_close(logits[i], forward(model, single).logits[0, -1],
                                       atol=1e-4, rtol=0)
            assert trim(tokens[i], eos) == trim(generate(model, single)[0], eos)
    assert stats.kept_per_image == kept
    length = batch["input_ids"].shape[1]  # original padding counts as text: it stays
    assert stats.kept_seq_len == max(length - n + k for n, k in zip(n_visual, kept))


def test_dropped_patched_model_is_garbage_collected() -> None:
    """Patching does not keep a model alive: dropping model and handle frees it."""
    import weakref

    model = tiny_model("llava")
    ref = weakref.ref(model)
    handle = vlprune.patch(model, "random", budget=3)
    del model, handle
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_beam_search_equals_unpatched(family: str) -> None:
    """Vision-side keep-all under beam search (batch expanded by generate) == unpatched."""
    model, inputs = cached_model(family), cached_inputs(family, batch=1)
    ref = generate(model, inputs, num_beams=2)
    with vlprune.patch(model, "uniform", budget=BIG):
        assert torch.equal(generate(model, inputs, num_beams=2), ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_beam_search_keeps_the_budget_in_every_beam(family: str) -> None:
    """generate(num_beams=2, num_return_sequences=2) on a batch of 2: each of the 4 expanded
    rows keeps the budget (images encoded once, layouts repeated per beam)."""
    model, inputs = cached_model(family), cached_inputs(family, batch=2)
    with vlprune.patch(model, "uniform", budget=4) as handle:
        out = generate(model, inputs, num_beams=2, num_return_sequences=2)
        assert out.shape[0] == 4
        assert handle.stats.kept_tokens == [4, 4, 4, 4]


@pytest.mark.parametrize("method", ["random", "fastv"])
@pytest.mark.parametrize("family", FAMILIES)
def test_text_only_prompts_pass_through(family: str, method: str) -> None:
    """Prompts without images are not touched: bit-identical logits and tokens, empty stats."""
    from vlprune.testing import tiny_tokenizer

    model = cached_model(family)
    inputs = tiny_tokenizer()(["<s> w1 w2 w3", "<s> w5 w6 w7 w8 w9"], return_tensors="pt",
                              padding=True)
    ref_logits, ref_tokens = forward(model, inputs).logits, generate(model, inputs)
    with vlprune.patch(model, method, budget=3) as handle:
        assert torch.equal(forward(model, inputs).logits, ref_logits)
        assert handle.stats.kept_tokens == []
        assert torch.equal(generate(model, inputs), ref_tokens)
