"""Attention implementations other than sdpa / eager, on CPU: stand-ins following the
conventions of flash attention (``tests/flash_like.py``: 2-D padding masks, varlen) and flex
attention (``tests/flex_like.py``: ``BlockMask``), on the vision tower and the language model
alike. Each equals sdpa on unpatched models, and keeps "a padded batch == its prompts one by
one" for every method × family (flex: every decoder-side method × family), prefill and greedy
generate, with the same selection and outputs as under sdpa. Decoder-side cuts hand each layer a
mask of the rows it sees, built by the implementation's own mask builder, whether the rows keep
equal counts or not."""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import vlprune
from tests.flash_like import use_flash_like
from tests.flex_like import use_flex_like
from tests.helpers import attention_output_index, method_families, pair_options
from vlprune.adapters import get_adapter
from vlprune.registry import get_method
from vlprune.testing import (
    DEFAULT_IMAGE_SIZE,
    FAMILIES,
    tiny_image,
    tiny_inputs,
    tiny_model,
    tiny_processor,
    tiny_prompt,
)

N_WORDS = (5, 9, 3)
NEW_TOKENS = 6
RATIO = 0.25
ATOL = 1e-4


FLASH, FLEX = "flash_like", "flex_like"
SWITCH = {FLASH: use_flash_like, FLEX: use_flex_like}


@functools.cache
def _model(family: str, attn: str) -> torch.nn.Module:
    """Own models (not the shared cache of ``tests.helpers``): switching one to a stand-in
    changes its config."""
    model = tiny_model(family)
    return SWITCH[attn](model) if attn in SWITCH else model


def _decoder_side(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(m, f) for m, f in pairs if "decoder" in get_method(m).stage]


PAIRS = [(FLASH, m, f) for m, f in method_families()]
PAIRS += [(FLEX, m, f) for m, f in _decoder_side(method_families())]


@functools.cache
def _inputs(family: str, batch: int, n_words: tuple[int, ...], seed: int = 0):
    return tiny_inputs(family, batch=batch, n_words=list(n_words), seed=seed)


