"""``vlprune profile --model timm:<name>``: analytic FLOPs equal ``FlopCounterMode`` on the same
forward (selection left out), and the command prints and writes its table."""

from __future__ import annotations

import json

import pytest

from tests.timm_vit.timm_vits import build_vit
from vlprune.cli import main
from vlprune.eval.profiler.target import ProfileSettings
from vlprune.timm.profile import run_timm_profile

timm = pytest.importorskip("timm")


@pytest.mark.parametrize(("config", "cut"), [
    ({}, 1),
    ({"reg_tokens": 3, "global_pool": "avg"}, -1),
    ({"class_token": False, "global_pool": "map", "qk_norm": True}, 2),
])
def test_analytic_flops_equal_flop_counter(config, cut):
    """Counted / analytic is 1 for the baseline and every method; a cut before the last block
    lowers the FLOPs."""
    methods = ["random", "hiprune", "todre", "flowcut"]
    if config.get("class_token", True):
        methods += ["hired", "globalcom2"]
    settings = ProfileSettings(model="tiny", methods=methods, budgets=[10, 0.5], repeats=1,
                               warmup=0, batch=2, timing=False, progress=False)
    result = run_timm_profile(settings, cut_block=cut, model=build_vit(**config))
    assert len(result.rows) == 1 + 2 * len(methods)
    for row in result.rows:
        assert row["status"] == "ok", row["note"]
        assert row["counted_vs_analytic"] == pytest.approx(1.0, rel=1e-9)
    base = result.rows[0]["gflops"]
    pruned = [row["gflops"] for row in result.rows[1:]]
    assert all(flops <= base for flops in pruned)
    if cut != -1:
        assert all(flops < base for flops in pruned)


def test_profile_command(tmp_path, capsys):
    """``vlprune profile --model timm:vit_tiny_patch16_224`` runs the named timm model with random
    weights, marks methods that need a language model ``n/a`` and writes JSON."""
    main(["profile", "--model", "timm:vit_tiny_patch16_224", "--methods", "uniform,fastv",
          "--budgets", "49", "--repeats", "1", "--warmup", "0", "--cut-block", "5",
          "--no-progress", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| uniform | 49 | 49 | 50 |" in out
    assert "| fastv | 49 | n/a |" in out
    rows = json.loads((tmp_path / "profile.json").read_text())["rows"]
    assert rows[1]["flops_ratio"] > 1.5 and rows[1]["speedup"] > 0
