"""The ``vlprune`` command line fails loudly and early.

Each failure case runs the real command in a subprocess and pins its exit code (2: a bad
argument, found while parsing, before any model is built; 1: a failure later) and its message:
one line on stderr, no traceback, nothing written. Also: both list syntaxes, plain-text help,
the shipped toy checkpoint under ``vlprune profile``, and ``vlprune methods``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from vlprune.cli import build_parser, main
from vlprune.eval.toy.model import CHECKPOINT_DIR
from vlprune.registry import list_methods

TOY = str(CHECKPOINT_DIR)
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
NO_CUDA = not torch.cuda.is_available()
try:
    import flash_attn  # noqa: F401

    HAS_FLASH = True
except ImportError:
    HAS_FLASH = False

# name: (arguments, exit code, text the one-line message holds)
USAGE_ERRORS: dict[str, tuple[list[str], int, str]] = {
    "demo unknown method": (["demo", "--methods", "foo"], 2, "unknown `method` 'foo'"),
    "demo threads 0": (["demo", "--threads", "0"], 2, "--threads: expected an int ≥ 1"),
    "demo budget 0": (["demo", "--budgets", "64,0"], 2, "--budgets: expected an int ≥ 1"),
    "demo seed too large": (["demo", "--seeds", str(2**70)], 2, "--seeds"),
    "demo kind": (["demo", "--kinds", "colour"], 2, "unknown question kind 'colour'"),
    "profile budget 0": (["profile", "--model", "llava-1.5-7b-mini", "--budgets", "0"], 2,
                         "a budget is an int ≥ 1"),
    "profile budget -0.5": (["profile", "--model", "llava-1.5-7b-mini", "--budgets", "-0.5"],
                            2, "got '-0.5'"),
    "profile budget 1.5": (["profile", "--model", "llava-1.5-7b-mini", "--budgets", "64,1.5"],
                           2, "got '1.5'"),
    "profile unknown preset": (["profile", "--model", "llava-1.5-13b"], 2,
                               "unknown preset 'llava-1.5-13b'"),
    "profile missing folder": (["profile", "--model", "./no/such/checkpoint"], 2,
                               "neither a local checkpoint folder nor a hub id"),
    "profile threads 0": (["profile", "--model", "llava-1.5-7b-mini", "--threads", "0"], 2,
                          "--threads: expected an int ≥ 1"),
    "profile unknown method": (["profile", "--model", "llava-1.5-7b-mini", "--methods", "fixed"],
                               2, "'fixed' is internal"),
    "methods unknown": (["methods", "nope"], 2, "unknown `method` 'nope'"),
}
if NO_CUDA:
    USAGE_ERRORS["profile cuda"] = (["profile", "--model", "llava-1.5-7b-mini", "--device",
                                     "cuda"], 2, "CUDA is not available")
if not HAS_FLASH:
    USAGE_ERRORS["profile flash-attn"] = (["profile", "--model", "llava-1.5-7b-mini", "--attn",
                                           "flash_attention_2"], 2, "needs the flash-attn")
LATE_ERRORS: dict[str, tuple[list[str], int, str]] = {
    "profile hub id offline": (["profile", "--model", "nobody/nothing", "--methods", "random",
                                "--budgets", "4"], 1, "vlprune profile: nobody/nothing: "),
}
EVAL_ERRORS: dict[str, tuple[list[str], int, str]] = {
    "eval unknown method": (["eval", "--model_args", f"pretrained={TOY},method=foo,budget=4",
                             "--tasks", "vlprune_toy"], 2, "unknown `method` 'foo'"),
    "eval missing budget": (["eval", "--model_args", f"pretrained={TOY},method=random",
                             "--tasks", "vlprune_toy"], 2, "give exactly one of `budget`"),
    "eval nan option": (["eval", "--model_args", f"pretrained={TOY},method=mmtok,budget=4,"
                         "alpha=nan", "--tasks", "vlprune_toy"], 2, "`alpha` must be"),
    "eval missing checkpoint": (["eval", "--model_args", "pretrained=/no/such/ckpt,method=none",
                                 "--tasks", "vlprune_toy"], 2, "neither a local checkpoint"),
    "eval unreachable model": (["eval", "--model_args", "pretrained=nobody/nothing,method=none",
                                "--tasks", "vlprune_toy", "--limit", "1"], 1,
                               "vlprune eval: lmms-eval failed"),
}


def _run(args: list[str], cwd: Path) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "vlprune.cli", *args], cwd=cwd,
                          env={**os.environ, **ENV, "HF_HOME": str(cwd / "hf")},
                          capture_output=True, text=True, timeout=600)
    return {"rc": proc.returncode, "out": proc.stdout, "err": proc.stderr}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Every failure case, three at a time, each in its own folder holding an old
    ``vlprune_demo/demo.json`` that must survive."""
    cases = {**USAGE_ERRORS, **LATE_ERRORS}
    try:
        import lmms_eval  # noqa: F401

        cases.update(EVAL_ERRORS)
    except ImportError:
        pass
    root = tmp_path_factory.mktemp("cli")
    folders = {}
    for i, name in enumerate(cases):
        folders[name] = root / f"case{i}"
        (folders[name] / "vlprune_demo").mkdir(parents=True)
        (folders[name] / "vlprune_demo" / "demo.json").write_text("old")
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {n: pool.submit(_run, args, folders[n]) for n, (args, _, _) in cases.items()}
        return {n: {**f.result(), "cwd": folders[n]} for n, f in futures.items()}


