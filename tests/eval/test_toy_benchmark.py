"""The shipped toy LLaVA and its benchmark: the checkpoint loads offline and reproduces its
recorded accuracy (≥ 90 % held-out, ≥ 85 % on every question kind), keep-all equals the
unpruned model, and at 64 of 576 tokens every attention- or coverage-based method keeps more
accuracy than `random`."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlavaForConditionalGeneration

import vlprune
from vlprune.eval.toy import data
from vlprune.eval.toy.benchmark import predict, run_benchmark
from vlprune.eval.toy.diagnostics import evaluate
from vlprune.eval.toy.model import CHECKPOINT_DIR, load_toy_model, toy_processor

RECORD = json.loads((CHECKPOINT_DIR / "accuracy.json").read_text())
INFORMED = ("fastv", "flowcut", "globalcom2", "hiprune", "hired", "mmtok", "todre", "transprune")
"""The attention- or coverage-based methods (every registered method but the two baselines)."""
N_BEAT, SEEDS = 96, (0, 1, 2, 3, 4)
MARGIN = 0.20
"""Accuracy points a method must beat `random` by at 64 tokens on the first 96 held-out
questions (24 per kind). Measured (shipped checkpoint): unpruned 97.9 %, random
55.8 % (five seeds 50.0–60.4 %, standard deviation 3.8 points, so 1.7 for the five-seed
mean), uniform 70.8 %, the informed methods 93.8–97.9 %. 20 points is over five per-seed
standard deviations and under 55 % of the smallest measured gap (37.9 points)."""


@pytest.fixture(scope="module")
def model() -> LlavaForConditionalGeneration:
    return load_toy_model()


def test_checkpoint_ships_small_and_loads_offline(
    model: LlavaForConditionalGeneration, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The package carries a few-MB safetensors checkpoint with its processor; it loads with
    the hub switched off and has LLaVA-1.5's 576 visual tokens."""
    weights = CHECKPOINT_DIR / "model.safetensors"
    assert weights.stat().st_size < 5 * 2**20
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again = load_toy_model()
    assert isinstance(again, LlavaForConditionalGeneration)
    assert again.config.image_seq_length == 576
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def test_recorded_accuracy_reproduces(model: LlavaForConditionalGeneration) -> None:
    """The recorded held-out accuracy (1000 questions) is ≥ 90 % overall and ≥ 85 % on every
    kind (chance is 50 % for presence and position: no kind collapsed), and the fixed sample's
    accuracy (overall and per kind) reproduces to within one answer (an argmax may flip across
    BLAS builds)."""
    assert RECORD["test_samples"] >= 1000
    assert RECORD["test"]["all"] >= 0.9
    assert all(RECORD["test"][kind] >= 0.85 for kind in data.KINDS), RECORD["test"]
    fixed = RECORD["fixed_sample"]
    n = fixed["n"]
    ours = evaluate(model, "test", n)
    assert ours["all"] == pytest.approx(fixed["all"], abs=1.01 / n)
    for kind in data.KINDS:  # kinds alternate, n / 4 questions each
        assert ours[kind] == pytest.approx(fixed[kind], abs=1.01 / (n // 4)), kind


def test_keep_all_equals_unpruned(model: LlavaForConditionalGeneration) -> None:
    """Every method keeping all 576 tokens answers exactly like the unpruned model."""
    processor = toy_processor()
    samples = data.samples("test", 24)
    base = predict(model, processor, samples)
    for name in vlprune.list_methods():
        with vlprune.patch(model, name, budget=576):
            assert predict(model, processor, samples) == base, name


def test_informed_methods_beat_random_at_64_tokens(model: LlavaForConditionalGeneration) -> None:
    """At 64 of 576 tokens each attention- or coverage-based method keeps more accuracy than
    `random` averaged over five seeds, by at least ``MARGIN``; pruning costs accuracy (random
    is well below the unpruned model) and cuts the LLM's input to 64 visual tokens."""
    rows = run_benchmark(model, n_samples=N_BEAT, budgets=(64,), seeds=SEEDS, repeats=1,
                         methods=("random", *INFORMED))
    by_name = {r.method: r for r in rows}
    random = by_name["random"]
    assert random.accuracy < by_name["none"].accuracy - 0.1
    for name in INFORMED:
        row = by_name[name]
        assert row.error is None, row.error
        assert row.tokens == 64, name
        assert row.accuracy >= random.accuracy + MARGIN, (name, row.accuracy, random.accuracy)
