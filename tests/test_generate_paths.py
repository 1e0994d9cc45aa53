"""Every path a user takes through ``generate()`` / ``forward`` gives the right answer or a clear
error, for every method × family.

Oracles: a row of a batch equals its prompt run alone (expanded rows of beam search and
sampling, right-padded rows, a text-only row beside an image row); an uncached generate equals
the cached one; a prompt given as ``inputs_embeds`` equals the same prompt as ``input_ids``; a
follow-up chat turn on turn 1's cache equals the unpatched language model fed turn 1's kept rows
at their original positions, then the new text.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Iterator

import pytest
import torch

import vlprune
from tests.helpers import (
    BIG,
    cached_inputs,
    cached_model,
    capture_lm_kwargs,
    forward,
    generate,
    method_families,
    oracle_generate,
    oracle_inputs,
    pair_options,
    right_padded,
)
from vlprune.compat import CACHE_KWARG, PRECOMPUTED_FEATURES, call_cache, output_cache
from vlprune.testing import (
    DEFAULT_IMAGE_SIZE,
    FAMILIES,
    tiny_image,
    tiny_processor,
    tiny_prompt,
    tiny_tokenizer,
)

PAIRS = method_families()
RATIO = 0.25
ATOL = 1e-4
INDICES = [0, 5, 11, 17, 23]  # ``fixed`` oracle: valid in every family's default image
N_WORDS = (5, 9)  # ``cached_inputs(family, batch=2)`` rows; row i alone: n_words[i], seed i


def _alone(family: str, row: int):
    return cached_inputs(family, 1, (N_WORDS[row],), row)


def _last_logits(model, inputs) -> torch.Tensor:
    return forward(model, inputs).logits[:, -1]


# ---------------------------------------------------------------------- expanded rows


@pytest.mark.parametrize(("method", "family"), PAIRS)
def test_expanded_rows_equal_their_prompt_alone(method: str, family: str) -> None:
    """``num_beams=3`` on a batch of 2 and seeded sampling with ``num_return_sequences=3`` on
    one prompt: every expanded row's first-step logits equal its prompt run alone (each
    prompt's images are encoded once; its selection is repeated, never recomputed on another
    prompt's signals or a raster prefix)."""
    model = cached_model(family)
    with vlprune.patch(model, method, ratio=RATIO, **pair_options(method, family)), torch.no_grad():
        alone = [_last_logits(model, _alone(family, row))[0] for row in range(2)]
        beams = model.generate(**cached_inputs(family, batch=2), num_beams=3, max_new_tokens=1,
                               do_sample=False, output_logits=True,
                               return_dict_in_generate=True).logits[0]
        torch.manual_seed(0)
        samples = model.generate(**_alone(family, 0), do_sample=True, num_return_sequences=3,
                                 max_new_tokens=1, output_logits=True,
                                 return_dict_in_generate=True).logits[0]
    assert beams.shape[0] == 6 and samples.shape[0] == 3
    for row in range(6):
        torch.testing.assert_close(beams[row], alone[row // 3], atol=ATOL, rtol=0)
    for row in range(3):
        torch.testing.assert_close(samples[row], alone[0], atol=ATOL, rtol=0)


# ---------------------------------------------------------------------- padding, mixing


@pytest.mark.parametrize(("method", "family"), PAIRS)
def test_right_padded_rows_equal_their_prompt_alone(method: str, family: str) -> None:
    """``padding_side="right"``: each row's logits at its last real token equal the prompt
    alone (methods ranking by the last prompt token use each row's last real one)."""
    model = cached_model(family)
    inputs = right_padded(cached_inputs(family, batch=2))
    pads = (inputs["attention_mask"] == 0).sum(1).tolist()
    assert max(pads) > 0
    with vlprune.patch(model, method, ratio=RATIO, **pair_options(method, family)):
        logits = forward(model, inputs).logits
        for row in range(2):
            last = logits.shape[1] - 1 - pads[row]  # padding stays at the end of the row
            alone = _last_logits(model, _alone(family, row))[0]
            torch.testing.assert_close(logits[row, last], alone, atol=ATOL, rtol=0)


def _text_prompt(family: str) -> str:
    return ("<s>" if family.startswith("llava") else "<|im_start|>") + " w5 w6 w7"


@pytest.mark.parametrize(("method", "family"), PAIRS)
def test_text_only_row_beside_image_row_equals_each_alone(method: str, family: str) -> None:
    """A batch of a text-only prompt and an image prompt: each row equals its prompt alone,
    in prefill and in decode steps (TransPrune's padding slots no longer mark another row's
    token 0 invalid; the text-only row keeps the batch's whole width, yet the image row's
    padding slots stay masked in decode)."""
    model = cached_model(family)
    processor = tiny_processor(family)
    image = tiny_image(1, DEFAULT_IMAGE_SIZE[family])
    mixed = processor(text=[_text_prompt(family), tiny_prompt(family, 9, seed=1)], images=[image],
                      padding=True, return_tensors="pt")
    text_only = processor(text=[_text_prompt(family)], return_tensors="pt")
    with vlprune.patch(model, method, ratio=RATIO, **pair_options(method, family)):
        logits = _last_logits(model, mixed)
        torch.testing.assert_close(logits[0], _last_logits(model, text_only)[0], atol=ATOL, rtol=0)
        torch.testing.assert_close(logits[1], _last_logits(model, _alone(family, 1))[0],
                                   atol=ATOL, rtol=0)
        steps = _step_logits(model, mixed)
        torch.testing.assert_close(steps[1], _step_logits(model, _alone(family, 1))[0],
                                   atol=ATOL, rtol=0)


def _step_logits(model, inputs, steps: int = 3) -> torch.Tensor:
    """(B, steps, V) logits of greedy ``generate``'s first ``steps`` steps."""
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps,
                             do_sample=False, output_logits=True, return_dict_in_generate=True)
    return torch.stack(out.logits, 1)


# ------------------------------------------------------------------------ use_cache=False


@pytest.mark.parametrize(("method", "family"), PAIRS)
def test_uncached_generate_equals_cached(method: str, family: str) -> None:
    """``generate(use_cache=False)`` re-runs the sequence at every step with the images encoded
    once: it keeps the first step's selection (no probe is needed again, no re-ranking by the
    newest token), so its greedy tokens equal the cached run's."""
    model, inputs = cached_model(family), cached_inputs(family, batch=2)
    with vlprune.patch(model, method, ratio=RATIO, **pair_options(method, family)) as handle:
        cached = generate(model, inputs, max_new_tokens=4)
        kept = handle.stats.kept_tokens
        uncached = generate(model, inputs, max_new_tokens=4, use_cache=False)
        assert handle.stats.kept_tokens == kept
    assert torch.equal(cached, uncached)


def test_a_new_uncached_generate_selects_afresh() -> None:
    """Uncached steps replay their own ``generate`` call's selection only: a second call on the
    first one's sequences with the same ``pixel_values`` object selects for its own prompt, as
    a call with a copy of the pixels does."""
    model, inputs = cached_model("llava"), cached_inputs("llava")
    once = {"max_new_tokens": 1, "do_sample": False, "use_cache": False, "output_logits": True,
            "return_dict_in_generate": True}
    with vlprune.patch(model, "fastv", ratio=RATIO), torch.no_grad():
        first = model.generate(**inputs, max_new_tokens=3, do_sample=False, use_cache=False)
        longer = {**inputs, "input_ids": first, "attention_mask": torch.ones_like(first)}
        got = model.generate(**longer, **once).logits[0]
        copied = {**longer, "pixel_values": inputs["pixel_values"].clone()}
        want = model.generate(**copied, **once).logits[0]
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


# -------------------------------------------------------------------------- inputs_embeds


def _as_embeds(model, inputs, family: str) -> dict:
    """``inputs`` with ``inputs_embeds`` instead of ``input_ids``; Qwen gets the M-RoPE
    position ids transformers computes from ``input_ids`` (it cannot from embeddings)."""
    out = {k: v for k, v in inputs.items() if k != "input_ids"}
    with torch.no_grad():
        out["inputs_embeds"] = model.get_input_embeddings()(inputs["input_ids"])
    if family.startswith("qwen"):
        out["position_ids"] = capture_lm_kwargs(model, inputs)["position_ids"]
    return out


@pytest.mark.parametrize(("method", "family"), PAIRS)
def test_inputs_embeds_prune_like_input_ids(method: str, family: str) -> None:
    """The image positions of ``inputs_embeds`` are the rows equal to the image token's
    embedding (as transformers finds them): the same tokens are kept, the logits are the
    same, and (LLaVA families, where transformers derives equal positions) greedy generation
    from embeddings equals generation from ids."""
    model, inputs = cached_model(family), cached_inputs(family, batch=2)
    embeds = _as_embeds(model, inputs, family)
    with vlprune.patch(model, method, ratio=RATIO, **pair_options(method, family)) as handle:
        ref = forward(model, inputs).logits
        kept = handle.stats.kept_tokens
        got = forward(model, embeds).logits
        assert handle.stats.kept_tokens == kept
        assert kept != handle.stats.visual_tokens
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
        if family.startswith("llava"):
            with torch.no_grad():
                from_embeds = model.generate(**embeds, max_new_tokens=4, do_sample=False)
            assert torch.equal(from_embeds, generate(model, inputs, max_new_tokens=4))


def test_mmtok_stopwords_need_input_ids() -> None:
    """MMTok's stop words are token ids: with ``inputs_embeds`` they are refused, clearly."""
    model, inputs = cached_model("llava"), cached_inputs("llava", batch=2)
    with vlprune.patch(model, "mmtok", ratio=RATIO, stopwords=[[20]]), pytest.raises(
        ValueError, match=r"stopwords.*input_ids"
    ):
        forward(model, _as_embeds(model, inputs, "llava"))


SIGNAL_FREE = {"random", "uniform", "fastv", "transprune"}
"""Methods that need no signal of the vision encoder."""


def _image_inputs(model, inputs) -> dict:
    """The entries of ``inputs`` that ``get_image_features`` takes (pixels, layout inputs)."""
    names = inspect.signature(model.model.get_image_features).parameters
    return {k: v for k, v in inputs.items() if k in names}


@pytest.mark.skipif(not PRECOMPUTED_FEATURES,
                    reason="this transformers release takes no precomputed image features")
@pytest.mark.parametrize(("method", "family"), PAIRS)
def test_precomputed_image_features_prune_or_raise(method: str, family: str) -> None:
    """Image features passed precomputed (``mm_encoder_outputs``, encoded before patching):
    methods without vision-encoder signals prune them exactly as from pixels; the others raise a
    clear RuntimeError before the language model runs, never a selection from stale signals."""
    model, inputs = cached_model(family), cached_inputs(family, batch=2)
    with torch.no_grad():
        features = model.model.get_image_features(**_image_inputs(model, inputs),
                                                  return_dict=True)
    precomputed = {k: v for k, v in inputs.items() if k != "pixel_values"}
    precomputed["mm_encoder_outputs"] = {"image": features}
    with vlprune.patch(model, method, ratio=RATIO, **pair_options(method, family)):
        ref = forward(model, inputs).logits
        if method in SIGNAL_FREE:
            torch.testing.assert_close(forward(model, precomputed).logits, ref, atol=1e-6, rtol=0)
        else:
            with pytest.raises(RuntimeError, match="mm_encoder_outputs"):
                forward(model, precomputed)


@pytest.mark.parametrize("family", FAMILIES)
def test_direct_get_image_features_is_never_pruned(family: str) -> None:
    """FlowCut cuts inside the vision encoder only for a prefill: a direct
    ``model.model.get_image_features(...)`` returns the unpatched features, no zero rows."""
    model, inputs = cached_model(family), cached_inputs(family, batch=2)
    image_inputs = _image_inputs(model, inputs)
    with torch.no_grad():
        ref = torch.cat(model.model.get_image_features(**image_inputs).pooler_output)
        with vlprune.patch(model, "flowcut", budget=4):
            got = torch.cat(model.model.get_image_features(**image_inputs).pooler_output)
            assert bool(got.abs().sum(-1).gt(0).all())
    assert torch.equal(got, ref)


# ---------------------------------------------------------------------- multi-turn chat

FOLLOW_UP = "w11 w12 w13 w14"
STEPS = 3


def _two_turns(model, inputs, follow_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn 1: greedy generate; turn 2: ``generate(turn-1 sequences + follow_up,
    cache=turn-1 cache)``. Returns both turns' new tokens (EOS ignored: fixed lengths)."""
    with torch.no_grad():
        first = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False,
                               return_dict_in_generate=True, eos_token_id=None)
        history = torch.cat([first.sequences, follow_up], 1)
        second = model.generate(input_ids=history, attention_mask=torch.ones_like(history),
                                **call_cache(output_cache(first)), max_new_tokens=STEPS,
                                do_sample=False, eos_token_id=None)
    return first.sequences[:, inputs["input_ids"].shape[1]:], second[:, history.shape[1]:]


def _follow_up_ids() -> torch.Tensor:
    return tiny_tokenizer()([FOLLOW_UP], return_tensors="pt", add_special_tokens=False)[
        "input_ids"]


@pytest.mark.parametrize("family", FAMILIES)
def test_follow_up_turn_equals_oracle(family: str) -> None:
    """A text follow-up on turn 1's pruned cache: ``generate`` feeds only the new tokens (the
    cache reports its unpruned length) and both turns equal the unpatched language model fed
    turn 1's kept rows at their original positions, then the new text."""
    model, inputs = cached_model(family), cached_inputs(family)
    follow_up = _follow_up_ids()
    embeds, pos, mask, extras = oracle_inputs(model, inputs, INDICES)
    ref_first, ref_second = oracle_generate(model, embeds, pos, mask, extras, steps=STEPS,
                                            follow_up=follow_up, follow_steps=STEPS)
    with vlprune.patch(model, "fixed", budget=BIG, indices=INDICES):
        first, second = _two_turns(model, inputs, follow_up)
    assert torch.equal(first, ref_first)
    assert torch.equal(second, ref_second)


@pytest.mark.parametrize("family", FAMILIES)
def test_follow_up_turn_through_every_decoder_layer_cut(family: str) -> None:
    """The decoder cut's per-layer caches continue a multi-token follow-up: ``fixed_layer``
    keeping every visual row runs the gather on every path and equals the unpatched model."""
    model, inputs = cached_model(family), cached_inputs(family)
    follow_up = _follow_up_ids()
    ref = _two_turns(model, inputs, follow_up)
    with vlprune.patch(model, "fixed_layer", budget=BIG, indices=list(range(200)), layer=2):
        got = _two_turns(model, inputs, follow_up)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))


