#!/usr/bin/env bash
# The test suite on the oldest declared versions (constraints-min.txt: torch 2.11, transformers
# 5.17, ...) in `.venv-min`, created if missing; the rest pinned as in constraints.txt, lmms-eval
# installed as scripts/setup_dev.sh does. Arguments go to pytest.
# Usage: bash scripts/test_min_versions.sh [-k expr ...]   (PYTHON=python3.11 to choose)
set -euo pipefail
cd "$(dirname "$0")/.."

LMMS_EVAL_RUNTIME=(loguru pytz evaluate sacrebleu tenacity pytablewriter)  # as setup_dev.sh

[ -x .venv-min/bin/python ] || "${PYTHON:-python3}" -m venv .venv-min
rest=$(mktemp)
trap 'rm -f "$rest"' EXIT
overridden=$(sed -n 's/^\([A-Za-z0-9_.-]*\)[=<>!~].*/\1/p' constraints-min.txt | paste -sd'|')
grep -v -i -E "^(${overridden})[=<>!~]" constraints.txt > "$rest"
pip_install=(.venv-min/bin/pip install -q -c constraints-min.txt -c "$rest")
"${pip_install[@]}" -e ".[dev]" "${LMMS_EVAL_RUNTIME[@]}"
"${pip_install[@]}" --no-deps lmms-eval

.venv-min/bin/python - <<'PY'
import re
import sys
from importlib.metadata import version
from pathlib import Path

pins = re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", Path("constraints-min.txt").read_text(), re.M)
off = [f"{name} {version(name)} (want {want})" for name, want in pins
       if version(name).split("+")[0] != want]
if off:
    sys.exit("test_min_versions.sh: not the oldest versions: " + ", ".join(off))
print("test_min_versions.sh: " + ", ".join(f"{name} {want}" for name, want in pins))
PY
.venv-min/bin/python -m pytest -q "$@"
