"""``run_profile`` options the GPU suite relies on: a prebuilt model, a deadline and the number
of timed ``generate`` calls."""

from __future__ import annotations

import time

import pytest

from vlprune.eval.profiler import runs
from vlprune.eval.profiler.presets import ProfileModel
from vlprune.eval.profiler.runner import run_profile
from vlprune.eval.profiler.target import ProfileSettings
from vlprune.testing import DEFAULT_IMAGE_SIZE, tiny_model


@pytest.fixture(scope="module")
def prebuilt() -> ProfileModel:
    """The tiny LLaVA wrapped as a profiler model."""
    model = tiny_model("llava")
    return ProfileModel("tiny-llava", "llava", model.config, model, DEFAULT_IMAGE_SIZE["llava"])


def _settings(**overrides: object) -> ProfileSettings:
    base = {"model": "tiny-llava", "methods": ["random"], "budgets": [16], "repeats": 2,
            "warmup": 0, "new_tokens": 2, "text_tokens": 8, "count": False, "progress": False,
            "threads": 1}
    return ProfileSettings(**{**base, **overrides})


def test_prebuilt_model_runs_as_given(prebuilt: ProfileModel) -> None:
    """A model passed in is profiled as it is (no loading by name) and stays unpatched."""
    result = run_profile(_settings(), model=prebuilt)
    assert result.info["runs_on"] == "tiny-llava"
    assert [r["status"] for r in result.rows] == ["ok", "ok"]
    assert result.rows[1]["kept_tokens"] == 16 and result.rows[1]["speedup_prefill"] > 0
    assert not prebuilt.model.model.language_model._forward_pre_hooks


def test_spent_deadline_skips_every_run(prebuilt: ProfileModel) -> None:
    """A deadline already past: every row is ``skipped`` with its reason, nothing runs."""
    result = run_profile(_settings(budgets=[8, 16]), model=prebuilt,
                         deadline=time.monotonic() - 1)
    assert [(r["method"], r["budget"], r["status"]) for r in result.rows] == [
        ("baseline", None, "skipped"), ("random", 8, "skipped"), ("random", 16, "skipped")]
    assert all(r["note"] == "time budget spent" for r in result.rows)


def test_decode_repeats_sets_the_generate_runs(prebuilt: ProfileModel, monkeypatch) -> None:
    """``decode_repeats`` times ``generate`` that often; prefill keeps ``repeats``."""
    seen = []
    real = runs.time_generate

    def spy(*args, **kwargs):
        seen.append(kwargs["repeats"])
        return real(*args, **kwargs)

    monkeypatch.setattr(runs, "time_generate", spy)
    result = run_profile(_settings(repeats=3, decode_repeats=1), model=prebuilt)
    assert seen == [1, 1]
    assert result.rows[0]["prefill_ms"]["median"] > 0
