"""A patched model through a user's whole workflow: compile, threads, copies, saving, losses,
finding and removing the patch. Every path gives the right answer or a clear error.
"""

from __future__ import annotations

import copy
import io
import pickle
import threading

import pytest
import torch

import vlprune
from tests.helpers import (
    BIG,
    cached_inputs,
    cached_model,
    forward,
    generate,
    keep_index,
    method_families,
    method_one_family,
    pair_options,
    vlprune_hook_count,
)
from vlprune.adapters import get_adapter
from vlprune.testing import FAMILIES, tiny_model

RATIO = 0.25
INDICES = [0, 5, 11, 17, 23]


# -------------------------------------------------------------------------------- compile


def test_patching_a_compiled_model_is_refused() -> None:
    """``model.compile()`` (run or not) then ``patch``: a RuntimeError saying to patch first;
    a ``torch.compile`` wrapper likewise. Compiled code would silently skip the hooks."""
    model = tiny_model("llava")
    model.compile(backend="eager")
    with pytest.raises(RuntimeError, match="Patch first, then compile"):
        vlprune.patch(model, "random", budget=4)
    assert vlprune_hook_count(model) == 0
    with pytest.raises(RuntimeError, match="patch the model first"):
        vlprune.patch(torch.compile(tiny_model("llava"), backend="eager"), "random", budget=4)


@pytest.mark.slow
def test_patch_then_compile_prunes_and_unpatches() -> None:
    """``patch`` then ``model.compile()``: the compiled model prunes exactly as the eager
    patched one (hooks run eagerly), and unpatching restores the unpruned logits."""
    torch._dynamo.reset()  # no compiled code of this class from earlier tests
    model, inputs = tiny_model("llava"), cached_inputs("llava", batch=2)
    unpatched = forward(model, inputs).logits
    handle = vlprune.patch(model, "hiprune", ratio=RATIO)
    eager = forward(model, inputs).logits
    model.compile(backend="eager")
    try:
        compiled = forward(model, inputs).logits
        assert handle.stats.kept_tokens == [9, 9]
    finally:
        handle.unpatch()
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=0)
    torch.testing.assert_close(forward(model, inputs).logits, unpatched, atol=1e-5, rtol=0)


# -------------------------------------------------------------------------------- threads


@pytest.mark.parametrize(("method", "family"), method_one_family())
def test_two_threads_equal_serial_runs(method: str, family: str) -> None:
    """Two threads × 15 ``generate`` calls on one patched model (different prompts per
    thread) give exactly the serial results: every per-call state is per thread or per cache."""
    model = cached_model(family)
    prompts = [cached_inputs(family, batch=1, n_words=(5,), seed=0),
               cached_inputs(family, batch=2, n_words=(7, 3), seed=1)]
    calls = 15
    with vlprune.patch(model, method, ratio=RATIO, **pair_options(method, family)):
        serial = [generate(model, p, max_new_tokens=3) for p in prompts]
        results: list[list[torch.Tensor]] = [[], []]
        errors: list[BaseException] = []
        start = threading.Barrier(2)

        def work(i: int) -> None:
            try:
                start.wait()
                results[i] = [generate(model, prompts[i], max_new_tokens=3) for _ in range(calls)]
            except BaseException as error:
                errors.append(error)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not errors, errors
    for i in range(2):
        assert len(results[i]) == calls
        assert all(torch.equal(out, serial[i]) for out in results[i])


# ------------------------------------------------------------------------- copies, saving


@pytest.mark.parametrize(("method", "family"), method_one_family())
def test_deep_copy_is_patched_with_its_own_handle(method: str, family: str) -> None:
    """``copy.deepcopy`` of a patched model: the copy prunes like the original, with its own
    handle and its own vision tower; unpatching either leaves the other patched; a second patch
    of the copy is refused; with both unpatched, both equal the unpatched model."""
    model, inputs = tiny_model(family), cached_inputs(family, batch=2)
    unpatched = forward(model, inputs).logits
    handle = vlprune.patch(model, method, ratio=RATIO, **pair_options(method, family))
    pruned = forward(model, inputs).logits
    twin = copy.deepcopy(model)
    twin_handle = vlprune.get_handle(twin)
    assert twin_handle is not None and twin_handle is not handle and twin_handle.model is twin
    assert vlprune.get_handle(model) is handle
    torch.testing.assert_close(forward(twin, inputs).logits, pruned, atol=1e-6, rtol=0)
    with pytest.raises(vlprune.AlreadyPatchedError):
        vlprune.patch(twin, "random", budget=3)
    with torch.no_grad():  # the copy's encoder is its own: change it, only the copy changes
        next(get_adapter(twin).vision_layers[0].parameters()).mul_(3.0)
    changed = forward(twin, inputs).logits
    assert changed.shape != pruned.shape or not torch.allclose(changed, pruned)
    torch.testing.assert_close(forward(model, inputs).logits, pruned, atol=1e-6, rtol=0)
    handle.unpatch()
    assert vlprune.get_handle(twin) is twin_handle
    torch.testing.assert_close(forward(twin, inputs).logits, changed, atol=1e-6, rtol=0)
    twin_handle.unpatch()
    assert vlprune_hook_count(twin) == 0 and "get_image_features" not in vars(twin.model)
    assert torch.equal(forward(model, inputs).logits, unpatched)


