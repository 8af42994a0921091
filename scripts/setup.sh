#!/usr/bin/env bash
# Create .venv (once) and install leanlm with its test dependencies at the pinned versions.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.leanlm-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
  # torch first, alone, from the pin: nothing else may pull a different (CUDA) build.
  .venv/bin/pip install -q -c constraints.txt torch
  .venv/bin/pip install -q -c constraints.txt -e ".[dev]"
  touch "$stamp"
fi
