"""Qwen3-VL DeepStack under every cut (``vlprune.hooks.deepstack``).

The contract tests (keep-all, ``fixed`` and ``fixed_layer`` oracles with DeepStack added by
hand, padded batches, generate, unpatch) run on ``qwen3_vl`` / ``qwen3_vl_moe`` through
``FAMILIES``. Here: the gather on hand-checkable tensors, the encoder cut against a hand-run
vision tower (a unit cut inside the ViT has no DeepStack feature from later layers), the
mask / feature agreement every DeepStack call sees for every method, and unpatching.
"""

from __future__ import annotations

import copy
import pickle
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import vlprune
from tests.helpers import BIG, cached_inputs, cached_model, capture_lm_kwargs, forward, generate
from vlprune import registry
from vlprune.budget import Budget
from vlprune.hooks.deepstack import gather_deepstack
from vlprune.methods.base import EncoderBatch, Method, VisionBatch
from vlprune.methods.flowcut import FlowCut
from vlprune.testing import tiny_model

UNITS = [0, 3, 7, 14, 20, 23]
QWEN3 = ("qwen3_vl", "qwen3_vl_moe")


class KeepUnits(Method):
    """Test-only: after encoder layer ``layer`` keep the units whose raster id is in ``units``;
    the vision-side cut then keeps exactly their tokens (FlowCut's rule)."""

    stage = "vision"
    internal = True

    def __init__(self, *, units: Sequence[int] = (), layer: int = 0) -> None:
        self.units = list(units)
        self.layer = layer

    def encoder_layers(self, output_layer: int) -> list[int]:
        return [self.layer]

    def encoder_choose(self, batch: EncoderBatch, budget: Budget) -> list[torch.Tensor]:
        return [torch.isin(ids, torch.tensor(self.units)).nonzero()[:, 0] for ids in batch.units]

    def select(self, batch: VisionBatch) -> list[torch.Tensor]:
        return FlowCut.select(self, batch)


