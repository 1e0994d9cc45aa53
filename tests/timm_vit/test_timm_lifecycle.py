"""A patched timm ViT through a user's whole workflow, as the Hugging Face path
(``tests/test_model_lifecycle.py``): finding and removing the patch, threads, deep copies,
saving, compile in both orders. Every path gives the right answer or the same clear error."""

from __future__ import annotations

import copy
import io
import pickle
import threading

import pytest
import torch

import vlprune
from tests.timm_vit.timm_vits import METHODS

timm = pytest.importorskip("timm")

CONFIG = "cls-reg2"  # class token + registers: every timm method runs on it


def no_patch(model: torch.nn.Module) -> bool:
    """No forward / pre-hook on any module and no instance attribute shadowing a method."""
    hooked = any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    return not hooked and "forward_intermediates" not in vars(model)


def peaked(model: torch.nn.Module) -> torch.nn.Module:
    """Sharper attention (random weights attend almost uniformly, so FlowCut would wait for its
    forced last cut): FlowCut then cuts at several blocks."""
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(6.0)
    return model


def run(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(images)


# ------------------------------------------------------------------------ handle, unpatch


def test_dropped_handle_is_found_and_removed(make_vit, images):
    """A dropped handle keeps pruning (the hooks hold it): ``vlprune.get_handle`` gives it back,
    the re-patch error names ``vlprune.unpatch(model)``, which removes the patch bit-exactly."""
    model = make_vit(CONFIG)
    unpatched = run(model, images)
    assert vlprune.get_handle(model) is None
    vlprune.patch(model, "hiprune", budget=9, cut_block=1)  # handle dropped
    pruned = run(model, images)
    handle = vlprune.get_handle(model)
    assert handle is not None and handle.active and handle.stats.kept_tokens == [9] * 3
    assert not torch.equal(pruned, unpatched)
    with pytest.raises(vlprune.AlreadyPatchedError, match=r"vlprune\.unpatch\(model\)"):
        vlprune.patch(model, "uniform", budget=9)
    assert vlprune.unpatch(model) is True
    assert not handle.active and vlprune.get_handle(model) is None
    assert vlprune.unpatch(model) is False
    assert torch.equal(run(model, images), unpatched) and no_patch(model)


# -------------------------------------------------------------------------------- threads


@pytest.mark.parametrize("method", METHODS)
def test_two_threads_equal_serial_runs(make_vit, images, method):
    """Two threads × 10 forwards on one patched ViT (different images and batch sizes) give the
    serial logits, and each thread's ``kept_indices`` are its own last forward's."""
    model = peaked(make_vit(CONFIG, depth=6))
    inputs = [images[:1], images[1:]]
    calls = 10
    with vlprune.patch(model, method, ratio=0.25, cut_block=-2) as handle:
        serial = []
        for x in inputs:
            serial.append((run(model, x), handle.kept_indices.clone()))
        results: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[], []]
        errors: list[BaseException] = []
        start = threading.Barrier(2)

        def work(i: int) -> None:
            try:
                start.wait()
                for _ in range(calls):
                    results[i].append((run(model, inputs[i]), handle.kept_indices.clone()))
            except BaseException as error:
                errors.append(error)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not errors, errors
    for i, (logits, kept) in enumerate(serial):
        assert len(results[i]) == calls
        assert all(torch.equal(out, logits) and torch.equal(k, kept) for out, k in results[i])


# ------------------------------------------------------------------------- copies, saving