def _run(model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(last-position logits, greedy new tokens) of a forward and a generate."""
    with torch.no_grad():
        logits = model(**inputs).logits[:, -1]
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                             do_sample=False)
    return logits, out[:, inputs["input_ids"].shape[1]:]


@pytest.mark.parametrize("attn", [FLASH, FLEX])
@pytest.mark.parametrize("family", FAMILIES)
def test_stand_in_equals_sdpa_on_a_padded_batch(family: str, attn: str) -> None:
    """Unpatched: every real position's logits and the greedy tokens equal sdpa's (the
    stand-in is a faithful reference, vision towers included)."""
    inputs = _inputs(family, 3, N_WORDS)
    model, sdpa = _model(family, attn), _model(family, "sdpa")
    for config in (model.config.text_config, model.config.vision_config):
        assert config._attn_implementation == attn
    with torch.no_grad():
        got, want = model(**inputs).logits, sdpa(**inputs).logits
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[valid], want[valid], atol=1e-5, rtol=0)
    assert torch.equal(_run(model, inputs)[1], _run(sdpa, inputs)[1])


def _padded_batch_equals_single_runs(attn: str, method: str, family: str,
                                     options: dict) -> list:
    """A patched left-padded batch of 3 under ``attn`` equals each prompt alone and the same
    patch under sdpa; returns the run's ``layer_tokens``."""
    options = {**pair_options(method, family), **options}
    model, sdpa = _model(family, attn), _model(family, "sdpa")
    batch = _inputs(family, 3, N_WORDS)
    with vlprune.patch(sdpa, method, **options) as handle:
        sdpa_logits, sdpa_tokens = _run(sdpa, batch)
        sdpa_kept = handle.stats.kept_tokens
    with vlprune.patch(model, method, **options) as handle:
        logits, tokens = _run(model, batch)
        stats = handle.stats
        assert stats.kept_tokens == sdpa_kept
        torch.testing.assert_close(logits, sdpa_logits, atol=ATOL, rtol=0)
        assert torch.equal(tokens, sdpa_tokens)
        for i, n in enumerate(N_WORDS):
            single_logits, single_tokens = _run(model, _inputs(family, 1, (n,), seed=i))
            torch.testing.assert_close(logits[i], single_logits[0], atol=ATOL, rtol=0)
            assert torch.equal(tokens[i], single_tokens[0]), f"sample {i}"
    return stats.layer_tokens


def _text_prompt(family: str) -> str:
    return ("<s>" if family.startswith("llava") else "<|im_start|>") + " w5 w6 w7"


def _text_only_row_equals_alone(attn: str, method: str, family: str,
                                options: dict) -> list[int]:
    """A batch of a text-only prompt and an image prompt under ``attn``: each row equals its
    prompt alone; returns the batch's ``kept_tokens``."""
    options = {**pair_options(method, family), **options}
    model = _model(family, attn)
    processor = tiny_processor(family)
    image = tiny_image(1, DEFAULT_IMAGE_SIZE[family])
    mixed = processor(text=[_text_prompt(family), tiny_prompt(family, 9, seed=1)],
                      images=[image], padding=True, return_tensors="pt")
    alone = [processor(text=[_text_prompt(family)], return_tensors="pt"),
             _inputs(family, 1, (9,), seed=1)]
    with vlprune.patch(model, method, **options) as handle:
        logits, tokens = _run(model, mixed)
        kept = handle.stats.kept_tokens
        for i, single in enumerate(alone):
            single_logits, single_tokens = _run(model, single)
            torch.testing.assert_close(logits[i], single_logits[0], atol=ATOL, rtol=0)
            assert torch.equal(tokens[i], single_tokens[0]), f"sample {i}"
    return kept


@pytest.mark.parametrize(("attn", "method", "family"), PAIRS)
def test_padded_batch_equals_single_runs(attn: str, method: str, family: str) -> None:
    """A patched left-padded batch of 3 equals each prompt alone (last logits, greedy tokens),
    and equals the same patch under sdpa (kept counts, logits, tokens): the probes and cuts see
    what they see under sdpa. Every row keeps the same count, so a decoder cut hands flash the
    2-D mask of the rows left (flex: their ``BlockMask``), without padding slots."""
    _padded_batch_equals_single_runs(attn, method, family, {"ratio": RATIO})


@pytest.mark.parametrize(("attn", "method", "family"), PAIRS)
def test_text_only_row_beside_image_row_equals_each_alone(attn: str, method: str,
                                                           family: str) -> None:
    """Rows keeping different counts (a text-only row keeps no visual row): the padding slots
    reach flash as False columns of the 2-D mask (flex: of its ``BlockMask``), in prefill and
    every decode step; each row equals its prompt alone (last logits, greedy tokens)."""
    kept = _text_only_row_equals_alone(attn, method, family, {"ratio": RATIO})
    assert kept[0] == 0 < kept[1]


@pytest.mark.parametrize("attn", [FLASH, FLEX])
@pytest.mark.parametrize("family", FAMILIES)
def test_todre_relevance_stage(family: str, attn: str) -> None:
    """ToDRE's stage 2 with τ = 1 drops every visual row inside the language model: all rows of
    the padded batch drop (equal counts), and beside a text-only row only the image row drops
    (padding slots); both equal their prompts alone."""
    options = {"ratio": RATIO, "tau": 1.0}
    layer_tokens = _padded_batch_equals_single_runs(attn, "todre", family, options)
    assert all(row[-1] < row[0] for row in layer_tokens)
    assert _text_only_row_equals_alone(attn, "todre", family, options) == [0, 0]


@pytest.mark.parametrize("attn", [FLASH, FLEX])
@pytest.mark.parametrize("method", ["fastv", "transprune"])
def test_renumbered_positions(method: str, attn: str) -> None:
    """``positions="renumber"`` (LLaVA) under each stand-in: the padded batch equals its
    prompts alone and the same patch under sdpa."""
    _padded_batch_equals_single_runs(attn, method, "llava",
                                     {"ratio": RATIO, "positions": "renumber"})


@pytest.mark.parametrize("attn", [FLASH, FLEX])
@pytest.mark.parametrize("family", FAMILIES)
def test_text_probe_reads_each_implementations_mask(family: str, attn: str) -> None:
    """A decoder attention probe on a left-padded batch reads the layer's own mask (flash: the
    2-D padding mask; flex: the ``BlockMask``): its rows equal the eager attention weights,
    padded keys at zero."""
    inputs = _inputs(family, 2, N_WORDS[:2])
    length = inputs["input_ids"].shape[1]
    queries = torch.tensor([[length - 1, length - 3], [length - 1, length - 5]])
    probe = get_adapter(_model(family, attn)).text_probe(1)
    handle = probe.install()
    try:
        with torch.no_grad():
            _model(family, attn)(**inputs)
        got = probe.rows(queries)
    finally:
        handle.remove()
    with torch.no_grad():
        eager_model = tiny_model(family, attn_implementation="eager")
        eager = eager_model(**inputs, output_attentions=True)
    rows = torch.arange(2)[:, None]
    want = eager.attentions[attention_output_index(eager_model, 1)][rows, :, queries]
    want = want.transpose(1, 2)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    padded = ~inputs["attention_mask"].bool()
    assert padded.any() and bool((got.sum(2).sum(1)[padded] == 0).all())


def test_implementation_without_mask_builder_refuses_batches() -> None:
    """An attention implementation registered without a mask builder (transformers hands it no
    mask at all): a decoder-side cut on a batch of one prompt equals sdpa's; on a batch of two
    it is a NotImplementedError naming the implementation, before any decoder layer runs."""
    AttentionInterface.register("maskless_sdpa", sdpa_attention_forward)
    model = tiny_model("llava")
    model.config._attn_implementation = "maskless_sdpa"
    single = _inputs("llava", 1, (5,))
    with vlprune.patch(model, "fastv", ratio=RATIO):
        got = _run(model, single)
    with vlprune.patch(_model("llava", "sdpa"), "fastv", ratio=RATIO):
        want = _run(_model("llava", "sdpa"), single)
    torch.testing.assert_close(got[0], want[0], atol=ATOL, rtol=0)
    assert torch.equal(got[1], want[1])
    calls = []
    layer = model.model.language_model.layers[0]
    hook = layer.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        with vlprune.patch(model, "fastv", ratio=RATIO), pytest.raises(
                NotImplementedError, match="'maskless_sdpa' has none registered"):
            _run(model, _inputs("llava", 2, N_WORDS[:2]))
    finally:
        hook.remove()
    assert calls == []