@pytest.mark.parametrize(("method", "family"), PAIRS)
def test_follow_up_generate_feeds_only_new_tokens(method: str, family: str) -> None:
    """Every method: turn 2's first logits through ``generate(history, cache=...)`` equal a
    plain forward of just the new tokens (turn 1's last token + the follow-up) on a copy of
    turn 1's cache; nothing of turn 1 is fed again."""
    model, inputs = cached_model(family), cached_inputs(family)
    follow_up = _follow_up_ids()
    with vlprune.patch(model, method, ratio=RATIO, **pair_options(method, family)), torch.no_grad():
        first = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False,
                               return_dict_in_generate=True, eos_token_id=None)
        saved = copy.deepcopy(output_cache(first))
        history = torch.cat([first.sequences, follow_up], 1)
        second = model.generate(input_ids=history, attention_mask=torch.ones_like(history),
                                **call_cache(output_cache(first)), max_new_tokens=1,
                                do_sample=False, output_logits=True, return_dict_in_generate=True)
        new = torch.cat([first.sequences[:, -1:], follow_up], 1)
        extra = {}
        if family.startswith("qwen"):  # transformers needs explicit M-RoPE positions here
            start = saved.get_seq_length()
            text = torch.arange(start, start + new.shape[1]) + model.model.rope_deltas
            extra["position_ids"] = text.view(1, 1, -1).expand(3, 1, -1)
        manual = model(input_ids=new, attention_mask=torch.ones_like(history), **call_cache(saved),
                       use_cache=True, **extra).logits[:, -1]
    torch.testing.assert_close(second.logits[0], manual, atol=ATOL, rtol=0)


