"""``vlprune.patch`` validates everything before installing a hook or running any compute.

Every bad call raises a clear error, leaves the model without vlprune hooks (and without the
``get_image_features`` shadow), never runs a forward, and leaves the model patchable.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import vlprune
from tests.helpers import all_hooks, cached_model
from vlprune.registry import list_methods
from vlprune.testing import FAMILIES, tiny_inputs, tiny_model


class _ForwardCounter:
    """Counts forward calls of every submodule of a model through our own pre-hooks."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls = 0
        self.handles = [m.register_forward_pre_hook(self._count) for m in model.modules()]

    def _count(self, *_: object) -> None:
        self.calls += 1

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _assert_rejected(model, exc: type[Exception], match: str | None, method: str, **kwargs):
    """``patch(model, method, **kwargs)`` raises ``exc`` with no hook, no forward, no shadow."""
    before = all_hooks(model)
    base = getattr(model, "model", None)
    shadowed = base is not None and "get_image_features" in base.__dict__
    counter = _ForwardCounter(model)
    try:
        with_counter = all_hooks(model)
        with pytest.raises(exc, match=match) as info:
            vlprune.patch(model, method, **kwargs)
        assert counter.calls == 0, "a forward ran before the error"
        assert all_hooks(model) == with_counter, "hooks were installed before the error"
    finally:
        counter.remove()
    assert all_hooks(model) == before
    if base is not None:
        assert ("get_image_features" in base.__dict__) == shadowed
    return info


def _assert_still_patchable(model) -> None:
    with vlprune.patch(model, "random", budget=2):
        pass


@pytest.mark.parametrize("budget", [0, -1, -100])
def test_budget_not_positive(budget: int) -> None:
    """``budget`` <= 0 is a ValueError raised before any hook or forward."""
    model = cached_model("llava")
    _assert_rejected(model, ValueError, "budget", "random", budget=budget)
    _assert_still_patchable(model)


@pytest.mark.parametrize("budget", [2.5, 3.0, "4", True, [4]])
def test_budget_not_int(budget: object) -> None:
    """A non-int ``budget`` (float, str, bool, list) is a ValueError before any compute."""
    _assert_rejected(cached_model("llava"), ValueError, "budget", "random", budget=budget)


@pytest.mark.parametrize("ratio", [0, 0.0, 1.5, -0.1, 1.0000001, float("nan"), "0.5", True])
def test_ratio_outside_unit_interval(ratio: object) -> None:
    """``ratio`` outside (0, 1] (or not a number) is a ValueError before any compute."""
    _assert_rejected(cached_model("qwen2_vl"), ValueError, "ratio", "random", ratio=ratio)


def test_ratio_one_is_accepted() -> None:
    """The closed end of (0, 1] is valid."""
    with vlprune.patch(cached_model("qwen2_vl"), "random", ratio=1) as handle:
        assert handle.active


@pytest.mark.parametrize("kwargs", [{}, {"budget": 4, "ratio": 0.5}])
def test_exactly_one_of_budget_and_ratio(kwargs: dict) -> None:
    """Neither or both of ``budget`` / ``ratio`` is a ValueError before any compute."""
    _assert_rejected(cached_model("llava"), ValueError, "exactly one", "random", **kwargs)


@pytest.mark.parametrize("method", ["nope", "FastV", "", None])
def test_unknown_method_lists_available(method: object) -> None:
    """An unknown method name is a ValueError whose message lists exactly the public methods
    (not the internal test helpers ``fixed`` / ``fixed_layer``)."""
    info = _assert_rejected(cached_model("llava"), ValueError, "unknown `method`", method, budget=4)
    listed = {n.strip() for n in str(info.value).split("available:")[-1].split(",")}
    assert listed == set(list_methods())
    assert {"random", "fastv"} <= listed and not {"fixed", "fixed_layer"} & listed


def test_unknown_option_names_it_and_the_allowed_ones() -> None:
    """An unknown method option is a ValueError naming it and the method's allowed options."""
    info = _assert_rejected(
        cached_model("llava"), ValueError, "unknown option", "random", budget=4, sede=1
    )
    assert "'sede'" in str(info.value)
    assert "seed" in str(info.value).split("allowed:")[-1]
    info = _assert_rejected(cached_model("llava"), ValueError, "layer", "uniform", budget=4,
                            layer=2)
    assert "(none)" in str(info.value)


@pytest.mark.parametrize("family", FAMILIES)
def test_fastv_layer_zero(family: str) -> None:
    """``fastv`` with ``layer=0`` (no earlier layer to rank with) fails before any compute."""
    _assert_rejected(cached_model(family), ValueError, "layer", "fastv", budget=4, layer=0)


