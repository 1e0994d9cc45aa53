"""The transformers-release differences in ``vlprune.compat`` match the installed release."""

from __future__ import annotations

import inspect

import torch
from transformers import Cache, DynamicCache

from vlprune.compat import CACHE_KWARG, call_cache, layer_cache, output_cache
from vlprune.testing import tiny_inputs, tiny_model


def test_cache_keyword_is_the_decoder_layers_own() -> None:
    """Every family's decoder layer and language model take the cache under CACHE_KWARG."""
    for family in ("llava", "qwen2_vl"):
        model = tiny_model(family)
        lm = model.model.language_model
        for module in (lm, lm.layers[0]):
            assert CACHE_KWARG in inspect.signature(module.forward).parameters


def test_cache_round_trip_through_a_model_call() -> None:
    """A cache passed with call_cache comes back from output_cache and is what hooks read."""
    model = tiny_model("llava")
    inputs = tiny_inputs("llava")
    cache = DynamicCache(config=model.config.get_text_config())
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(layer_cache(kwargs)), with_kwargs=True)
    try:
        with torch.no_grad():
            out = model(**inputs, **call_cache(cache), use_cache=True)
    finally:
        hook.remove()
    assert seen == [cache]
    assert output_cache(out) is cache
    assert isinstance(cache, Cache) and cache.get_seq_length() == inputs["input_ids"].shape[1]
