"""The contract of ``vlprune.patch`` for vision-side methods (DESIGN.md §4 tests 1–5).

Keep-all equals the unpatched model; ``fixed`` equals a hand-built oracle (the unpatched
language model fed only the kept rows at their original positions), in forward and in greedy
generation; cached generation equals uncached generation; a padded batch equals per-sample
runs; unpatching restores the model bit for bit and leaves nothing behind; stats report what
was kept; a model can be patched only once at a time.
"""

from __future__ import annotations

import functools
import gc
import math

import pytest
import torch
from transformers import DynamicCache

import vlprune
from vlprune.testing import FAMILIES, kept_lm_extras, tiny_inputs, tiny_model

ATTNS = ("sdpa", "eager")
# Local image-token indices kept by the ``fixed`` oracle: valid for every family's default
# image (the smallest, Qwen's 1x8x12 patch grid, has 24 merged tokens).
INDICES = [0, 5, 11, 17, 23]
MAX_NEW = 8
BIG = 10**6


@functools.cache
def _model(family: str, attn: str = "sdpa", seed: int = 0):
    """Shared tiny model; every test unpatches what it patches (context manager / finally)."""
    return tiny_model(family, attn_implementation=attn, seed=seed)


@functools.cache
def _inputs(family: str, batch: int = 1, n_words: tuple[int, ...] | None = None, seed: int = 0):
    return tiny_inputs(
        family, batch=batch, n_words=list(n_words) if n_words else None, seed=seed
    )


def _forward(model, inputs, **kwargs):
    with torch.no_grad():
        return model(**inputs, **kwargs)


def _generate(model, inputs, **kwargs) -> torch.Tensor:
    """Greedy new tokens only, (B, <= MAX_NEW)."""
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False, **kwargs)
    return out[:, inputs["input_ids"].shape[1]:]


def _trim(tokens: torch.Tensor, eos: int) -> list[int]:
    """A row of generated ids up to and including the first EOS (generate stops there)."""
    out = []
    for tok in tokens.tolist():
        out.append(tok)
        if tok == eos:
            break
    return out


def _hook_owner(fn) -> str:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(getattr(fn, "__func__", fn), "__module__", "") or ""


def _all_hooks(model: torch.nn.Module) -> set[tuple[str, str, int]]:
    """Every forward (pre-)hook on every submodule, by (module name, kind, hook id)."""
    return {
        (name, kind, key)
        for name, module in model.named_modules()
        for kind, hooks in (("pre", module._forward_pre_hooks), ("post", module._forward_hooks))
        for key in hooks
    }


def _hook_count(model: torch.nn.Module) -> int:
    """Hooks installed by vlprune (transformers keeps its own output-capture hooks, installed
    lazily on the first forward, which are not ours to remove)."""
    return sum(
        _hook_owner(fn).startswith("vlprune")
        for module in model.modules()
        for hooks in (module._forward_pre_hooks, module._forward_hooks)
        for fn in hooks.values()
    )


def _capture_lm_kwargs(model, inputs) -> dict:
    """The keyword inputs the language model receives in a plain forward of ``inputs``."""
    captured: dict = {}

    def hook(module, args, kwargs):
        captured.update(kwargs)

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        _forward(model, inputs)
    finally:
        handle.remove()
    return captured


def _keep_index(input_ids: torch.Tensor, image_token_id: int, local: list[int]) -> torch.Tensor:
    """(B, Lp) kept sequence positions: all text rows + image rows ``local`` (one image/row)."""
    rows = []
    for row in input_ids:
        is_image = row == image_token_id
        image_pos = is_image.nonzero().squeeze(1)
        keep = ~is_image
        keep[image_pos[local]] = True
        rows.append(keep.nonzero().squeeze(1))
    assert len({len(r) for r in rows}) == 1, "oracle needs equal kept counts per row"
    return torch.stack(rows)


