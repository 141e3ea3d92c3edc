#!/usr/bin/env bash
# The GPU suite: everything ddm_hpc checks and measures on a CUDA GPU, in one call of under 8 minutes.
#
# For a lent H100/H200 (the device tool): prepare here with `bash benchmarks/gpu_prepare.sh`, then one
# device run with carry [".gpu"], command `bash benchmarks/gpu_suite.sh`, timeout_s 540. It
#   1. installs what the machine lacks from the carried wheels (.gpu/wheels -> /tmp/site, no registry);
#   2. runs the kernel and device tests on CUDA (tests/test_kernels, tests/test_devices.py: the compiled
#      kernels against the reference, every dtype) and `pytest -m gpu` (the whole pipeline on CUDA, the
#      determinism promise, the speedup benchmark at its small size) plus the shard bit-identity test;
#   3. times bench_matching_loss.py (kernel vs eager vs torch.compile, GB/s against the copy bandwidth
#      measured in the same run; once more with a 2048-element tile), the speedup benchmark at GPU size,
#      bench_finetune.py, bench_clustering.py (full size: 1.28 M x 512, 1000 classes x 10; the global
#      k-means only with faiss-gpu) and bench_group_grads.py;
#   4. prints a summary table (step, status, exit code, seconds) last.
# Every step's output goes to one results file, $OUT/gpu_suite.txt (plus $OUT/matching_loss.csv and the
# junit XML of the tests). A failing step is reported loudly (FAILED, exit code, its log tail) and the
# next step runs. The steps share a budget (SUITE_BUDGET seconds, default 460): a step gets at most its
# own limit and what is left; steps that find no time left are listed as SKIPPED.
#
# Also runs on any CUDA node (OUT defaults to ./gpu_suite_out). Environment: SUITE_BUDGET, SUITE_STEPS
# (comma-separated step names to run, default all), SUITE_CHECK=1 (check that every step's command exists
# and that each benchmark accepts the flags given here, without running anything: what CI does).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
OUT="${OUT:-$ROOT/gpu_suite_out}"
mkdir -p "$OUT"
RESULTS="$OUT/gpu_suite.txt"
BUDGET="${SUITE_BUDGET:-460}"
CHECK="${SUITE_CHECK:-0}"
PY="${PYTHON:-python3}"
START=$(date +%s)
: > "$RESULTS"
declare -a NAMES STATUS CODES SECS

say() { echo "$*" | tee -a "$RESULTS"; }

# step NAME LIMIT_SECONDS COMMAND...: run with a timeout, append its output to the results file, record it.
step() {
    local name="$1" limit="$2"
    shift 2
    if [[ -n "${SUITE_STEPS:-}" && ",$SUITE_STEPS," != *",$name,"* ]]; then
        return 0
    fi
    local left=$(( BUDGET - ($(date +%s) - START) ))
    NAMES+=("$name")
    if (( left < 10 )); then
        STATUS+=("SKIPPED (no time left)"); CODES+=("-"); SECS+=(0)
        say "=== $name: SKIPPED, ${left}s of the ${BUDGET}s budget left"
        return 0
    fi
    (( limit > left )) && limit=$left
    say ""
    say "=== $name (limit ${limit}s): $*"
    local t0=$(date +%s) rc
    if [[ "$CHECK" == 1 ]]; then
        DDM_ARGCHECK=1 "$@" >>"$RESULTS" 2>&1
        rc=$?
    elif declare -F "$1" >/dev/null; then  # a function of this script: no timeout(1) for it
        "$@" 2>&1 | tee -a "$RESULTS" | tail -n 40
        rc=${PIPESTATUS[0]}
    else
        timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$RESULTS" | tail -n 40
        rc=${PIPESTATUS[0]}
    fi
    local dt=$(( $(date +%s) - t0 ))
    SECS+=("$dt"); CODES+=("$rc")
    if (( rc == 0 )); then
        STATUS+=("ok")
    elif (( rc == 124 || rc == 137 )); then
        STATUS+=("FAILED: timed out")
        say "!!! $name TIMED OUT after ${dt}s (limit ${limit}s)"
    else
        STATUS+=("FAILED")
        say "!!! $name FAILED with exit code $rc after ${dt}s; last lines above and in $RESULTS"
    fi
}

# ------------------------------------------------------------------------------------------- set-up
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
export DDM_DATA_ROOT="${DDM_DATA_ROOT:-$ROOT/.gpu/data}"
export CUBLAS_WORKSPACE_CONFIG="${CUBLAS_WORKSPACE_CONFIG:-:4096:8}"  # before any process touches cuBLAS
export MPLBACKEND=Agg