def test_follow_up_with_a_new_image_is_refused() -> None:
    """A follow-up that brings a new image on a pruned cache (its image would not be pruned) is
    refused before any module runs, saying how to go on."""
    model, inputs = cached_model("llava"), cached_inputs("llava")
    with vlprune.patch(model, "random", budget=4), torch.no_grad():
        first = model.generate(**inputs, max_new_tokens=2, do_sample=False,
                               return_dict_in_generate=True)
        history = torch.cat([first.sequences, inputs["input_ids"]], 1)
        refused = pytest.raises(NotImplementedError, match=f"without `{CACHE_KWARG}`")
        with _no_module_runs(model), refused:
            model.generate(input_ids=history, attention_mask=torch.ones_like(history),
                           pixel_values=inputs["pixel_values"], **call_cache(output_cache(first)),
                           max_new_tokens=2)


# --------------------------------------------------------------------------- static cache


@contextlib.contextmanager
def _no_module_runs(model) -> Iterator[None]:
    """Asserts that no submodule of ``model`` runs inside the block."""
    calls = []
    handles = [m.register_forward_pre_hook(lambda *_: calls.append(1)) for m in model.modules()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
    assert calls == [], "a module ran"


@pytest.mark.parametrize(("method", "family"), PAIRS)
def test_static_cache_is_refused_before_compute(method: str, family: str) -> None:
    """``generate(cache_implementation="static")`` raises one NotImplementedError naming the
    static cache before any module runs."""
    model, inputs = cached_model(family), cached_inputs(family)
    with (
        vlprune.patch(model, method, ratio=RATIO, **pair_options(method, family)),
        _no_module_runs(model),
        pytest.raises(NotImplementedError, match="static"),
    ):
        generate(model, inputs, max_new_tokens=2, cache_implementation="static")
