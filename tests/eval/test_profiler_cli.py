"""``vlprune profile`` end to end on a mini preset, the FLOPs-only path of full-size presets,
and the pieces of the report (spread, table, CSV, selection meter)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

import vlprune
from vlprune.cli import main
from vlprune.eval.profiler.presets import PRESETS
from vlprune.eval.profiler.report import flatten, format_table
from vlprune.eval.profiler.runner import run_profile
from vlprune.eval.profiler.target import ProfileSettings
from vlprune.eval.profiler.timing import SelectionMeter, Spread
from vlprune.methods.random import RandomPrune
from vlprune.testing import tiny_inputs, tiny_model


def test_cli_writes_table_json_csv_png(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A mini preset, two methods, one budget: the table lists baseline + 2 rows, the JSON
    holds per-layer tokens and timings with their spread, counted FLOPs agree with the
    analytic ones, and the CSV and PNG exist."""
    pytest.importorskip("matplotlib")
    out = tmp_path / "profile"
    main(["profile", "--model", "llava-1.5-7b-mini", "--methods", "random,fastv",
          "--budgets", "64", "--repeats", "2", "--warmup", "0", "--new-tokens", "2",
          "--text-tokens", "16", "--threads", "1", "--no-progress", "--out", str(out)])
    table = capsys.readouterr().out
    assert "| baseline |" in table and "| random | 64 | 64 |" in table and "| fastv | 64 |" in table
    report = json.loads((out / "profile.json").read_text())
    rows = report["rows"]
    assert [r["method"] for r in rows] == ["baseline", "random", "fastv"]
    info = report["info"]
    assert info["attn_implementation"] == "sdpa" and info["timing"] and info["threads"] == 1
    for row in rows:
        assert row["status"] == "ok"
        assert row["counted_vs_analytic"] == pytest.approx(1.0, rel=1e-3)
        assert row["prefill_ms"]["median"] > 0 and row["prefill_ms"]["p25"] is not None
        assert row["decode_ms_per_token"]["median"] > 0 and row["peak_mb"] > 0
        assert row["speedup_prefill"] > 0
    assert rows[1]["llm_input_tokens"] == 16 + 64
    assert rows[2]["layer_tokens"][:3] == [16 + 576, 16 + 576, 16 + 64]  # FastV cuts at K=2
    assert rows[2]["select_gflops"] > 0 and rows[2]["select_ms"]["median"] >= 0
    share = rows[2]["select_ms"]["median"] / rows[2]["prefill_ms"]["median"]
    assert rows[2]["select_share"] == pytest.approx(share) and 0 < share < 1
    assert rows[0]["select_share"] is None and "select %" in table
    with (out / "profile.csv").open() as handle:
        records = list(csv.DictReader(handle))
    assert len(records) == 3 and "prefill_ms_p75" in records[0]
    assert (out / "profile.png").read_bytes()[:4] == b"\x89PNG"


def test_full_size_preset_on_cpu_is_flops_only() -> None:
    """llava-1.5-7b on CPU: the mini twin runs the method (token counts), FLOPs are reported
    at full size and counted on the meta device; no latency. Paper MACs match the spec's table
    (3.33 T unpruned, 0.65 T with 64 image tokens)."""
    result = run_profile(ProfileSettings(model="llava-1.5-7b", methods=["random"], budgets=[64],
                                         progress=False, threads=1))
    assert result.info["runs_on"] == "llava-1.5-7b-mini" and not result.info["timing"]
    base, pruned = result.rows
    assert round(base["paper_tmacs"], 2) == 3.33 and round(pruned["paper_tmacs"], 2) == 0.65
    for row in result.rows:
        assert row["counted_vs_analytic"] == pytest.approx(1.0, rel=1e-3)
        assert "prefill_ms" not in row
    assert pruned["flops_speedup"] > 3
    assert "| FLOPs ratio |" in format_table(result)


def test_unsupported_family_is_na(monkeypatch: pytest.MonkeyPatch) -> None:
    """A method that refuses the model's family at patch time gives an ``n/a`` row, not a
    crash; the other rows still run."""
    monkeypatch.setattr(RandomPrune, "families", ("qwen2_vl",))
    result = run_profile(ProfileSettings(model="llava-1.5-7b", methods=["random", "uniform"],
                                         budgets=[64], progress=False, count=False, threads=1))
    status = {r["method"]: r["status"] for r in result.rows}
    assert status == {"baseline": "ok", "random": "n/a", "uniform": "ok"}
    assert "| random | 64 | n/a |" in format_table(result)