say "ddm_hpc GPU suite, $(date -u +%FT%TZ), git $(git rev-parse --short HEAD 2>/dev/null || echo '?'), budget ${BUDGET}s"
if [[ "$CHECK" != 1 ]]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1 | tee -a "$RESULTS"
fi

install_wheels() {
    if ! ls "$ROOT"/.gpu/wheels/*.whl >/dev/null 2>&1; then
        echo "no wheels in .gpu/wheels: run benchmarks/gpu_prepare.sh here first and carry .gpu"
        return 1
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$ROOT"/.gpu/wheels/*.whl || return 1
    "$PY" - <<'PYEOF'
import torch, triton, faiss, submitit, trak, h5py, yaml
print(f"python ok: torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, "
      f"faiss {faiss.__version__} ({faiss.get_num_gpus() if hasattr(faiss, 'get_num_gpus') else 0} GPUs), "
      f"cuda available {torch.cuda.is_available()}"
      + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))
assert torch.cuda.is_available(), "torch sees no GPU"
PYEOF
}
if [[ "$CHECK" == 1 ]]; then
    step install 60 test -f "$ROOT/benchmarks/gpu_prepare.sh"
else
    step install 60 install_wheels
fi

XDIST=""
if [[ "$CHECK" != 1 ]] && "$PY" -c "import xdist" 2>/dev/null; then XDIST="-n 8"; fi  # compiles in parallel
FAISS_GPU=$("$PY" -c "import faiss; print(int(faiss.get_num_gpus() > 0))" 2>/dev/null || echo 0)
GLOBAL_K=$([[ "$FAISS_GPU" == 1 ]] && echo 10000 || echo 0)  # 1.28 M x 10 000 k-means: GPU only

# ------------------------------------------------------------------------------------------- tests
if [[ "$CHECK" == 1 ]]; then
    step kernel-tests 120 "$PY" -m pytest --collect-only -q tests/test_kernels tests/test_devices.py
    step gpu-tests 180 "$PY" -m pytest --collect-only -q -m gpu tests
else
    step kernel-tests 120 "$PY" -m pytest -q -rfEs $XDIST --dist load --junitxml="$OUT/pytest_kernels.xml" \
        tests/test_kernels tests/test_devices.py
    # loadfile: a file's tests share one worker, so its module fixture (the CUDA pipeline run) runs once
    step gpu-tests 180 "$PY" -m pytest -q -rfEs $XDIST --dist loadfile --junitxml="$OUT/pytest_gpu.xml" -m "gpu or not gpu" \
        tests/test_gpu_pipeline.py tests/test_gpu_speedup.py \
        tests/test_launch.py::test_merged_artifacts_bit_identical_for_1_3_7_shards
fi

# ------------------------------------------------------------------------------------------- benchmarks
step matching-loss 70 "$PY" benchmarks/bench_matching_loss.py --models convnet,resnet18 --ks 10,100 \
    --csv "$OUT/matching_loss.csv"
step matching-loss-tile2048 30 env DDM_MATCHING_TILE=2048 "$PY" benchmarks/bench_matching_loss.py \
    --models convnet,resnet18 --ks 100 --providers triton --csv "$OUT/matching_loss.csv"
step speedup-gpu 120 "$PY" benchmarks/speedup_vs_retraining.py --size gpu --device cuda --data-root "$DDM_DATA_ROOT"
step finetune 60 "$PY" benchmarks/bench_finetune.py --perturbations 128 --device cuda
step clustering 70 "$PY" benchmarks/bench_clustering.py --global-k "$GLOBAL_K" --sklearn-classes 5 --device auto
step group-grads 25 "$PY" benchmarks/bench_group_grads.py --clusters 100 --per-cluster 64 --width 32 128 --device cuda

# ------------------------------------------------------------------------------------------- summary
total=$(( $(date +%s) - START ))
say ""
say "=== summary ($(date -u +%FT%TZ), ${total}s of ${BUDGET}s; full output in $RESULTS)"
say "$(printf '%-24s %-26s %5s %6s' step status rc seconds)"
failed=0
for i in "${!NAMES[@]}"; do
    say "$(printf '%-24s %-26s %5s %6s' "${NAMES[$i]}" "${STATUS[$i]}" "${CODES[$i]}" "${SECS[$i]}")"
    [[ "${STATUS[$i]}" != ok ]] && failed=$(( failed + 1 ))
done
say "$failed of ${#NAMES[@]} steps not ok"
exit $(( failed > 0 ))
