"""Kill-and-resume at fixed points of each long stage (the quick form of ``benchmarks/fault_injection.py``).

SIGKILL of the stage's whole process group at a fixed fraction of its uninterrupted work (after start-up), then the
same command again: every artifact equals the uninterrupted run's (datasets bit for bit)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import fault_injection as fi

STAGES = ("train", "distill", "attribute", "evaluate")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, mnist_root):
    work = tmp_path_factory.mktemp("faults")
    return work, *fi.reference(work, str(mnist_root), STAGES)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("fraction", [0.6])
def test_kill_then_rerun_gives_the_uninterrupted_artifacts(reference, mnist_root, stage, fraction):
    work, ref, before, seconds = reference
    res = fi.StageResult(stage)
    startup, wall = seconds[stage]
    fi.kill_and_resume(stage, ref, before[stage], startup + fraction * (wall - startup), work / f"{stage}-trial",
                       str(mnist_root), res)
    assert not res.failures, res.failures
    assert res.matched == 1
