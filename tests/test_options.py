"""Method options are declared once (``Method.options``) and that declaration validates them.

Pins: every option of every registered method rejects NaN / ±inf / wrong types / values outside
its range with a ``ValueError`` naming it, before any hook or forward; options that do not apply
to a model are checked all the same (``flowcut(llm_layer=99)`` on LLaVA-1.5); NumPy scalars are
accepted wherever the Python type is (budget, ratio, options) and stored as plain Python values;
the declaration is what the signature, ``help()``, ``available_methods()`` and ``vlprune methods``
show.
"""

from __future__ import annotations

import functools
import inspect
import json
import math

import numpy as np
import pytest
import torch

import vlprune
from vlprune.cli import format_methods
from vlprune.options import (
    BoolOption,
    ChoiceOption,
    FloatOption,
    IntOption,
    Option,
)
from vlprune.registry import get_method, list_methods
from vlprune.testing import tiny_inputs, tiny_model

ALL = list_methods(include_internal=True)


@functools.cache
def _model(family: str = "llava") -> torch.nn.Module:
    return tiny_model(family)


def _rejected(method: str, match: str, family: str = "llava", **kwargs: object) -> None:
    """``patch`` raises ``ValueError`` matching ``match`` with no forward and no hook."""
    model = _model(family)
    calls = []
    handles = [m.register_forward_pre_hook(lambda *_: calls.append(1)) for m in model.modules()]
    hooks_before = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    try:
        with pytest.raises(ValueError, match=match):
            vlprune.patch(model, method, **kwargs)
        hooks_after = sum(len(m._forward_pre_hooks) + len(m._forward_hooks)
                          for m in model.modules())
    finally:
        for handle in handles:
            handle.remove()
    assert not calls, "a forward ran before the error"
    assert hooks_after == hooks_before, "hooks were left on the model"


def _bad_values(option: Option) -> list[object]:
    """Values outside ``option``'s allowed ones, by its type."""
    if isinstance(option, FloatOption):
        bad: list[object] = [math.nan, math.inf, -math.inf, "0.5", True, np.float64("nan")]
        if option.low is not None:
            bad.append(option.low - 1)
        if option.high is not None:
            bad.append(option.high + 1)
        return bad
    if isinstance(option, IntOption):
        bad = [1.5, "2", True, np.bool_(True), math.nan]
        if option.minimum is not None:
            bad.append(option.minimum - 1)
        if option.maximum is not None:
            bad += [option.maximum + 1, 2**70]
        return bad
    if isinstance(option, BoolOption):
        return [1, 0, "True", None]
    if isinstance(option, ChoiceOption):
        return ["not-a-choice", None, 1]
    return ["not a sequence", 3.5]


def _cases() -> list[tuple[str, str, object]]:
    return [(method, name, bad) for method in ALL
            for name, option in get_method(method).options.items()
            for bad in _bad_values(option)]


@pytest.mark.parametrize(("method", "option", "value"), _cases(),
                         ids=lambda v: repr(v) if not isinstance(v, str) else v)
def test_every_option_rejects_bad_values_before_compute(method: str, option: str,
                                                        value: object) -> None:
    """Each option of each registered method refuses NaN, ±inf, wrong types and out-of-range
    values with a ``ValueError`` naming it, before any hook or forward."""
    required = {"indices": [0]} if method.startswith("fixed") and option != "indices" else {}
    _rejected(method, f"`{option}`", budget=4, **required, **{option: value})


@pytest.mark.parametrize(("method", "options"), [
    ("mmtok", {"alpha": math.nan}),
    ("mmtok", {"vv_temperature": math.inf}),
    ("globalcom2", {"temperature": math.nan}),
    ("random", {"seed": 2**70}),
    ("todre", {"seed": -(2**63) - 1}),
    ("hiprune", {"alpha": np.float32("nan")}),
])
def test_issue_cases_fail_before_compute(method: str, options: dict) -> None:
    """The reported gaps: NaN temperatures and weights, seeds torch cannot take."""
    _rejected(method, f"`{next(iter(options))}`", budget=4, **options)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_flowcut_llm_layer_is_checked_on_every_family(family: str) -> None:
    """``llm_layer`` beyond the language model is an error even on LLaVA-1.5, where the LLM
    step does not run (its help says it is unused there)."""
    _rejected("flowcut", "llm_layer", family=family, budget=4, llm_layer=99)
    assert "unused on LLaVA-1.5" in get_method("flowcut").options["llm_layer"].help


def test_numpy_scalars_are_accepted_and_stored_as_python_values() -> None:
    """NumPy ints / floats / bools work for budget, ratio and options, keep exactly what the
    Python values keep, and the handle's settings stay JSON-serialisable."""
    model = _model("llava")
    inputs = tiny_inputs("llava", batch=2)

    def kept(**kwargs: object) -> tuple[list[int], str]:
        with vlprune.patch(model, "hiprune", **kwargs) as handle, torch.no_grad():
            logits = model(**inputs).logits
            settings = json.dumps(handle.stats.settings)
        return [logits.shape[1], *handle.stats.kept_tokens], settings

    plain = kept(budget=6, alpha=0.5, wrap_neighbours=True, object_layer=1)
    numpy = kept(budget=np.int64(6), alpha=np.float32(0.5), wrap_neighbours=np.bool_(True),
                 object_layer=np.int16(1))
    assert numpy == plain
    for ratio in (0.25, np.float64(0.25), np.float32(0.25)):
        with vlprune.patch(model, "random", ratio=ratio, seed=np.uint8(3)) as handle:
            assert type(handle.budget.ratio) is float and type(handle.method.seed) is int


@pytest.mark.parametrize("budget", [np.float64(4.0), np.bool_(True), np.int64(0)])
def test_numpy_budget_keeps_the_budget_rules(budget: object) -> None:
    """A NumPy budget must still be an int > 0 (floats and bools refused)."""
    _rejected("random", "`budget`", budget=budget)


@pytest.mark.parametrize("method", ALL)
def test_declaration_is_the_signature_help_and_listing(method: str) -> None:
    """Every default is one of its own allowed values; the class's signature, docstring
    (``help()``), ``available_methods()`` and ``vlprune methods`` list the declared options."""
    cls = get_method(method)
    params = inspect.signature(cls).parameters
    assert list(params) == list(cls.options)
    for name, option in cls.options.items():
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY
        assert name in cls.__doc__ and option.help in cls.__doc__
    if cls.internal:
        return
    row = next(r for r in vlprune.available_methods() if r["name"] == method)
    json.dumps(row)
    assert set(row["options"]) == set(cls.options)
    for described in row["options"].values():
        assert {"default", "type", "allowed", "help"} <= set(described)
    text = format_methods([row])
    assert all(f"  {name} = " in text for name in cls.options) or "(no options)" in text


def test_defaults_are_what_an_instance_gets() -> None:
    """A method built without options holds every declared default."""
    for method in list_methods():
        cls = get_method(method)
        instance = cls()
        for name, option in cls.options.items():
            assert getattr(instance, name) == option.default, (method, name)
