"""``vlprune demo``: table, JSON and plot on a small sample; interleaved prefill timing; a failing
setting exits 1 and writes nothing; one thread by default."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from vlprune.cli import build_parser, main
from vlprune.eval import interleaved
from vlprune.eval.toy.benchmark import model_inputs
from vlprune.eval.toy.data import samples
from vlprune.eval.toy.model import load_toy_model, toy_processor
from vlprune.methods.random import RandomPrune


def test_demo_writes_table_json_and_plot(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """A small demo prints the method × budget table with timing columns and writes demo.json
    (accuracy, per-seed accuracies, prefill median / quartiles, speed-up vs none), demo.png and
    the gallery (one cell per method, side by side)."""
    code = main(["demo", "--samples", "8", "--methods", "random,fastv", "--budgets", "64",
                 "--seeds", "0", "1", "--repeats", "5", "--out", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "| method | budget | accuracy |" in out and "| speed-up |" in out
    assert "| fastv | 64 |" in out and "| none | all (576) |" in out
    rows = json.loads((tmp_path / "demo.json").read_text())
    assert [(r["method"], r["budget"]) for r in rows] == [("none", None), ("random", 64),
                                                          ("fastv", 64)]
    assert rows[0]["speedup"] == 1.0
    for row in rows:
        assert row["prefill_ms_p25"] <= row["prefill_ms"] <= row["prefill_ms_p75"]
        assert row["speedup"] > 0 and row["tokens"] == (576 if row["budget"] is None else 64)
    assert len(rows[1]["per_seed"]) == 2
    assert (tmp_path / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    gallery = Image.open(tmp_path / "gallery.png")
    assert gallery.width > 2 * 336 > gallery.height > 336


def test_failing_setting_exits_1_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A method that raises during the benchmark ends the demo with exit code 1 and one line
    naming it; demo.json / demo.png are not written (an older demo.json survives)."""

    def broken(self: RandomPrune, batch: object) -> None:
        raise RuntimeError("selection exploded")

    monkeypatch.setattr(RandomPrune, "select", broken)
    (tmp_path / "demo.json").write_text("old")
    code = main(["demo", "--samples", "4", "--methods", "random", "--budgets", "64",
                 "--seeds", "0", "--out", str(tmp_path)])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("vlprune demo: random@64: RuntimeError: selection exploded")
    assert (tmp_path / "demo.json").read_text() == "old"
    assert not (tmp_path / "demo.png").exists()


def test_one_thread_by_default() -> None:
    """The demo runs on one torch thread unless told otherwise (see the demo module)."""
    assert build_parser().parse_args(["demo"]).threads == 1
    assert build_parser().parse_args(["demo", "--threads", "2"]).threads == 2


def test_timing_is_interleaved(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each round times the unpruned model, then every other setting once, in order; round 0
    is a warm-up; ``none`` reports the unpruned runs themselves (speed-up exactly 1); the
    speed-up is the median of per-round ratios."""
    calls: list[str] = []
    clock = iter(range(1, 10_000))

    def fake(model: object, inputs: object, setting: interleaved.Setting) -> float:
        calls.append(setting[0])
        return {"none": 10.0, "random": 5.0, "fastv": 8.0}[setting[0]] + next(clock) * 1e-6

    monkeypatch.setattr(interleaved, "_prefill_ms", fake)
    settings = [("none", {}), ("random", {"budget": 64}), ("fastv", {"budget": 64})]
    timings = interleaved.time_settings(None, {}, settings, repeats=5)  # type: ignore[arg-type]
    assert calls == ["none", "random", "fastv"] * 6
    assert [t.ms.n for t in timings] == [5, 5, 5]
    assert timings[0].speedup == 1.0
    assert timings[1].speedup == pytest.approx(2.0, rel=1e-3)
    assert timings[2].speedup == pytest.approx(1.25, rel=1e-3)


def test_time_settings_on_the_toy_model() -> None:
    """Real prefills of the toy model: positive times, quartiles around the median."""
    model, processor = load_toy_model(), toy_processor()
    inputs = model_inputs(processor, samples("test", 1))
    (none, pruned) = interleaved.time_settings(
        model, inputs, [("none", {}), ("random", {"budget": 64})], repeats=5)
    for timing in (none, pruned):
        assert 0 < timing.ms.p25 <= timing.ms.median <= timing.ms.p75
    assert none.speedup == 1.0 and pruned.speedup > 0