def _gather_positions(pos: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    if pos.dim() == 2:
        return pos.expand(index.shape[0], -1).gather(1, index)
    return torch.stack([p.expand(index.shape[0], -1).gather(1, index) for p in pos])


def _oracle_inputs(model, inputs, local: list[int]):
    """Kept embeddings, original positions, 2-D mask and extra inputs (DeepStack), gathered by
    hand from the unpatched model's language-model inputs."""
    kw = _capture_lm_kwargs(model, inputs)
    embeds = kw["inputs_embeds"]
    batch, length = embeds.shape[:2]
    pos = kw.get("position_ids")
    if pos is None:
        pos = torch.arange(length).expand(batch, length)
    mask = kw.get("attention_mask")
    if mask is None:
        mask = torch.ones(batch, length, dtype=torch.long)
    index = _keep_index(inputs["input_ids"], model.config.image_token_id, local)
    rows = torch.arange(batch)[:, None]
    extras = kept_lm_extras(kw, index)
    return embeds[rows, index], _gather_positions(pos, index), mask.gather(1, index), extras


def _oracle_logits(model, embeds, pos, mask, extras) -> torch.Tensor:
    with torch.no_grad():
        hidden = model.model.language_model(
            inputs_embeds=embeds, position_ids=pos, attention_mask=mask, **extras
        ).last_hidden_state
        return model.lm_head(hidden)


def _oracle_generate(model, embeds, pos, mask, extras, steps: int = MAX_NEW) -> torch.Tensor:
    """Greedy loop on the language model with a DynamicCache: prefill the kept rows at their
    original positions; new token t sits at ``last prompt position + 1 + t`` (all M-RoPE rows),
    as ``generate``'s ``_update_model_kwargs_for_generation`` advances positions."""
    lm = model.model.language_model
    cache = DynamicCache(config=lm.config)
    last = pos[..., -1:]
    tokens = []
    with torch.no_grad():
        hidden = lm(
            inputs_embeds=embeds, position_ids=pos, attention_mask=mask, cache=cache,
            use_cache=True, **extras,
        ).last_hidden_state
        for t in range(steps):
            nxt = model.lm_head(hidden[:, -1]).argmax(-1)
            tokens.append(nxt)
            if t == steps - 1:
                break
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
            hidden = lm(
                inputs_embeds=model.get_input_embeddings()(nxt[:, None]),
                position_ids=last + 1 + t,
                attention_mask=mask,
                cache=cache,
                use_cache=True,
            ).last_hidden_state
    return torch.stack(tokens, 1)


# ------------------------------------------------------------------------------ keep-all


@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_vision_equals_unpatched(family: str, attn: str) -> None:
    """A budget above every image's size keeps all tokens: logits, greedy tokens unchanged."""
    model, inputs = _model(family, attn), _inputs(family, batch=2)
    ref_logits = _forward(model, inputs).logits
    ref_tokens = _generate(model, inputs)
    with vlprune.patch(model, "random", budget=BIG) as handle:
        logits = _forward(model, inputs).logits
        stats = handle.stats
        tokens = _generate(model, inputs)
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
    model, inputs = _model(family, attn), _inputs(family, batch=batch)
    embeds, pos, mask, extras = _oracle_inputs(model, inputs, INDICES)
    ref = _oracle_logits(model, embeds, pos, mask, extras)
    with vlprune.patch(model, "fixed", budget=BIG, indices=INDICES) as handle:
        logits = _forward(model, inputs).logits
        stats = handle.stats
    assert stats.kept_per_image == [len(INDICES)] * batch
    assert logits.shape == ref.shape
    valid = mask.bool()
    torch.testing.assert_close(logits[valid], ref[valid], atol=1e-5, rtol=0)


@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("family", FAMILIES)
def test_fixed_generate_equals_hand_written_greedy_loop(family: str, attn: str) -> None:
    """Patched greedy generate == a cached greedy loop on the kept rows (original positions)."""
    model, inputs = _model(family, attn), _inputs(family, batch=1)
    embeds, pos, mask, extras = _oracle_inputs(model, inputs, INDICES)
    ref = _oracle_generate(model, embeds, pos, mask, extras)
    with vlprune.patch(model, "fixed", budget=BIG, indices=INDICES):
        tokens = _generate(model, inputs)
    eos = model.generation_config.eos_token_id
    assert _trim(tokens[0], eos) == _trim(ref[0], eos)


@pytest.mark.parametrize("method", ["fixed", "uniform"])
@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_cache_equals_no_cache(family: str, attn: str, method: str) -> None:
    """Decode reuses the pruned cache: cached greedy tokens == re-running the prefill each step."""
    model, inputs = _model(family, attn), _inputs(family, batch=2)
    options = {"indices": INDICES, "budget": BIG} if method == "fixed" else {"budget": 6}
    with vlprune.patch(model, method, **options):
        cached = _generate(model, inputs)
        uncached = _generate(model, inputs, use_cache=False)
    assert torch.equal(cached, uncached)


# --------------------------------------------------------------------------------- batch


@pytest.mark.parametrize("method", ["random", "uniform"])
@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("family", FAMILIES)
def test_padded_batch_equals_single_runs(family: str, attn: str, method: str) -> None:
    """A left-padded batch of 3 prompts == each prompt alone (last logits, greedy tokens)."""
    n_words = (5, 9, 3)
    model = _model(family, attn)
    batch = _inputs(family, batch=3, n_words=n_words)
    options = {"budget": 7} if method == "random" else {"ratio": 0.25}
    eos = model.generation_config.eos_token_id
    with vlprune.patch(model, method, **options) as handle:
        logits = _forward(model, batch).logits[:, -1]
        kept = handle.stats.kept_tokens
        tokens = _generate(model, batch)
        for i, n in enumerate(n_words):
            single = _inputs(family, batch=1, n_words=(n,), seed=i)
            assert torch.equal(single["input_ids"][0], batch["input_ids"][i][-single[
                "input_ids"].shape[1]:])
            single_logits = _forward(model, single).logits[0, -1]
            assert handle.stats.kept_tokens == [kept[i]]
            torch.testing.assert_close(logits[i], single_logits, atol=1e-4, rtol=0)
            single_tokens = _generate(model, single)
            assert _trim(tokens[i], eos) == _trim(single_tokens[0], eos), f"sample {i}"


# ------------------------------------------------------------------------------- unpatch


@pytest.mark.parametrize("method", ["random", "fastv"])
@pytest.mark.parametrize("family", FAMILIES)
def test_unpatch_restores_bit_identical_outputs(family: str, method: str) -> None:
    """After patch/forward/generate/unpatch: bit-identical to a never-patched twin, no hooks."""
    patched, fresh = tiny_model(family, seed=3), tiny_model(family, seed=3)
    inputs = _inputs(family, batch=2)
    _forward(patched, inputs)  # transformers installs its output-capture hooks lazily
    before = _all_hooks(patched)
    handle = vlprune.patch(patched, method, budget=5)
    try:
        _forward(patched, inputs)
        _generate(patched, inputs)
        assert _hook_count(patched) > 0
    finally:
        handle.unpatch()
    assert not handle.active
    assert _hook_count(patched) == 0
    assert _all_hooks(patched) == before
    assert "get_image_features" not in patched.model.__dict__
    assert torch.equal(_forward(patched, inputs).logits, _forward(fresh, inputs).logits)
    assert torch.equal(_generate(patched, inputs), _generate(fresh, inputs))
    handle.unpatch()  # idempotent
    assert _hook_count(patched) == 0


def test_many_patch_unpatch_cycles_leak_nothing() -> None:
    """1,000 patch/unpatch cycles leave no hooks and do not grow the live object count."""
    model = _model("qwen2_vl")
    for method in ("random", "fastv"):  # warm up imports / caches
        vlprune.patch(model, method, budget=5).unpatch()
    hooks_before = _all_hooks(model)
    gc.collect()
    before = len(gc.get_objects())
    for i in range(1000):
        handle = vlprune.patch(model, "random" if i % 2 else "fastv", budget=5)
        handle.unpatch()
    del handle
    gc.collect()
    growth = len(gc.get_objects()) - before
    assert _all_hooks(model) == hooks_before
    assert _hook_count(model) == 0
    assert "get_image_features" not in model.model.__dict__
    assert growth < 2000, f"{growth} new live objects after 1,000 cycles"


def test_context_manager_unpatches_on_exit_and_on_exception() -> None:
    """``with patch(...)`` removes the hooks on normal exit and when the body raises."""
    model = _model("llava")
    with vlprune.patch(model, "uniform", budget=4) as handle:
        assert handle.active and _hook_count(model) > 0
    assert not handle.active and _hook_count(model) == 0
    with pytest.raises(KeyError, match="boom"), vlprune.patch(model, "random", budget=4) as h2:
        assert h2.active
        raise KeyError("boom")
    assert not h2.active and _hook_count(model) == 0
    assert "get_image_features" not in model.model.__dict__
    vlprune.patch(model, "random", budget=4).unpatch()  # patchable again


# --------------------------------------------------------------------------------- stats


def test_stats_budget_shortens_prefill() -> None:
    """LLaVA, budget 5: 5 of 36 tokens kept, sequence shortened by 31, logits have that length."""
    model, inputs = _model("llava"), _inputs("llava", batch=1)
    length = inputs["input_ids"].shape[1]
    with vlprune.patch(model, "random", budget=5) as handle:
        assert handle.stats.kept_tokens == []  # nothing ran yet
        logits = _forward(model, inputs).logits
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
    model, inputs = _model("llava"), _inputs("llava", batch=2)
    with vlprune.patch(model, "random", ratio=0.25) as handle:
        _forward(model, inputs)
        stats = handle.stats
    assert stats.kept_tokens == [math.ceil(0.25 * 36)] * 2
    assert stats.kept_per_image == [9, 9]


@pytest.mark.parametrize("method", ["random", "uniform"])
def test_stats_next_images_of_different_sizes(method: str) -> None:
    """LLaVA-NeXT, two image sizes in one batch: each image keeps exactly the budget."""
    model = _model("llava_next")
    inputs = tiny_inputs("llava_next", batch=2, image_sizes=[(150, 100), (100, 220)])
    n_image = (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()
    assert n_image[0] != n_image[1]
    with vlprune.patch(model, method, budget=7) as handle:
        logits = _forward(model, inputs).logits
        stats = handle.stats
        tokens = _generate(model, inputs)
        uncached = _generate(model, inputs, use_cache=False)
    assert stats.visual_tokens == n_image
    assert stats.kept_per_image == [7, 7]
    assert stats.kept_tokens == [7, 7]
    assert logits.shape[1] == stats.kept_seq_len
    assert torch.equal(tokens, uncached)


# ------------------------------------------------------------------------- patched twice


def test_patching_twice_raises_and_repatching_after_unpatch_works() -> None:
    """A second patch raises AlreadyPatchedError (no new hooks); after unpatch it works."""
    model = _model("qwen2_5_vl")
    handle = vlprune.patch(model, "random", budget=3)
    try:
        hooks = _hook_count(model)
        with pytest.raises(vlprune.AlreadyPatchedError):
            vlprune.patch(model, "uniform", budget=3)
        with pytest.raises(vlprune.AlreadyPatchedError):
            vlprune.patch(model, "fastv", budget=3)
        assert _hook_count(model) == hooks
        assert handle.active
    finally:
        handle.unpatch()
    with vlprune.patch(model, "uniform", budget=3) as again:
        _forward(model, _inputs("qwen2_5_vl"))
        assert again.stats.kept_tokens == [3]


# ---------------------------------------------------------------- manual cached decoding


def _manual_decode_logits(model, inputs, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of a hand-rolled cached decode (the usual HF loop: new ``input_ids``, the grown
    2-D mask, the returned cache, no ``position_ids``) that feeds ``tokens`` (B, T)."""
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
        logits, mask, cache = [out.logits[:, -1]], inputs["attention_mask"], out.cache
        for t in range(tokens.shape[1] - 1):
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
            out = model(input_ids=tokens[:, t:t + 1], attention_mask=mask, cache=cache,
                        use_cache=True)
            logits.append(out.logits[:, -1])
            cache = out.cache
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
    model, inputs = _model(family), _inputs(family, batch=1)
    tokens, ref = _generate_logits(model, inputs)
    torch.testing.assert_close(_manual_decode_logits(model, inputs, tokens), ref,
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["random", "fixed"])
@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_manual_cached_decode_equals_generate(family: str, method: str) -> None:
    """After a vision-side cut, a hand-rolled cached decode gives generate's logits."""
    model, inputs = _model(family), _inputs(family, batch=1)
    options = {"indices": INDICES} if method == "fixed" else {}
    with vlprune.patch(model, method, budget=5, **options):
        tokens, ref = _generate_logits(model, inputs)
        manual = _manual_decode_logits(model, inputs, tokens)
    torch.testing.assert_close(manual, ref, atol=1e-5, rtol=0)


def test_two_models_patched_at_once_are_independent() -> None:
    """Patches are per instance: two models patched together keep their own stats/outputs."""
    llava, qwen = _model("llava"), _model("qwen2_vl")
    with vlprune.patch(llava, "random", budget=3) as h1, \
            vlprune.patch(qwen, "uniform", budget=6) as h2:
        _forward(llava, _inputs("llava"))
        _forward(qwen, _inputs("qwen2_vl"))
        assert h1.stats.kept_tokens == [3] and h2.stats.kept_tokens == [6]
    assert _hook_count(llava) == _hook_count(qwen) == 0


@pytest.mark.parametrize("n_words", [(5, 9), "equal"])
@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl"])
def test_rows_keeping_different_counts_are_left_padded(family: str, n_words) -> None:
    """Rows keeping different counts (ratio, image sizes differ) are left-padded; == batch 1."""
    # "equal": prompts of equal length, so generate passes no 2-D mask at all.
    sizes = [(150, 100), (100, 220)] if family == "llava_next" else [(168, 112), (224, 112)]
    if n_words == "equal":  # pad the image with fewer tokens with more words
        n_words = (5, 25) if family == "llava_next" else (13, 5)
    model = _model(family)
    batch = tiny_inputs(family, batch=2, n_words=list(n_words), image_sizes=sizes)
    n_visual = (batch["input_ids"] == model.config.image_token_id).sum(1).tolist()
    kept = [math.ceil(0.25 * n) for n in n_visual]
    assert kept[0] != kept[1]
    eos = model.generation_config.eos_token_id
    with vlprune.patch(model, "random", ratio=0.25) as handle:
        logits = _forward(model, batch).logits[:, -1]
        stats = handle.stats
        tokens = _generate(model, batch)
        assert torch.equal(tokens, _generate(model, batch, use_cache=False))
        for i in range(2):
            single = tiny_inputs(family, batch=1, n_words=[n_words[i]], image_sizes=[sizes[i]],
                                 seed=i)
            torch.testing.assert_close(logits[i], _forward(model, single).logits[0, -1],
                                       atol=1e-4, rtol=0)
            assert _trim(tokens[i], eos) == _trim(_generate(model, single)[0], eos)
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
    model, inputs = _model(family), _inputs(family, batch=1)
    ref = _generate(model, inputs, num_beams=2)
    with vlprune.patch(model, "uniform", budget=BIG):
        assert torch.equal(_generate(model, inputs, num_beams=2), ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_beam_search_keeps_the_budget_in_every_beam(family: str) -> None:
    """generate(num_beams=2, num_return_sequences=2) on a batch of 2: each of the 4 expanded
    rows keeps the budget (images encoded once, layouts repeated per beam)."""
    model, inputs = _model(family), _inputs(family, batch=2)
    with vlprune.patch(model, "uniform", budget=4) as handle:
        out = _generate(model, inputs, num_beams=2, num_return_sequences=2)
        assert out.shape[0] == 4
        assert handle.stats.kept_tokens == [4, 4, 4, 4]


@pytest.mark.parametrize("method", ["random", "fastv"])
@pytest.mark.parametrize("family", FAMILIES)
def test_text_only_prompts_pass_through(family: str, method: str) -> None:
    """Prompts without images are not touched: bit-identical logits and tokens, empty stats."""
    from vlprune.testing import tiny_tokenizer

    model = _model(family)
    inputs = tiny_tokenizer()(["<s> w1 w2 w3", "<s> w5 w6 w7 w8 w9"], return_tensors="pt",
                              padding=True)
    ref_logits, ref_tokens = _forward(model, inputs).logits, _generate(model, inputs)
    with vlprune.patch(model, method, budget=3) as handle:
        assert torch.equal(_forward(model, inputs).logits, ref_logits)
        assert handle.stats.kept_tokens == []
        assert torch.equal(_generate(model, inputs), ref_tokens)
