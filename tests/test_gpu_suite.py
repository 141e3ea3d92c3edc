"""benchmarks/gpu_suite.sh without a GPU: every step's command exists and each benchmark accepts the flags the suite
passes (``SUITE_CHECK=1``: benchmarks parse their arguments and return, tests are only collected), a failing step is
reported and the next one still runs, and steps past the time budget are listed as skipped. A session that is lent
a GPU then spends its minutes measuring, not fixing the script."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "benchmarks" / "gpu_suite.sh"
BENCHMARKS = ("bench_matching_loss.py", "speedup_vs_retraining.py", "bench_finetune.py", "bench_clustering.py",
              "bench_group_grads.py")


def _suite(tmp_path: Path, **env: str) -> tuple[int, str, str]:
    full = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "SUITE_CHECK": "1", **env}
    res = subprocess.run(["bash", str(SUITE)], capture_output=True, text=True, env=full, timeout=300, check=False)
    return res.returncode, res.stdout, (tmp_path / "gpu_suite.txt").read_text()


def test_every_step_parses_without_a_gpu(tmp_path):
    rc, out, results = _suite(tmp_path)
    assert rc == 0, out[-3000:]
    for name in BENCHMARKS:
        assert f"{name}: arguments ok" in results, f"{name} rejected the suite's flags:\n{results[-3000:]}"
    assert "tests collected" in results and "0 of 9 steps not ok" in out
    summary = out[out.index("=== summary"):]
    for step in ("install", "kernel-tests", "gpu-tests", "matching-loss", "speedup-gpu", "finetune", "clustering",
                 "group-grads"):
        assert step in summary


def test_a_failing_step_is_loud_and_the_next_one_runs(tmp_path):
    rc, out, results = _suite(tmp_path, PYTHON="false", SUITE_STEPS="matching-loss,finetune")
    assert rc == 1
    assert "!!! matching-loss FAILED with exit code 1" in out and "!!! finetune FAILED with exit code 1" in out
    assert "2 of 2 steps not ok" in out and "2 of 2 steps not ok" in results


def test_steps_past_the_budget_are_skipped(tmp_path):
    rc, out, _ = _suite(tmp_path, SUITE_BUDGET="5", SUITE_STEPS="finetune,clustering")
    assert rc == 1 and out.count("SKIPPED (no time left)") == 2
