#!/usr/bin/env bash
# Do pyproject.toml and constraints.txt resolve for a machine that sees only PyPI?
#
# A dry run of what `scripts/setup_dev.sh` and `pip install "vlprune[eval]"` install, with
# --isolated (no pip config files or PIP_* variables, so no local wheel folder or extra index)
# and --ignore-installed. PyPI's Linux torch is the CUDA build, which pins its own triton: a
# triton pin that disagrees ends in ResolutionImpossible. A recent pip in a throwaway venv reads
# the wheels' metadata (PEP 658) instead of downloading GBs of CUDA wheels.
# Usage: bash scripts/check_pins.sh   (needs PyPI; PYTHON=python3.11 to choose the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"${PYTHON:-python3}" -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install -q --isolated --upgrade "pip>=25"
"$tmp/venv/bin/python" -m pip install -q --isolated --dry-run --ignore-installed \
    -c constraints.txt -e ".[dev,eval]" -r scripts/lmms-eval-runtime.txt
echo "check_pins.sh: pyproject.toml + constraints.txt resolve on plain PyPI"