@pytest.fixture(autouse=True)
def keep_units_method(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(KeepUnits, "name", "keep_units")
    monkeypatch.setitem(registry._METHODS, "keep_units", KeepUnits)


def test_gather_keeps_the_features_of_kept_visual_positions() -> None:
    """Mask rows [v . v v] and [. v . .] hold features 0..2 and 3 in row-major order; keeping
    positions (0, 3) and (1, 2) (a padding slot on row 1) keeps features 0 and 2, and 3."""
    mask = torch.tensor([[True, False, True, True], [False, True, False, False]])
    feats = torch.arange(4.0)[:, None].expand(4, 2)
    index = torch.tensor([[0, 3], [0, 1]])
    alive = torch.tensor([[True, True], [False, True]])
    new_mask, (kept,) = gather_deepstack(mask, [feats], index, alive)
    assert new_mask.tolist() == [[True, True], [False, True]]
    assert kept[:, 0].tolist() == [0.0, 2.0, 3.0]


def _hand_run(model, inputs, units: list[int], layer: int):
    """The Qwen3-VL vision blocks run by hand, keeping the merge groups ``units`` after block
    ``layer``: (main merger output, one DeepStack merger output per DeepStack layer), over the
    kept units. The input of block 0 (patch + interpolated position embedding, 2-D RoPE) is
    read from an unpatched forward."""
    visual = model.model.visual
    start: dict = {}
    handle = visual.blocks[0].register_forward_pre_hook(
        lambda module, args, kwargs: start.update(hidden=args[0], **kwargs), with_kwargs=True)
    try:
        capture_lm_kwargs(model, inputs)
    finally:
        handle.remove()
    hidden, (cos, sin) = start["hidden"], start["position_embeddings"]
    rows = torch.tensor([4 * u + r for u in units for r in range(4)])
    bounds = start["cu_seqlens"]
    deepstack = []
    with torch.no_grad():
        for i, block in enumerate(visual.blocks):
            hidden = block(hidden, cu_seqlens=bounds, position_embeddings=(cos, sin))
            if i == layer:
                hidden, cos, sin = hidden[rows], cos[rows], sin[rows]
                bounds = torch.tensor([0, rows.numel()], dtype=bounds.dtype)
            if i in visual.deepstack_visual_indexes:
                merger = visual.deepstack_merger_list[visual.deepstack_visual_indexes.index(i)]
                merged = merger(hidden)  # one row per merge group
                deepstack.append(merged[units] if i < layer else merged)
        return visual.merger(hidden), deepstack


@pytest.mark.parametrize("layer", [0, 1])
def test_encoder_cut_equals_hand_run_tower_with_deepstack(layer: int) -> None:
    """A FlowCut-style cut inside the ViT after block ``layer``: the language model receives
    the kept units' main features and, for every DeepStack layer, the features of the kept
    units (computed on the rows alive at that layer), aligned with ``visual_pos_masks``."""
    model, inputs = cached_model("qwen3_vl"), cached_inputs("qwen3_vl")
    main, deepstack = _hand_run(model, inputs, UNITS, layer)
    with vlprune.patch(model, "keep_units", budget=BIG, units=UNITS, layer=layer):
        kw = capture_lm_kwargs(model, inputs)
    mask = kw["visual_pos_masks"]
    assert int(mask.sum()) == len(UNITS)
    torch.testing.assert_close(kw["inputs_embeds"][mask], main, atol=1e-5, rtol=0)
    assert len(kw["deepstack_visual_embeds"]) == len(deepstack) == 3
    for ours, expected in zip(kw["deepstack_visual_embeds"], deepstack):
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def _deepstack_calls(model) -> tuple[list, object]:
    """Record (hidden rows, mask, features) of every ``_deepstack_process`` call."""
    calls = []
    lm = model.model.language_model
    cls_method = type(lm)._deepstack_process

    def spy(self, hidden, mask, feats):
        calls.append((hidden.shape[:2], mask.clone(), feats.shape[0]))
        return cls_method(self, hidden, mask, feats)

    return calls, spy


@pytest.mark.parametrize("family", QWEN3)
@pytest.mark.parametrize("method", [m for m in vlprune.list_methods()
                                    if m not in ("hired", "globalcom2")])
def test_every_method_keeps_deepstack_aligned(family: str, method: str, monkeypatch) -> None:
    """In a padded batch of 2, every DeepStack addition sees a mask of the hidden states'
    shape whose visual rows match its feature rows, and the additions after the last cut
    cover exactly the visual tokens that reach the language model."""
    model = cached_model(family)
    inputs = cached_inputs(family, batch=2)
    calls, spy = _deepstack_calls(model)
    monkeypatch.setattr(type(model.model.language_model), "_deepstack_process", spy)
    with vlprune.patch(model, method, budget=5) as handle, torch.no_grad():
        model(**inputs)
        stats = handle.stats
    assert len(calls) == 3
    for shape, mask, rows in calls:  # hidden rows, mask, feature rows
        assert tuple(mask.shape) == tuple(shape) and int(mask.sum()) == rows
    final = [row[-1] for row in stats.layer_tokens]
    for i, (_, mask, _) in enumerate(calls):
        if [row[i] for row in stats.layer_tokens] == final:  # no cut after layer i
            assert int(mask.sum()) == sum(stats.kept_tokens)


def test_unpatch_restores_the_deepstack_method() -> None:
    """A decoder cut shadows ``_deepstack_process`` on the instance only; unpatch removes it."""
    model = cached_model("qwen3_vl")
    lm = model.model.language_model
    with vlprune.patch(model, "fastv", budget=4):
        assert "_deepstack_process" in vars(lm)
        assert "_deepstack_process" not in vars(cached_model("qwen3_vl_moe").model.language_model)
    assert "_deepstack_process" not in vars(lm)


def test_deep_copy_has_its_own_deepstack_shadow() -> None:
    """``copy.deepcopy`` of a Qwen3-VL model under a decoder cut before its last DeepStack
    layer (FastV, K = 2): the copy's ``_deepstack_process`` shadow is its own (bound to the
    copy's text model), prunes like the original, outlives the original's unpatch and goes
    with its own; pickling the patched copy names the patch."""
    model, inputs = tiny_model("qwen3_vl"), cached_inputs("qwen3_vl", batch=2)
    unpatched = forward(model, inputs).logits
    handle = vlprune.patch(model, "fastv", budget=4)
    pruned = forward(model, inputs).logits
    twin = copy.deepcopy(model)
    lm, twin_lm = model.model.language_model, twin.model.language_model
    shadow = vars(twin_lm)["_deepstack_process"]
    assert shadow is not vars(lm)["_deepstack_process"]
    assert shadow.obj is twin_lm and shadow.original.__self__ is twin_lm
    torch.testing.assert_close(forward(twin, inputs).logits, pruned, atol=1e-6, rtol=0)
    handle.unpatch()
    assert "_deepstack_process" not in vars(lm) and "_deepstack_process" in vars(twin_lm)
    torch.testing.assert_close(forward(twin, inputs).logits, pruned, atol=1e-6, rtol=0)
    with pytest.raises(TypeError, match=r"vlprune\.unpatch\(model\)"):
        pickle.dumps(twin)
    vlprune.unpatch(twin)
    assert "_deepstack_process" not in vars(twin_lm)
    assert torch.equal(forward(twin, inputs).logits, unpatched)


def test_two_threads_under_a_deepstack_decoder_cut_equal_serial_runs() -> None:
    """The shadow reads the running prefill's rows per thread: two threads × 10 ``generate``
    calls under FastV (K = 2, before the last DeepStack layer) give the serial results."""
    model = cached_model("qwen3_vl")
    prompts = [cached_inputs("qwen3_vl", batch=1, n_words=(5,), seed=0),
               cached_inputs("qwen3_vl", batch=2, n_words=(7, 3), seed=1)]
    start = threading.Barrier(2)

    def work(prompt) -> list[torch.Tensor]:
        start.wait()
        return [generate(model, prompt, max_new_tokens=3) for _ in range(10)]

    with vlprune.patch(model, "fastv", budget=4):
        serial = [generate(model, p, max_new_tokens=3) for p in prompts]
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(work, prompts))
    for want, got in zip(serial, results):
        assert all(torch.equal(out, want) for out in got)
