"""Flash attention's conventions on CPU (``tests/flash_like.py``): the stand-in equals sdpa on
unpatched models, vision-side methods keep "padded batch == prompts one by one" under it, and
a decoder-side cut in a padded batch fails loudly (it does not follow flash's 2-D mask yet)."""

from __future__ import annotations

import functools

import pytest
import torch

import vlprune
from tests.flash_like import use_flash_like
from vlprune.registry import get_method
from vlprune.testing import FAMILIES, tiny_inputs, tiny_model

N_WORDS = (5, 9, 3)
NEW_TOKENS = 6


@functools.cache
def _model(family: str, flash: bool) -> torch.nn.Module:
    model = tiny_model(family)
    return use_flash_like(model) if flash else model


def _inputs(family: str, batch: int, n_words: tuple[int, ...], seed: int = 0):
    return tiny_inputs(family, batch=batch, n_words=list(n_words), seed=seed)


def _run(model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(last-position logits, greedy new tokens) of a forward and a generate."""
    with torch.no_grad():
        logits = model(**inputs).logits[:, -1]
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                             do_sample=False)
    return logits, out[:, inputs["input_ids"].shape[1]:]


@pytest.mark.parametrize("family", FAMILIES)
def test_flash_like_equals_sdpa_on_a_padded_batch(family: str) -> None:
    """Unpatched: every real position's logits and the greedy tokens equal sdpa's (the
    stand-in is a faithful reference, vision towers included)."""
    inputs = _inputs(family, 3, N_WORDS)
    flash, sdpa = _model(family, True), _model(family, False)
    assert flash.config.text_config._attn_implementation == "flash_like"
    with torch.no_grad():
        got, want = flash(**inputs).logits, sdpa(**inputs).logits
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[valid], want[valid], atol=1e-5, rtol=0)
    assert torch.equal(_run(flash, inputs)[1], _run(sdpa, inputs)[1])


def _vision_methods() -> list[tuple[str, str]]:
    cases = []
    for name in vlprune.list_methods():
        method = get_method(name)
        if method.stage == "vision":
            cases += [(f, name) for f in FAMILIES if method.families is None
                      or f in method.families]
    return cases


@pytest.mark.parametrize(("family", "method"), _vision_methods())
def test_vision_cut_padded_batch_equals_single_runs(family: str, method: str) -> None:
    """Under flash's conventions a vision-side cut in a left-padded batch of 3 equals each
    prompt alone: last logits and greedy tokens."""
    model = _model(family, True)
    batch = _inputs(family, 3, N_WORDS)
    with vlprune.patch(model, method, budget=7):
        logits, tokens = _run(model, batch)
        for i, n in enumerate(N_WORDS):
            single_logits, single_tokens = _run(model, _inputs(family, 1, (n,), seed=i))
            torch.testing.assert_close(logits[i], single_logits[0], atol=1e-4, rtol=0)
            assert torch.equal(tokens[i], single_tokens[0]), f"sample {i}"


@pytest.mark.parametrize("method", ["fastv", "transprune"])
def test_decoder_cut_in_padded_batch_fails_loudly(method: str) -> None:
    """Pins current behaviour, not the goal: after a decoder cut the layers still receive the
    uncut 2-D padding mask, which flash cannot apply to the shorter sequence; the call must
    fail, never return a silently wrong answer."""
    model = _model("llava", True)
    with vlprune.patch(model, method, budget=7), pytest.raises(
            (IndexError, NotImplementedError, RuntimeError, ValueError)):
        _run(model, _inputs("llava", 3, N_WORDS))