def _check(run: dict[str, Any], code: int, text: str, *, one_line: bool = True) -> None:
    assert run["rc"] == code, run["err"][-3000:]
    lines = run["err"].strip().splitlines()
    assert text in lines[-1], run["err"][-3000:]
    if one_line:
        assert len(lines) == 1 and "Traceback" not in run["err"], run["err"]
    assert (run["cwd"] / "vlprune_demo" / "demo.json").read_text() == "old"


@pytest.mark.parametrize("name", list(USAGE_ERRORS))
def test_bad_argument_exits_2_with_one_line(runs: dict[str, dict[str, Any]], name: str) -> None:
    """A bad argument: exit code 2, one line on stderr naming it, nothing run or written."""
    _, code, text = USAGE_ERRORS[name]
    _check(runs[name], code, text)


@pytest.mark.parametrize("name", list(LATE_ERRORS))
def test_unloadable_model_exits_1_with_one_line(runs: dict[str, dict[str, Any]],
                                                name: str) -> None:
    """A model that cannot be loaded (a hub id, offline): exit code 1, one line, no traceback."""
    _, code, text = LATE_ERRORS[name]
    _check(runs[name], code, text)


@pytest.mark.parametrize("name", list(EVAL_ERRORS))
def test_eval_failures_exit_non_zero(runs: dict[str, dict[str, Any]], name: str) -> None:
    """``vlprune eval``: bad ``--model_args`` exit 2 with one line before lmms-eval starts;
    an evaluation that fails inside lmms-eval (which logs it and would exit 0) exits 1."""
    pytest.importorskip("lmms_eval")
    _, code, text = EVAL_ERRORS[name]
    _check(runs[name], code, text, one_line=code == 2)


def test_both_list_syntaxes_give_the_same_list() -> None:
    """``--budgets 64 128``, ``--budgets 64,128`` and ``--budgets 64, 128`` are one list, in
    demo and profile alike (methods too)."""
    parser = build_parser()
    for command in (["demo"], ["profile", "--model", "llava-1.5-7b-mini"]):
        forms = [["--budgets", "64", "128", "--methods", "random", "fastv"],
                 ["--budgets", "64,128", "--methods", "random,fastv"],
                 ["--budgets", "64,", "128", "--methods", "random,", "fastv"]]
        parsed = [parser.parse_args([*command, *form]) for form in forms]
        assert all(p.budgets == [64, 128] and p.methods == ["random", "fastv"] for p in parsed)
    ratios = parser.parse_args(["profile", "--model", "llava-1.5-7b-mini", "--budgets",
                                "0.25", "64"]).budgets
    assert ratios == [0.25, 64] and isinstance(ratios[1], int)


@pytest.mark.parametrize("command", [[], ["demo"], ["profile"], ["methods"], ["show"]])
def test_help_is_plain_text(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """``--help`` shows no reStructuredText / Sphinx markup."""
    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "usage: vlprune" in text
    for markup in (":func:", ":mod:", ":class:", ":data:", ":meth:", "``"):
        assert markup not in text, (command, markup)


def test_eval_help_is_plain_text(capsys: pytest.CaptureFixture[str]) -> None:
    """``vlprune eval --help``: vlprune's part is plain text, then lmms-eval's options."""
    pytest.importorskip("lmms_eval")
    with pytest.raises(SystemExit) as info:
        main(["eval", "--help"])
    assert info.value.code in (0, None)
    text = capsys.readouterr().out
    ours = text[:text.index("lmms-eval's own options follow.")]
    assert ours.startswith("usage: vlprune eval") and "vlprune_toy" in ours
    for markup in (":func:", ":mod:", ":class:", "``"):
        assert markup not in ours
    assert "--model_args" in text[len(ours):]


def test_profile_runs_the_shipped_toy_checkpoint(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """``vlprune profile --model <toy checkpoint>`` (a 70-word vocabulary) prompts with ids of
    its own vocabulary and profiles the baseline and a method."""
    code = main(["profile", "--model", TOY, "--methods", "random", "--budgets", "64",
                 "--repeats", "1", "--warmup", "0", "--new-tokens", "1", "--no-count",
                 "--no-plot", "--no-progress", "--threads", "1", "--out", str(tmp_path)])
    assert code == 0
    rows = json.loads((tmp_path / "profile.json").read_text())["rows"]
    assert [(r["method"], r["status"]) for r in rows] == [("baseline", "ok"), ("random", "ok")]
    assert rows[1]["kept_tokens"] == 64
    assert "| random | 64 |" in capsys.readouterr().out


def test_methods_lists_every_method_and_its_options(capsys: pytest.CaptureFixture[str]) -> None:
    """``vlprune methods`` prints the table the README describes (stage, budget scope, models,
    paper, official code) and every option; ``--json`` the same rows as data."""
    assert main(["methods"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("| method | stage | budget scope | models | paper | official code |")
    for name in list_methods():
        assert f"| {name} |" in text and f"\n{name}\n" in text
    assert "  layer = 2 (an int ≥ 1): " in text  # fastv
    assert main(["methods", "--json", "hiprune"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["name"] == "hiprune" and row["options"]["alpha"]["default"] == 0.1
