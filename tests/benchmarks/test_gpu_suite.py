"""``benchmarks/gpu_suite.py --quick --device cpu``: the GPU suite's smoke run, end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import vlprune
from vlprune.registry import get_method

REPO = Path(__file__).resolve().parents[2]
SWEEPS = {("tiny:llava", 1), ("tiny:llava", 2), ("tiny:qwen2_5_vl", 1), ("tiny:qwen2_5_vl", 2)}


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> tuple[dict, Path]:
    """One quick CPU run of the suite: (its JSON record, its output directory)."""
    out = tmp_path_factory.mktemp("gpu_suite")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_suite.py", "--quick", "--device", "cpu", "--out",
         str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "gpu_suite.json").read_text()), out


@pytest.mark.slow
def test_every_method_runs_on_both_families_and_batches(suite) -> None:
    """Each sweep has the baseline and every registered method; a method runs ("ok") exactly
    where it supports the family, keeps the budget and costs fewer FLOPs than the baseline."""
    record, _ = suite
    assert {(s["model"], s["batch"]) for s in record["sweeps"]} == SWEEPS
    for sweep in record["sweeps"]:
        rows = {r["method"]: r for r in sweep["rows"]}
        assert set(rows) == {"baseline", *vlprune.list_methods()}
        assert rows["baseline"]["status"] == "ok"
        family = sweep["info"]["family"]
        for name in vlprune.list_methods():
            row = rows[name]
            families = get_method(name).families
            supported = families is None or family in families
            assert row["status"] == ("ok" if supported else "n/a"), (name, row["note"])
            if supported:
                assert row["kept_tokens"] == 16
                assert row["flops_speedup"] > 1
                assert row["efficiency"] == pytest.approx(
                    row["speedup_prefill"] / row["flops_speedup"])
                assert 0 <= row["select_share"] < 1
                assert row["decode_ms_per_token"]["median"] > 0 and row["peak_mb"] > 0


@pytest.mark.slow
def test_kernel_grid_equal_and_outputs_written(suite) -> None:
    """The top-k grid agrees with both torch baselines; JSON, markdown and PNG are written."""
    record, out = suite
    pytest.importorskip("triton")
    assert record["kernel_tests"]["status"] == "skipped"  # compiled tests need CUDA
    assert record["topk"] and all(r["status"] == "ok" for r in record["topk"])
    assert all(r["equal_reference"] and r["equal_topk_sort_gather"] for r in record["topk"])
    report = (out / "gpu_suite.md").read_text()
    assert report.count("\n## ") == len(SWEEPS)
    assert (out / "gpu_suite.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_model_that_fails_becomes_error_rows(monkeypatch) -> None:
    """A sweep whose model cannot be built is reported as an ``error`` row per batch, with the
    reason, and the suite goes on."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import gpu_suite
    import gpu_sweeps

    plan = gpu_suite.make_plan(gpu_suite.parse_args(["--quick", "--device", "cpu"]))
    plan.models = ["tiny:no_such_family"]
    sweeps = gpu_sweeps.run_sweeps(plan, deadline=time.monotonic() + 60)
    assert [(s["batch"], s["rows"][0]["status"]) for s in sweeps] == [(1, "error"), (2, "error")]
    assert "no_such_family" in sweeps[0]["rows"][0]["note"]
