#!/usr/bin/env bash
# The timm environment: `.venv-timm` in the repository root (created if missing) with torch,
# torchvision and timm, vlprune editable and pytest; `.ci/run` runs tests/timm in it.
#
# timm imports torchvision, and PyPI's torchvision does not work beside the CPU torch of `.venv`
# (and a broken torchvision breaks transformers' model imports): the main environment stays free
# of both, and timm gets this second one with a matching torch / torchvision pair (a CUDA build
# that also runs on CPU; about 5.7 GB). The other dependencies follow constraints.txt, less its
# torch and triton pins (this torch build brings its own triton).
# Usage: bash scripts/setup_timm.sh   (PYTHON=python3.11 to choose the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH=(torch==2.14.1 torchvision==0.29.1)

[ -x .venv-timm/bin/python ] || "${PYTHON:-python3}" -m venv .venv-timm
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
grep -vE '^(torch|triton)==' constraints.txt > "$constraints"
pip_install=(.venv-timm/bin/pip install -q -c "$constraints")
"${pip_install[@]}" "${TORCH[@]}"
"${pip_install[@]}" -e ".[timm]" "${TORCH[@]}" pytest

.venv-timm/bin/python - <<'PY'
import timm
import torch
import torchvision
from transformers import LlavaForConditionalGeneration  # noqa: F401  (imports beside torchvision)

print(f"setup_timm.sh: .venv-timm ready (torch {torch.__version__}, "
      f"torchvision {torchvision.__version__}, timm {timm.__version__})")
PY