@pytest.mark.parametrize("layer", [4, 10, -1, 0])
def test_decoder_layer_out_of_range(layer: int) -> None:
    """A decoder cut outside 1..n_layers-1 (the tiny models have 4) fails before compute."""
    model = cached_model("llava")
    _assert_rejected(model, ValueError, "layer", "fixed_layer", budget=4, indices=[0], layer=layer)
    if layer != 10:  # fastv layer 10: see test_fastv_layer_past_the_end
        _assert_rejected(model, ValueError, "layer", "fastv", budget=4, layer=layer)
    _assert_still_patchable(model)


def test_fastv_layer_past_the_end() -> None:
    """``fastv`` with ``layer`` far past the last decoder layer is a ValueError (as layer=4)."""
    _assert_rejected(cached_model("llava"), ValueError, "layer", "fastv", budget=4, layer=10)


@pytest.mark.parametrize(("method", "options"), [
    ("random", {"seed": 1.5}),
    ("fixed", {"indices": []}),
    ("fixed_layer", {"indices": []}),
    ("fastv", {"layer": "2"}),
])
def test_bad_option_values(method: str, options: dict) -> None:
    """Bad option values are ValueErrors raised before any compute."""
    _assert_rejected(cached_model("llava_next"), ValueError, None, method, budget=4, **options)


def test_unsupported_model_names_supported_classes() -> None:
    """A text-only model is a TypeError naming the supported classes, before any compute."""
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    model = LlamaForCausalLM(config).eval()
    info = _assert_rejected(model, TypeError, "LlamaForCausalLM", "random", budget=4)
    for name in ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration",
                 "Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration"):
        assert name in str(info.value)


def test_already_patched_is_rejected_without_side_effects() -> None:
    """Patching a patched model raises AlreadyPatchedError and leaves the first patch working."""
    model = cached_model("qwen2_5_vl")
    inputs = tiny_inputs("qwen2_5_vl")
    with vlprune.patch(model, "random", budget=3) as handle:
        _assert_rejected(model, vlprune.AlreadyPatchedError, "already patched", "uniform",
                         budget=5)
        with torch.no_grad():
            model(**inputs)
        assert handle.stats.kept_tokens == [3]


def test_failed_patch_leaves_forward_unchanged() -> None:
    """After a rejected patch the model computes exactly what it computed before."""
    model = cached_model("llava")
    inputs = tiny_inputs("llava")
    with torch.no_grad():
        before = model(**inputs).logits
    with pytest.raises(ValueError):
        vlprune.patch(model, "fastv", budget=4, layer=0)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)


def test_failed_install_leaves_no_hooks() -> None:
    """A patch that fails while installing (fixed_layer, layer=2.0) leaves no hook behind."""
    model = tiny_model("llava")  # fresh: the bug leaves hooks on it
    before = all_hooks(model)
    with pytest.raises((TypeError, ValueError)):
        vlprune.patch(model, "fixed_layer", budget=4, indices=[0], layer=2.0)
    assert all_hooks(model) == before
    assert "get_image_features" not in model.model.__dict__


def test_fixed_layer_non_int_layer_is_a_value_error() -> None:
    """fixed_layer with a non-int ``layer`` is a ValueError raised before any compute."""
    _assert_rejected(tiny_model("llava"), ValueError, "layer", "fixed_layer", budget=4,
                     indices=[0], layer="2")


def test_fixed_negative_index_is_rejected_at_patch_time() -> None:
    """``fixed`` with a negative token index is a ValueError before any compute."""
    _assert_rejected(tiny_model("llava"), ValueError, "indices", "fixed", budget=4,
                     indices=[-1, 3])



@pytest.mark.parametrize("family", FAMILIES)
def test_layouts_that_miss_the_prompt_are_refused(family: str) -> None:
    """Layouts that do not hold the prompt's placeholders (or, for AnyRes images, the encoder's
    crop sequences) raise a ``ValueError`` naming the count it got."""
    from vlprune.adapters import get_adapter

    adapter = get_adapter(cached_model(family))
    inputs = tiny_inputs(family)
    n_tokens = int((inputs["input_ids"] == adapter.image_token_id).sum())
    assert sum(lay.num_tokens for lay in adapter.image_layouts(inputs, n_tokens)) == n_tokens
    with pytest.raises(ValueError, match=f"\\b{n_tokens + 1}\\b"):
        adapter.image_layouts(inputs, n_tokens + 1)
    if family in ("llava_next", "llava_onevision"):
        with pytest.raises(ValueError, match="crops but the vision encoder saw 999"):
            adapter.encoder_layouts(inputs, 999)
