"""Tests for ``transprune``: TTV on hand-made hidden states, the schedule (official LLaVA-1.5
counts, depth scaling, budget rescaling), IGA and the combined score on planted attention, TTV
history across an earlier cut, the look-ahead attention probe, and the method on tiny models of
every family (counts via ``handle.stats``, padded batches, keep-all)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import vlprune
from tests.helpers import cached_model
from vlprune.adapters import get_adapter
from vlprune.budget import Budget
from vlprune.hooks.signals import NextLayerAttentionProbe, TokenTransitionProbe, transition_terms
from vlprune.methods.base import DecoderBatch
from vlprune.methods.transprune import (
    OFFICIAL_RATIOS,
    TransPrune,
    instruction_attention,
    plan_layers,
    stage_counts,
    transition_variation,
    transprune_score,
)
from vlprune.testing import FAMILIES, tiny_inputs

BIG = 10**6


# ------------------------------------------------------------------------------------ TTV

X = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [3.0, 4.0], [1.0, 1.0]]])
Y = torch.tensor([[[2.0, 0.0], [0.0, -2.0], [4.0, 3.0], [5.0, 5.0]]])


def test_transition_terms_by_hand() -> None:
    """‖y‖/‖x‖ = 2, 1, 1, 5 and cos(x, y) = 1, −1, 24/25, 1 for the four hand-made tokens."""
    ratio, cos = transition_terms(X, Y)
    torch.testing.assert_close(ratio, torch.tensor([[2.0, 1.0, 1.0, 5.0]]))
    torch.testing.assert_close(cos, torch.tensor([[1.0, -1.0, 0.96, 1.0]]))


@pytest.mark.parametrize("absolute", [False, True])
def test_ttv_equals_formula_by_hand(absolute: bool) -> None:
    """TTV_i = m_i · exp(1 − c_i) / Σ_j exp(1 − c_j) over the valid tokens (the 4th is padding:
    TTV 0, not in the sum); ``absolute`` uses 1 − |c| (paper Eq. 2)."""
    ratio, cos = transition_terms(X, Y)
    valid = torch.tensor([[True, True, True, False]])
    direction = [0.0, 0.0 if absolute else 2.0, 0.04]
    total = sum(math.exp(d) for d in direction)
    want = [m * math.exp(d) / total for m, d in zip([2.0, 1.0, 1.0], direction)] + [0.0]
    got = transition_variation(ratio, cos, valid, absolute=absolute)
    torch.testing.assert_close(got, torch.tensor([want]))


class _ToyLayer(nn.Module):
    """``self_attn`` doubles its input (returns a tuple, as HF attention does); ``mlp`` negates."""

    def __init__(self) -> None:
        super().__init__()
        self.self_attn = SimpleNamespace()
        self.mlp = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.self_attn(hidden_states=x)[0]
        return self.mlp(h)


class _Double(nn.Module):
    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, None]:
        return 2 * hidden_states, None


class _Negate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -x


def test_transition_probe_reads_submodule_input_and_output() -> None:
    """The probe pairs each sub-module's input with its output: attention (×2) → ratio 2,
    cos 1; MLP (negation) → ratio 1, cos −1; removing the handle removes both hooks."""
    layer = _ToyLayer()
    layer.self_attn, layer.mlp = _Double(), _Negate()
    probe = TokenTransitionProbe(layer)
    handle = probe.install()
    layer(torch.randn(2, 3, 4))
    torch.testing.assert_close(probe.value["attn"][0], torch.full((2, 3), 2.0))
    torch.testing.assert_close(probe.value["attn"][1], torch.ones(2, 3))
    torch.testing.assert_close(probe.value["mlp"][0], torch.ones(2, 3))
    torch.testing.assert_close(probe.value["mlp"][1], -torch.ones(2, 3))
    handle.remove()
    assert not layer.self_attn._forward_hooks and not layer.mlp._forward_hooks


def test_transition_probes_reduce_prefills_only(monkeypatch) -> None:
    """In ``generate``, the token-transition probes reduce the prefill's calls (attention and
    MLP of every accumulated layer, all prompt rows) and nothing in the decode steps, whose terms
    nothing reads; a fresh prefill on a new cache reduces again."""
    model = cached_model("llava")
    inputs = tiny_inputs("llava")
    seen: list[int] = []
    reduce = TokenTransitionProbe.reduce

    def spy(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seen.append(x.shape[1])
        return reduce(self, x, y)

    monkeypatch.setattr(TokenTransitionProbe, "reduce", spy)
    with vlprune.patch(model, "transprune", budget=4) as handle, torch.no_grad():
        layers = [name for name in handle.probes if name.startswith("ttv")]
        model.generate(**inputs, max_new_tokens=4, do_sample=False)
        first = list(seen)
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert len(first) == 2 * len(layers) > 0
    assert all(rows > 1 for rows in first)
    assert seen == first + first


# ------------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("rule", ["official", "proportional"])
def test_official_schedule_on_llava_depth(rule: str) -> None:
    """32 layers: cuts at the inputs of 0-based layers 7, 9, 12; ratio 0.125 of 576 tokens keeps
    504, 360, 72 (docs/methods/transprune.md#budget-and-stage-counts); LLaVA-NeXT's 2880 keeps
    2520, 1800, 360 (both count rules)."""
    assert plan_layers(None, 32) == {7: 0, 9: 1, 12: 2}
    assert stage_counts(576, Budget(ratio=0.125).kept(576), OFFICIAL_RATIOS, rule) == [
        504, 360, 72]
    assert stage_counts(2880, Budget(ratio=0.125).kept(2880), OFFICIAL_RATIOS, rule) == [
        2520, 1800, 360]


def test_schedule_scales_with_depth_and_budget() -> None:
    """round(l·L/32) per cut, stages on one layer merge (later wins); the budget sets the last
    count; the earlier stages keep the official int(N·r_s) (never below the budget), or, with
    the proportional rule, drop counts in the official 1 : 3 : 7 proportions."""
    assert plan_layers(None, 28) == {6: 0, 8: 1, 11: 2}
    assert plan_layers(None, 4) == {1: 1, 2: 2}
    assert plan_layers((1, 2, 3), 4) == {1: 0, 2: 1, 3: 2}
    with pytest.raises(ValueError, match="layers"):
        plan_layers((1, 4), 4)
    assert stage_counts(576, 64, OFFICIAL_RATIOS) == [504, 360, 64]
    assert stage_counts(576, 400, OFFICIAL_RATIOS) == [504, 400, 400]
    assert stage_counts(577, 73, OFFICIAL_RATIOS) == [504, 360, 73]
    assert stage_counts(576, 64, OFFICIAL_RATIOS, "proportional") == [576 - 73, 576 - 219, 64]
    for rule in ("official", "proportional"):
        assert stage_counts(576, 576, OFFICIAL_RATIOS, rule) == [576, 576, 576]


@pytest.mark.parametrize(("counts", "kept"), [("official", [31, 22, 5]),
                                              ("proportional", [32, 23, 5])])
def test_stats_follow_the_schedule(counts: str, kept: list[int]) -> None:
    """Explicit layers (1, 2, 3) on a 4-layer LLaVA: 36 visual tokens, ratio 0.125 → K = 5;
    official counts int(36·0.875) = 31, int(36·0.625) = 22; proportional 32, 23; the cut
    layers' ``layer_tokens`` drop the rest."""
    model = cached_model("llava")
    inputs = tiny_inputs("llava", batch=2)
    length = inputs["input_ids"].shape[1]
    with vlprune.patch(model, "transprune", ratio=0.125, layers=(1, 2, 3),
                       counts=counts) as handle:
        with torch.no_grad():
            model(**inputs)
        stats = handle.stats
    assert stage_counts(36, 5, OFFICIAL_RATIOS, counts) == kept
    assert stats.kept_tokens == [5, 5]
    assert stats.layer_tokens == [[length] + [length - 36 + k for k in kept]] * 2


# ------------------------------------------------------------------------ IGA and scoring


def test_iga_and_score_on_planted_attention() -> None:
    """Two instruction queries (a third row is not one) average their head-mean rows; both
    terms are normalised over the visual rows only, then mixed by α."""
    attention = torch.tensor([[[0.1, 0.6, 0.3, 0.0], [0.1, 0.2, 0.3, 0.4], [1.0, 0, 0, 0]]])
    queries = torch.tensor([[True, True, False]])
    iga = instruction_attention(attention, queries)
    torch.testing.assert_close(iga, torch.tensor([[0.1, 0.4, 0.3, 0.2]]))
    is_image = torch.tensor([[False, True, True, False]])
    ttv = torch.tensor([[9.0, 1.0, 3.0, 9.0]])
    score = transprune_score(ttv, iga, is_image, alpha=0.5)
    want = [0.0, 0.5 * 0.25 + 0.5 * 0.4 / 0.7, 0.5 * 0.75 + 0.5 * 0.3 / 0.7, 0.0]
    torch.testing.assert_close(score, torch.tensor([want]), atol=1e-6, rtol=0)


def _terms(ratio: list[float]) -> SimpleNamespace:
    """A stand-in transition probe: both sub-modules report ``ratio`` with cos = 1."""
    r = torch.tensor([ratio])
    return SimpleNamespace(value={"attn": (r, torch.ones_like(r)), "mlp": (r, torch.ones_like(r))})


def test_ttv_history_follows_rows_through_an_earlier_cut() -> None:
    """Cut at layer 3 after a cut at layer 2 kept LM rows [0, 1, 3, 4, 5] of 6 (visual: 1-4).
    Layer 1's TTV covers all 6 rows, layer 2's the 5 survivors; with cos = 1 each softmax is
    uniform (1/6, then 1/5) and both sub-modules count: row 1 gets 2·6/6 + 2·5/5 = 4, row 4
    gets 2·12/6 + 2·5/5 = 6, row 3 gets 0. Stage 2 keeps 1 visual row: the best mix of TTV
    (0.4, 0, 0.6) and uniform IGA is row 4 (slot 3); text rows stay."""
    method = TransPrune(layers=(2, 3), ratios=(0.75, 0.25))
    method.cut_layers(4)
    index = torch.tensor([[0, 1, 3, 4, 5]])
    is_image = torch.tensor([[False, True, True, True, False]])
    text_attention = SimpleNamespace(rows=lambda q: torch.full((1, 1, q.shape[1], 5), 0.2))
    probes = {
        "ttv1": _terms([0.0, 6.0, 60.0, 0.0, 12.0, 0.0]),
        "ttv2": _terms([0.0, 5.0, 0.0, 5.0, 0.0]),
        "iga3": text_attention,
    }
    ctx = DecoderBatch(3, torch.zeros(1, 5, 2), is_image, probes, index=index,
                       layer_index={2: index}, valid=torch.ones(1, 5, dtype=torch.bool),
                       input_visual=torch.tensor([4]))
    ttv = method._accumulated_ttv(ctx)
    torch.testing.assert_close(ttv, torch.tensor([[0.0, 4.0, 0.0, 6.0, 0.0]]))
    assert stage_counts(4, 1, method.ratios) == [3, 1]
    assert method.choose(ctx, Budget(tokens=1)).tolist() == [[0, 3, 4]]


# -------------------------------------------------------------------- look-ahead probe


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_next_layer_probe_equals_the_layers_own_attention(family: str) -> None:
    """Without cuts, layer 2's attention recomputed from layer 1's output (its norm, GQA q/k,
    RoPE, mask) equals the rows probed on layer 2 itself, padded batch included."""
    model = cached_model(family)
    adapter = get_adapter(model)
    ahead = NextLayerAttentionProbe(adapter.decoder_layers[1], adapter.decoder_layers[2])
    own = adapter.text_probe(2)
    handles = [ahead.install(), own.install()]
    inputs = tiny_inputs(family, batch=2)
    try:
        with torch.no_grad():
            model(**inputs)
        queries = torch.tensor([[3, 7, inputs["input_ids"].shape[1] - 1]] * 2)
        torch.testing.assert_close(ahead.rows(queries), own.rows(queries), atol=1e-6, rtol=0)
    finally:
        for handle in handles:
            handle.remove()


# ------------------------------------------------------------------------- tiny models


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_models_count_generate_and_keep_all(family: str) -> None:
    """Kept visual tokens after the last cut == the budget; batch-2 greedy generation runs; a
    budget above the visual count equals the unpatched model (logits atol 1e-5, tokens).
    Qwen3.5 (hybrid decoder) refuses the official schedule scaled to 4 layers (cuts at 1, 2:
    not after its first full-attention layer) and runs one stage at layer 2."""
    model = cached_model(family)
    inputs = tiny_inputs(family, batch=2)
    options: dict = {}
    if get_adapter(model).recurrent_layers:
        with pytest.raises(ValueError, match="after layer 1"):
            vlprune.patch(model, "transprune", budget=4)
        options = {"layers": (2,), "ratios": (0.5,)}
    with torch.no_grad():
        ref_logits = model(**inputs).logits
        ref_tokens = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    with vlprune.patch(model, "transprune", budget=4, **options) as handle:
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=5, do_sample=False)
        assert handle.stats.kept_tokens == [4, 4]
    with vlprune.patch(model, "transprune", budget=BIG, **options), torch.no_grad():
        logits = model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    assert torch.equal(tokens, ref_tokens)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_padded_batch_equals_single_runs(family: str, attn: str) -> None:
    """TTV's softmax runs per sample over its own tokens, so a left-padded batch keeps the same
    rows and generates the same tokens as each sample alone."""
    model = cached_model(family, attn)
    batch = tiny_inputs(family, batch=2, n_words=[3, 8], seed=5)
    with vlprune.patch(model, "transprune", ratio=0.25) as handle, torch.no_grad():
        tokens = model.generate(**batch, max_new_tokens=5, do_sample=False)
        tokens = tokens[:, batch["input_ids"].shape[1]:]
        for i, n in enumerate([3, 8]):
            single = tiny_inputs(family, batch=1, n_words=[n], seed=5 + i)
            ref = model.generate(**single, max_new_tokens=5, do_sample=False)
            assert torch.equal(tokens[i:i + 1], ref[:, single["input_ids"].shape[1]:])
        assert handle.stats.kept_tokens == [math.ceil(0.25 * handle.stats.visual_tokens[0])]


def test_options_are_validated() -> None:
    """Bad options raise ``ValueError`` naming the option."""
    for options, name in [
        ({"ratios": (0.5, 0.75, 0.1)}, "ratios"),
        ({"ratios": (0.5, 0.25)}, "ratios"),
        ({"layers": (3, 2), "ratios": (0.5, 0.25)}, "layers"),
        ({"layers": (1, 2)}, "layers"),
        ({"direction": "cos"}, "direction"),
        ({"counts": "floor"}, "counts"),
        ({"alpha": 2}, "alpha"),
    ]:
        with pytest.raises(ValueError, match=name):
            TransPrune(**options)
    with pytest.raises(ValueError, match="layers"):
        vlprune.patch(cached_model("llava"), "transprune", ratio=0.5, layers=(2, 5),
                      ratios=(0.5, 0.2))
