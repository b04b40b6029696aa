#!/usr/bin/env bash
# Every GPU check of owlore-kernels in one run, for a CUDA machine without network
# (torch, triton, transformers and peft installed), in under 8 minutes:
#
#   1. install the wheels in .whl/ (galore-torch, bitsandbytes, pytest-benchmark, py-cpuinfo2)
#      into a private folder put on PYTHONPATH: nothing comes from the network;
#   2. build the C++ extension in place, if the machine can (the CUDA paths do not need it);
#   3. benchmarks/gpu_check.py            the Triton kernels at real shapes: correct and how fast;
#   4. benchmarks/bench_gpu_step.py       LLaMA-2-7B optimizer step: OwLore vs galore-torch vs AdamW;
#   5. pytest -k cuda tests -q            the test suite's CUDA cases;
#   6. make microbench                    the pytest-benchmark microbenchmarks, saved under $OUT.
#
# Each step has its own time limit, cut further so that the whole run ends within BUDGET_S
# (470 s); a step that fails or times out is recorded and the next one still runs. Every log,
# the results and summary.txt (step, exit status, seconds) go to $OUT, or to
# benchmarks/results/gpu_run_<UTC date>/ when OUT is unset. Exit status: 1 if any step failed.
#
# The wheels travel with the checkout in the git-ignored .whl/ folder. Fetch them once on a
# machine with network (Python 3.12, x86-64 Linux; manylinux_2_24 is where bitsandbytes'
# current wheel lives: without it pip falls back to bitsandbytes 0.42's 105 MB any-platform
# wheel instead of 0.50's 43 MB one):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl galore-torch==1.0 bitsandbytes pytest-benchmark py-cpuinfo2
#
# (add pytest, pluggy and iniconfig if the GPU machine has no pytest).
#
#   bash benchmarks/gpu_run.sh                  # on the GPU machine
#   bash benchmarks/gpu_run.sh --cpu-dry-run    # the same plumbing on CPU: tiny sizes, untimed microbenchmarks
#   LIMIT_SCALE=4 BUDGET_S=2000 bash benchmarks/gpu_run.sh --cpu-dry-run   # ... on a slow, shared CPU
set -u -o pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-470}
LIMIT_SCALE=${LIMIT_SCALE:-1}  # multiplies every step's limit: a slower machine (the CPU dry run)
DRY=0
if [ "${1:-}" = "--cpu-dry-run" ]; then
    DRY=1
elif [ $# -gt 0 ]; then
    echo "usage: bash benchmarks/gpu_run.sh [--cpu-dry-run]" >&2
    exit 2
fi
OUT=${OUT:-$ROOT/benchmarks/results/gpu_run_$(date -u +%Y-%m-%dT%H%M%SZ)}
mkdir -p "$OUT"
START=$(date +%s)
FAILED=0
printf '%-16s %4s %6s\n' step rc seconds > "$OUT/summary.txt"

# step NAME LIMIT_S CMD...: run CMD with at most LIMIT_S seconds (less if the budget is short),
# its output in $OUT/NAME.log, and a line in summary.txt
step() {
    local name=$1 limit=$(($2 * LIMIT_SCALE))
    shift 2
    local left=$((START + BUDGET_S - $(date +%s) - 10))  # 10 s: the kill grace below
    if [ "$limit" -gt "$left" ]; then limit=$left; fi
    if [ "$limit" -lt 15 ]; then
        echo "== $name: skipped, ${left}s of the budget left" | tee -a "$OUT/summary.txt"
        FAILED=1
        return
    fi
    echo "== $name (limit ${limit}s): ${*%%$'\n'*}"  # the command's first line
    local t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    local took=$(($(date +%s) - t0))
    [ "$rc" -eq 124 ] && echo "timed out after ${limit}s" >> "$OUT/$name.log"
    [ "$rc" -ne 0 ] && FAILED=1
    printf '%-16s %4s %6s\n' "$name" "$rc" "$took" | tee -a "$OUT/summary.txt"
}

# 1. wheels, into a private folder (nothing from the network)
SITE=${OWLORE_SITE:-/tmp/owlore_site}
shopt -s nullglob
WHEELS=(.whl/*.whl)
shopt -u nullglob
if [ ${#WHEELS[@]} -gt 0 ]; then
    rm -rf "$SITE"
    step wheels 60 "$PY" -m pip install --no-index --no-deps --target "$SITE" "${WHEELS[@]}"
    export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "no .whl/*.whl: galore-torch, bitsandbytes and pytest-benchmark must already be installed" \
        | tee "$OUT/wheels.log"
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi

step environment 30 bash -c "nvidia-smi; $PY - <<'EOF'
import importlib.metadata as md, torch
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device',
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
for dist in ('triton', 'transformers', 'peft', 'galore-torch', 'bitsandbytes', 'pytest', 'pytest-benchmark'):
    try:
        print(dist, md.version(dist))
    except md.PackageNotFoundError:
        print(dist, 'NOT INSTALLED')
EOF"

# 2. the C++ extension (CPU kernels), in place; the dry run keeps the one already built
if [ "$DRY" -eq 0 ]; then
    step build_ext 60 env OWLORE_REQUIRE_EXT=1 MAX_JOBS="$(nproc)" "$PY" setup.py build_ext --inplace
fi

if [ "$DRY" -eq 1 ]; then
    GPU_CHECK_ARGS=(--small)
    STEP_ARGS=(--tiny --device cpu --steps 2 --warmup 0)
    MICRO_ARGS="--benchmark-disable"
else
    GPU_CHECK_ARGS=()
    STEP_ARGS=()
    MICRO_ARGS=""
fi
# 3-6
step gpu_check 140 "$PY" benchmarks/gpu_check.py --out "$OUT" "${GPU_CHECK_ARGS[@]}"
step bench_gpu_step 120 "$PY" benchmarks/bench_gpu_step.py --out "$OUT" "${STEP_ARGS[@]}"
step pytest_cuda 80 "$PY" -m pytest -k cuda tests -q -p no:cacheprovider
step microbench 60 make microbench PY="$PY" INSTALL= \
    ARGS="-p no:cacheprovider --benchmark-storage=file://$OUT/microbench --benchmark-json=$OUT/microbench.json $MICRO_ARGS"

echo "total $(($(date +%s) - START)) s; logs and results in $OUT" | tee -a "$OUT/summary.txt"
exit $FAILED
