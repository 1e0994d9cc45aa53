#!/usr/bin/env bash
# Development / CI environment: `.venv` in the repository root (created if missing) with vlprune
# editable plus its dev extras, and lmms-eval for `lmms-eval --model vlprune`.
#
# lmms-eval is installed with --no-deps: its declared dependencies include torchvision and timm,
# which replace CPU torch by CUDA wheels or break `import transformers` model classes on
# CPU-only machines. The few packages its CLI needs with our model are installed instead
# (scripts/lmms-eval-runtime.txt; versions pinned in constraints.txt).
# Usage: bash scripts/setup_dev.sh   (PYTHON=python3.11 to choose the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."

[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
pip_install=(.venv/bin/pip install -q -c constraints.txt)
"${pip_install[@]}" -e ".[dev]" -r scripts/lmms-eval-runtime.txt
"${pip_install[@]}" --no-deps lmms-eval

.venv/bin/python - <<'PY'
import importlib.util
import sys

import torch

bad = [name for name in ("torchvision", "timm") if importlib.util.find_spec(name)]
if bad:
    sys.exit(f"setup_dev.sh: {', '.join(bad)} installed; they break transformers here, remove them")
from lmms_eval.models import get_model  # noqa: E402

get_model("vlprune")  # the entry point resolves
print(f"setup_dev.sh: .venv ready (torch {torch.__version__}, lmms-eval --model vlprune)")
PY