@pytest.mark.parametrize("method", METHODS)
def test_deep_copy_is_patched_with_its_own_handle(make_vit, images, method):
    """``copy.deepcopy`` of a patched ViT: the copy prunes like the original, with its own
    handle and its own blocks; unpatching either leaves the other patched; a second patch of the
    copy is refused; with both unpatched, the original equals the unpatched model."""
    model = peaked(make_vit(CONFIG, depth=6))
    unpatched = run(model, images)
    handle = vlprune.patch(model, method, ratio=0.25, cut_block=-2)
    pruned = run(model, images)
    twin = copy.deepcopy(model)
    twin_handle = vlprune.get_handle(twin)
    assert twin_handle is not None and twin_handle is not handle and twin_handle.model is twin
    assert vlprune.get_handle(model) is handle
    torch.testing.assert_close(run(twin, images), pruned, atol=1e-6, rtol=0)
    assert torch.equal(twin_handle.kept_indices, handle.kept_indices)
    with pytest.raises(vlprune.AlreadyPatchedError):
        vlprune.patch(twin, "random", budget=3)
    with torch.no_grad():  # the copy's blocks are its own: change them, only the copy changes
        twin.blocks[-1].mlp.fc2.weight.mul_(3.0)
    changed = run(twin, images)
    assert not torch.allclose(changed, pruned)
    torch.testing.assert_close(run(model, images), pruned, atol=1e-6, rtol=0)
    handle.unpatch()
    assert vlprune.get_handle(twin) is twin_handle
    torch.testing.assert_close(run(twin, images), changed, atol=1e-6, rtol=0)
    twin_handle.unpatch()
    assert no_patch(twin) and no_patch(model)
    assert torch.equal(run(model, images), unpatched)


@pytest.mark.parametrize("save", ["pickle", "torch.save"])
def test_saving_a_patched_model_names_the_patch(make_vit, save):
    """Pickling / ``torch.save`` of a patched ViT raises the Hugging Face path's TypeError
    (unpatch, or save the state dict); after unpatching it saves."""
    model = make_vit(CONFIG)
    dump = pickle.dumps if save == "pickle" else (lambda m: torch.save(m, io.BytesIO()))
    with vlprune.patch(model, "hiprune", budget=4), pytest.raises(
        TypeError, match=r"vlprune\.unpatch\(model\)"
    ):
        dump(model)
    dump(model)


# -------------------------------------------------------------------------------- compile


def test_patching_a_compiled_model_is_refused(make_vit):
    """``model.compile()`` then ``patch``, or a ``torch.compile`` wrapper: the Hugging Face
    path's RuntimeError, nothing installed (compiled code would silently skip the hooks)."""
    model = make_vit(CONFIG)
    model.compile(backend="eager")
    with pytest.raises(RuntimeError, match="Patch first, then compile"):
        vlprune.patch(model, "hiprune", budget=4)
    assert no_patch(model) and vlprune.get_handle(model) is None
    with pytest.raises(RuntimeError, match="patch the model first"):
        vlprune.patch(torch.compile(make_vit(CONFIG), backend="eager"), "random", budget=4)


@pytest.mark.parametrize("method", ["hiprune", "flowcut"])
def test_patch_then_compile_prunes_and_unpatches(make_vit, images, method):
    """``patch`` then ``model.compile()`` (or a ``torch.compile`` wrapper): the compiled ViT
    prunes exactly as the eager patched one (the hooks run eagerly, probes of later blocks
    included), also through ``forward_intermediates``; unpatching restores the unpruned
    logits."""
    torch._dynamo.reset()  # no compiled code of this class from earlier tests
    model = peaked(make_vit(CONFIG, depth=6))
    unpatched = run(model, images)
    handle = vlprune.patch(model, method, budget=12, cut_block=-2)
    eager = run(model, images)
    kept = handle.kept_indices.clone()
    wrapper = torch.compile(model, backend="eager")
    model.compile(backend="eager")
    try:
        compiled, wrapped = run(model, images), run(wrapper, images)
        assert torch.equal(handle.kept_indices, kept)
        with torch.no_grad():
            tokens = model.forward_intermediates(images, output_fmt="NLC", intermediates_only=True)
        assert tokens[-1].shape[1] == 12
    finally:
        handle.unpatch()
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=0)
    torch.testing.assert_close(wrapped, eager, atol=1e-5, rtol=0)
    torch.testing.assert_close(run(model, images), unpatched, atol=1e-5, rtol=0)