@pytest.mark.parametrize("save", ["pickle", "torch.save"])
def test_saving_a_patched_model_names_the_patch(save: str) -> None:
    """Pickling / ``torch.save`` of a patched model raises a TypeError saying to unpatch (or
    save the state dict); after unpatching it saves."""
    model = tiny_model("llava")
    dump = pickle.dumps if save == "pickle" else (lambda m: torch.save(m, io.BytesIO()))
    with vlprune.patch(model, "random", budget=4), pytest.raises(
        TypeError, match=r"vlprune\.unpatch\(model\)"
    ):
        dump(model)
    dump(model)


# ---------------------------------------------------------------------------------- loss


def _next_token_loss(logits: torch.Tensor, labels: torch.Tensor,
                     positions: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each row at ``positions`` predicting the token after it."""
    target = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), -100)], 1)
    return torch.nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), target.gather(1, positions).flatten(), ignore_index=-100
    )


def _labels(inputs, image_token_id: int) -> torch.Tensor:
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == image_token_id, -100)
    return labels.masked_fill(inputs["attention_mask"] == 0, -100)


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_over_kept_rows(family: str) -> None:
    """``model(**inputs, labels=...)`` of a pruned prefill: each kept row predicts the next token
    of the original sequence (hand-computed from the logits); keeping everything gives exactly
    transformers' loss; a decoder cut (``fixed_layer``) likewise."""
    model, inputs = cached_model(family), cached_inputs(family, batch=2)
    labels = _labels(inputs, model.config.image_token_id)
    reference = forward(model, inputs, labels=labels).loss
    with vlprune.patch(model, "uniform", budget=BIG):
        torch.testing.assert_close(forward(model, inputs, labels=labels).loss, reference,
                                   atol=1e-6, rtol=0)
    positions = keep_index(inputs["input_ids"], model.config.image_token_id, INDICES)
    with vlprune.patch(model, "fixed", budget=BIG, indices=INDICES):
        out = forward(model, inputs, labels=labels)
    torch.testing.assert_close(out.loss, _next_token_loss(out.logits, labels, positions),
                               atol=1e-5, rtol=0)
    with vlprune.patch(model, "fixed_layer", budget=BIG, indices=[0, 3], layer=2):
        out = forward(model, inputs, labels=labels)
    ordinal = (inputs["input_ids"] == model.config.image_token_id).long().cumsum(1) - 1
    is_image = inputs["input_ids"] == model.config.image_token_id
    keep = ~is_image | torch.isin(ordinal, torch.tensor([0, 3]))
    positions = torch.stack([row.nonzero()[:, 0] for row in keep])
    torch.testing.assert_close(out.loss, _next_token_loss(out.logits, labels, positions),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize(("method", "family"), method_families())
def test_every_method_gives_a_loss(method: str, family: str) -> None:
    """Every method returns a finite loss for ``labels`` (no size mismatch), and keeping every
    token gives transformers' own loss."""
    model, inputs = cached_model(family), cached_inputs(family, batch=2)
    labels = _labels(inputs, model.config.image_token_id)
    with vlprune.patch(model, method, ratio=RATIO, **pair_options(method, family)):
        assert torch.isfinite(forward(model, inputs, labels=labels).loss)


# ----------------------------------------------------------------------- handle, unpatch


def test_dropped_handle_is_found_and_removed() -> None:
    """A dropped handle keeps pruning (the hooks hold it): ``vlprune.get_handle(model)`` gives it
    back and ``vlprune.unpatch(model)`` removes the patch; both are None / False when
    unpatched; the re-patch error names them."""
    model, inputs = cached_model("qwen2_vl"), cached_inputs("qwen2_vl")
    unpatched = forward(model, inputs).logits
    assert vlprune.get_handle(model) is None
    vlprune.patch(model, "random", budget=3)  # handle dropped
    assert forward(model, inputs).logits.shape[1] < unpatched.shape[1]
    handle = vlprune.get_handle(model)
    assert handle is not None and handle.active and handle.stats.kept_tokens == [3]
    with pytest.raises(vlprune.AlreadyPatchedError, match=r"vlprune\.unpatch\(model\)"):
        vlprune.patch(model, "uniform", budget=3)
    assert vlprune.unpatch(model) is True
    assert not handle.active and vlprune.get_handle(model) is None
    assert vlprune.unpatch(model) is False
    assert torch.equal(forward(model, inputs).logits, unpatched)
    assert vlprune_hook_count(model) == 0


def test_handles_of_other_models_are_untouched() -> None:
    """``vlprune.unpatch(a)`` leaves another patched model alone."""
    a, b = cached_model("llava"), cached_model("llava_next")
    with vlprune.patch(b, "random", budget=3) as kept:
        vlprune.patch(a, "random", budget=3)
        assert vlprune.unpatch(a) is True
        assert vlprune.get_handle(b) is kept and kept.active
    assert vlprune.get_handle(a) is None and vlprune.get_handle(b) is None

