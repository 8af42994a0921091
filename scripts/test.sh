#!/usr/bin/env bash
# The test command: set up .venv if needed, lint (ruff; the layer contract of pyproject.toml with
# import-linter), then run the test suite (extra args go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests benchmarks
.venv/bin/lint-imports
HF_HUB_OFFLINE=1 .venv/bin/python -m pytest "$@"
