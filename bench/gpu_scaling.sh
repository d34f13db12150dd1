#!/usr/bin/env bash
# Issue #15's scaling and GPU run, for a machine with a CUDA GPU and many cores. One script, results
# in $OUT (each step's log and JSON), every step bounded by its own timeout so one slow step cannot
# eat the others' time.
#
#   OUT=/path/to/results bench/gpu_scaling.sh
#
# Environment: PYTHON (default .venv/bin/python: an interpreter with ct-convert installed with its
# test extra and a CUDA build of torch), LAYERS (default 24: the 3.2 GB checkpoint of bench/run.py),
# WORKERS (default 1,2,4,8,16), SWEEP_TARGETS (default gptq,awq,marlin,gguf,dense), WORK (scratch
# folder, default /tmp/ct-convert-gpu-bench; needs ~3x the checkpoint, ~25 GB with dense outputs),
# STEPS (default: all of "env build workers test_cuda kernels cuda_bench compare"; a subset runs
# only those, e.g. to fit a per-command time limit: STEPS="env build workers", then the rest).
set -u
OUT=${OUT:?set OUT to the results folder}
PY=${PYTHON:-.venv/bin/python}
LAYERS=${LAYERS:-24}
WORKERS=${WORKERS:-1,2,4,8,16}
SWEEP_TARGETS=${SWEEP_TARGETS:-gptq,awq,marlin,gguf,dense}
WORK=${WORK:-/tmp/ct-convert-gpu-bench}
STEPS=" ${STEPS:-env build workers test_cuda kernels cuda_bench compare} "
mkdir -p "$OUT" "$WORK"
cd "$(dirname "$0")/.."

step() {  # step NAME TIMEOUT_S COMMAND...: run, log, record its exit code
    local name=$1 limit=$2
    shift 2
    [[ $STEPS == *" $name "* ]] || return 0
    echo "== $name: $*" | tee -a "$OUT/steps.log"
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "   rc=$rc in $((SECONDS - t0)) s" | tee -a "$OUT/steps.log"
    tail -n 30 "$OUT/$name.log"
}

step env 60 bash -c "nproc; free -g; nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv; \
  $PY -c 'import torch, ct_convert; print(torch.__version__, torch.version.cuda, torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else None)'"

# the checkpoint, built once (a few seconds per GB)
step build 300 $PY -c "
import sys; sys.path.insert(0, 'bench')
from pathlib import Path
from synth import LLAMA3_8B, build
src = Path('$WORK/src-$LAYERS-30000')
if not (src / 'config.json').exists():
    build(src, **dict(LLAMA3_8B, layers=$LAYERS, vocab=30000))
print(src)"

# 1. CPU throughput per worker count (where it flattens), no verification, fingerprints kept for step 4
step workers 1500 $PY bench/run.py --layers "$LAYERS" --work "$WORK" --targets "$SWEEP_TARGETS" --workers "$WORKERS" \
    --skip-baselines --json "$OUT/workers.json"

# 2. the CUDA path gives the CPU path's bytes, for every target and the fixtures' formats
step test_cuda 600 $PY -m pytest -q -x tests/test_cuda.py -p no:cacheprovider

# 3. repack kernels on the GPU against the device's copy bandwidth (target >= 50%), bytes equal to the CPU's
step kernels 300 $PY bench/cuda_kernels.py --source "$WORK/src-$LAYERS-30000" --json "$OUT/kernels.json"

# 4. the whole repack with --device cuda (verified and not), output fingerprints against the CPU runs
step cuda_bench 900 $PY bench/run.py --layers "$LAYERS" --work "$WORK" --targets dense,awq,gptq,marlin --device cuda \
    --verify --skip-baselines --json "$OUT/cuda.json"
step compare 60 $PY -c "
import json
cpu = json.load(open('$OUT/workers.json'))['rows']
gpu = json.load(open('$OUT/cuda.json'))['rows']
prints = {r['run'].split()[1]: r['output'] for r in cpu if r.get('output')}
for r in gpu:
    t = r['run'].split()[1]
    print(r['run'], 'bytes equal to the CPU run' if prints.get(t) == r.get('output') else 'DIFFERENT FROM THE CPU RUN', r['output'], prints.get(t))"
echo "results in $OUT" | tee -a "$OUT/steps.log"
