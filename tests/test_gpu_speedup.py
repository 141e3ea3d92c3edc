"""benchmarks/speedup_vs_retraining.py --quick on a CUDA GPU (marker ``gpu``; skipped without one). Reads MNIST from
``DDM_DATA_ROOT``."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.gpu
@pytest.mark.slow
def test_speedup_benchmark_quick_on_cuda(mnist_root):
    """benchmarks/speedup_vs_retraining.py --quick on the GPU: runs, and DDM's online attribution beats K exact
    retrainings."""
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "speedup_vs_retraining.py"), "--quick",
                          "--device", "cuda", "--data-root", str(mnist_root)], capture_output=True, text=True,
                         check=False, cwd=REPO, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("speedup online"))
    assert float(line.split()[2].rstrip("x;")) > 1.0, line
