"""The package as published: ``python -m build`` makes an sdist and a wheel that carry the toy
checkpoint (weights, processor, chat template) and its lmms-eval tasks, ``twine check`` passes,
and the built wheel (not the editable checkout) runs ``vlprune demo`` from a fresh venv.

The fresh venv gets vlprune from the wheel alone (``--no-deps --no-index``); its dependencies
are the ones already installed next to the running interpreter, made visible by a ``.pth``
line (which does not run that environment's own ``.pth`` files, so its editable vlprune stays
out). This keeps the test to seconds instead of a 1.3 GB torch install, and still tests what a
user's install would: the wheel's files, its console script and its entry points. That the
declared dependencies are installed at versions the wheel accepts is checked in the venv;
that they resolve from PyPI is ``scripts/check_pins.sh``'s job (CI).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = [
    "vlprune/eval/toy/checkpoint/model.safetensors",
    "vlprune/eval/toy/checkpoint/config.json",
    "vlprune/eval/toy/checkpoint/processor_config.json",
    "vlprune/eval/toy/checkpoint/tokenizer.json",
    "vlprune/eval/toy/checkpoint/chat_template.jinja",
    "vlprune/eval/toy/checkpoint/accuracy.json",
    "vlprune/eval/toy/lmms_tasks/vlprune_toy.yaml",
    "vlprune/eval/toy/lmms_tasks/vlprune_toy_mc.yaml",
]
CHECK_REQUIREMENTS = """
import importlib.metadata as md
from packaging.requirements import Requirement
bad = []
for text in md.requires("vlprune") or []:
    req = Requirement(text)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    try:
        version = md.version(req.name)
    except md.PackageNotFoundError:
        bad.append(f"{req.name} missing")
        continue
    if version not in req.specifier:
        bad.append(f"{req.name} {version} not in {req.specifier}")
points = md.entry_points(group="lmms_eval.models")
if [p.value for p in points if p.name == "vlprune"] != ["vlprune.eval.lmms:manifest"]:
    bad.append("no lmms_eval.models entry point")
import vlprune, vlprune.eval.toy.model as toy
print(vlprune.__file__, toy.CHECKPOINT_DIR, bad)
"""


def _run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, **kwargs)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """sdist + wheel built from a copy of the sources (the checkout stays untouched)."""
    pytest.importorskip("build", reason="`build` comes with the dev extras")
    src = tmp_path_factory.mktemp("src")
    shutil.copytree(ROOT / "vlprune", src / "vlprune",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)])
    return out


@pytest.mark.slow
def test_sdist_and_wheel_carry_the_toy_model(dist: Path) -> None:
    """Both archives hold the toy checkpoint and the lmms-eval task files."""
    (wheel,) = dist.glob("*.whl")
    (sdist,) = dist.glob("*.tar.gz")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert all(path in names for path in SHIPPED), set(SHIPPED) - names
    with tarfile.open(sdist) as archive:
        members = {m.name.split("/", 1)[1] for m in archive.getmembers() if "/" in m.name}
    assert all(path in members for path in SHIPPED), set(SHIPPED) - members


@pytest.mark.slow
def test_twine_check(dist: Path) -> None:
    """The metadata and the README render as PyPI would show them."""
    pytest.importorskip("twine", reason="`twine` comes with the dev extras")
    proc = _run([sys.executable, "-m", "twine", "check", "--strict",
                 *map(str, sorted(dist.iterdir()))])
    assert proc.stdout.count("PASSED") == 2


@pytest.mark.slow
def test_wheel_runs_the_demo_in_a_fresh_venv(dist: Path, tmp_path: Path) -> None:
    """``pip install`` of the wheel into a new venv, then ``vlprune demo --samples 4`` there:
    vlprune is imported from the venv (not the checkout), its declared dependencies are met,
    its lmms-eval entry point is registered, the shipped model loads, and the demo scores
    every method (at one budget, to keep the test short)."""
    (wheel,) = dist.glob("*.whl")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # no checkout on the path
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], env=env)
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
          "--no-deps", "--no-index", "--ignore-installed", str(wheel)], env=env)
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                      "['purelib'])"], env=env).stdout.strip())
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "_vlprune_test_deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    where = _run([str(python), "-c", CHECK_REQUIREMENTS], cwd=tmp_path, env=env).stdout
    module, checkpoint, bad = where.split(" ", 2)
    assert module.startswith(str(venv)) and checkpoint.startswith(str(venv)), where
    assert bad.strip() == "[]", bad
    _run([str(venv / "bin" / "vlprune"), "demo", "--samples", "4", "--budgets", "64",
          "--repeats", "1", "--out", str(tmp_path / "demo")], cwd=tmp_path, env=env)
    rows = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert {r["method"] for r in rows} >= {"none", "random", "hiprune", "fastv"}
    assert all(r["error"] is None for r in rows)