def test_local_checkpoint_path(tmp_path: Path) -> None:
    """A saved checkpoint (the route of a real model, local path or hub id) loads through
    ``AutoModelForImageTextToText``; its family and geometry come from its config."""
    tiny_model("llava").save_pretrained(tmp_path / "ckpt")
    result = run_profile(ProfileSettings(
        model=str(tmp_path / "ckpt"), methods=["random"], budgets=[8], repeats=1, warmup=0,
        new_tokens=2, text_tokens=8, progress=False, threads=1))
    assert result.info["family"] == "llava" and result.info["image_tokens"] == 36
    base, pruned = result.rows
    assert (base["llm_input_tokens"], pruned["llm_input_tokens"]) == (8 + 36, 8 + 8)
    assert pruned["counted_vs_analytic"] == pytest.approx(1.0, rel=1e-3)


def test_hybrid_decoder_checkpoint_exits_1_with_one_line(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    """A Qwen3.5 checkpoint (no preset; linear-attention layers the profiler does not model)
    ends ``vlprune profile`` with exit code 1 and one line naming why, before any run."""
    tiny_model("qwen3_5").save_pretrained(tmp_path / "ckpt")
    capsys.readouterr()
    code = main(["profile", "--model", str(tmp_path / "ckpt"), "--methods", "random",
                 "--budgets", "4", "--threads", "1", "--no-progress", "--out", str(tmp_path)])
    assert code == 1
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("vlprune")]
    assert line.startswith("vlprune profile: ") and "linear-attention layers of qwen3_5" in line
    assert not (tmp_path / "profile.json").exists()


def test_unknown_method_fails_early(capsys: pytest.CaptureFixture) -> None:
    """An unknown method is a usage error (exit 2, one line) before any model is built."""
    with pytest.raises(SystemExit) as info:
        main(["profile", "--model", "llava-1.5-7b", "--methods", "nope"])
    assert info.value.code == 2
    assert "unknown `method` 'nope'" in capsys.readouterr().err


def test_help_lists_presets(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["profile", "--help"])
    text = capsys.readouterr().out
    assert all(name in text for name in PRESETS)


def test_spread_and_flatten() -> None:
    """Median and inclusive quartiles; timing cells flatten to value / _p25 / _p75 columns and
    per-layer lists stay out of the CSV."""
    spread = Spread.of([1.0, 2.0, 3.0, 4.0, 100.0])
    assert (spread.median, spread.p25, spread.p75, spread.n) == (3.0, 2.0, 4.0, 5)
    assert Spread.of([7.0]).p75 == 7.0
    flat = flatten({"method": "x", "prefill_ms": {"median": 3.0, "p25": 2.0, "p75": 4.0},
                    "layer_tokens": [5, 5]})
    assert flat == {"method": "x", "prefill_ms": 3.0, "prefill_ms_p25": 2.0, "prefill_ms_p75": 4.0}


def test_selection_meter_restores_method() -> None:
    """The meter shadows the method instance's functions and removes every shadow."""
    method = RandomPrune()
    meter = SelectionMeter(method, torch.device("cpu"))
    assert "select" in vars(method)
    meter.remove()
    assert not {"select", "choose", "encoder_choose"} & set(vars(method))


def test_selection_meter_times_probe_work_in_hooks() -> None:
    """Probes that compute inside the forward's hooks (TransPrune's token transitions) are
    timed as selection (here with an idle method: only the probes count); removing the meter
    restores every probe."""
    model = tiny_model("llava")
    with vlprune.patch(model, "transprune", budget=8) as handle:
        probes = [p for p in handle.probes.values() if type(p).work]
        assert probes and all(type(p).work == ("reduce",) for p in probes)
        meter = SelectionMeter(RandomPrune(), torch.device("cpu"), handle.probes.values())
        assert all("reduce" in vars(p) for p in probes)
        with torch.no_grad():
            model(**tiny_inputs("llava"))
        assert meter.ms > 0
        meter.remove()
        assert not any("reduce" in vars(p) for p in probes)
