#!/usr/bin/env bash
# Create a separate virtual environment (default .venv-peers) with leanlm (editable, test extras)
# and the quantization peers (the `peers` extra: gptqmodel, optimum), for `pytest -m peers` and
# `benchmarks/bench_quant.py --peers`. Separate from .venv because gptqmodel pins numpy 2.2.6
# where constraints.txt pins a newer one; torch and transformers keep constraints.txt's versions
# (torch first, alone: nothing may pull a CUDA build). About 2 minutes; nothing is compiled
# (gptqmodel 7.3.6 builds its kernels lazily, and only on CUDA). torchvision is not installed:
# there is no CPU wheel of it for torch 2.13 here (benchmarks/gptqmodel_peer.py works around the
# one import gptqmodel makes of it). Not run by CI; the peers tests skip where gptqmodel is absent.
#
#   scripts/setup_peers.sh [VENV_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-peers}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pins=$(mktemp)
trap 'rm -f "$pins"' EXIT
grep -E '^(torch|transformers)==' constraints.txt > "$pins"
"$VENV/bin/pip" install -q -c "$pins" torch
# PIP_CONSTRAINT: the same pins inside the isolated environments that build sdists
PIP_CONSTRAINT="$pins" "$VENV/bin/pip" install -q -c "$pins" -e ".[test,peers]"
