#!/usr/bin/env bash
# Prepare .gpu/ (ignored by git) for benchmarks/gpu_suite.sh on a lent GPU machine, which reaches no registry:
#   .gpu/wheels/  the Python packages that machine lacks, as wheels for its Python (3.12, x86-64 manylinux)
#   .gpu/data/    MNIST (MNIST/raw/*-ubyte, 21 MB) for the pipeline tests and the speedup benchmark
# Run here, on a machine with pip and ../shared/data, from the repository root:
#   bash benchmarks/gpu_prepare.sh            # then, with the device tool: carry [".gpu"],
#                                             # command: bash benchmarks/gpu_suite.sh, timeout_s 540
# Versions come from constraints.txt. What the GPU image already has (torch, triton, numpy, h5py, PyYAML,
# tqdm, matplotlib, scikit-learn, pytest, pytest-xdist, cloudpickle, typing_extensions, packaging) is not
# carried. faiss-gpu is not carried either: its wheel alone is 135 MB (plus its CUDA 12 runtime and cuBLAS
# wheels), over the 64 MiB a call may carry; faiss-cpu goes instead and the GPU k-means test skips, saying so.
# Environment: DDM_DATA_ROOT (default ../shared/data), PY_VERSION (default 3.12), PIP (default: python3 -m pip).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_ROOT="${DDM_DATA_ROOT:-../shared/data}"
PY_VERSION="${PY_VERSION:-3.12}"
PIP="${PIP:-python3 -m pip}"
pin() { grep -E "^$1==" constraints.txt | head -1; }

rm -rf .gpu && mkdir -p .gpu/wheels .gpu/data/MNIST
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
$PIP download --quiet --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp "${plat[@]}" \
    -d .gpu/wheels "$(pin faiss-cpu)" "$(pin submitit)"
$PIP wheel --quiet --no-deps -w .gpu/wheels "$(pin traker)"   # an sdist only: pure Python, built here
cp -r "$DATA_ROOT/MNIST/raw" .gpu/data/MNIST/raw

ls -l .gpu/wheels
tree_bytes=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
carry_bytes=$(du -sb .gpu | cut -f1)
total=$(( tree_bytes + carry_bytes ))
echo "working tree $(( tree_bytes >> 20 )) MiB + .gpu $(( carry_bytes >> 20 )) MiB = $(( total >> 20 )) MiB (limit 64 MiB a call)"
if (( total > 62 * 1024 * 1024 )); then
    echo "gpu_prepare: over the carry limit: drop something from .gpu" >&2
    exit 1
fi
echo 'ready: device run with carry [".gpu"] and command "bash benchmarks/gpu_suite.sh" (timeout_s 540)'
