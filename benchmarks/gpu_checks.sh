#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one run, in priority order, each step under its own time
# limit so a slow step cannot starve the rest; logs go to $1 (default bench_out/gpu).
#
#   [QUICK=1] bash benchmarks/gpu_checks.sh [LOG_DIR] [STEPS]   # STEPS: any of tune,kernels,tests,profile,train
#                                                               # QUICK: no eager-engine model decode
#
# Runs from a source checkout with the machine's own torch/triton/transformers (no install):
#   tune     bench_kernels.py --tune          tile sweeps of the decode attention and int4 GEMV
#   kernels  bench_kernels.py --tuned         issue 10 must-show 3 (roofline fractions, model decode),
#                                             with the sweep's best tiles where it ran
#   tests    pytest -m cuda                   issue 10 must-show 2 (kernels on in engine/QuantLinear)
#   profile  bench_kernels.py --profile       the GPU kernels of a 1B model's decode step, by time
#   train    bench_train.py --cuda            issue 3 must-show 5 (MFU of a 1B-shaped model)
set -u
out=${1:-bench_out/gpu}
steps=${2:-tune,kernels,tests,profile,train}
mkdir -p "$out"
export PYTHONPATH="$PWD/src:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1
py=${PYTHON:-python3}

step() {  # name, seconds, command...
  local name=$1 limit=$2
  shift 2
  [[ ",$steps," == *",$name,"* ]] || return 0
  echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  echo "=== $name: exit $? after $((SECONDS - t0))s"
  tail -n 60 "$out/$name.log"
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $py -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} > "$out/env.log" 2>&1
cat "$out/env.log"
step tune 120 $py benchmarks/bench_kernels.py --tune "$out/tuned.json"
step kernels 170 $py benchmarks/bench_kernels.py ${QUICK:+--quick} \
  $([ -f "$out/tuned.json" ] && echo --tuned "$out/tuned.json")
step tests 90 $py -m pytest -p no:warnings -p no:cacheprovider -q -m cuda tests/kernels/test_dispatch.py \
  tests/quant/test_linear.py
step profile 60 $py benchmarks/bench_kernels.py --profile
step train 150 $py benchmarks/bench_train.py --cuda --rounds 1 --steps 5 --batch 8 --seq 2048 \
  --configs leanlm+compile,leanlm+compile+chunk=256,transformers
