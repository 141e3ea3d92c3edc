"""The pipeline on a real single-node SLURM cluster, as job arrays, against the local executor.

Run just these with ``pytest -m slurm``. The cluster: ``SLURM_CONF`` if it already points at a
running one, else ``.ci/slurm-up.sh`` starts one (munged, slurmctld, slurmd on 127.0.0.1) and
``.ci/slurm-down.sh`` stops it afterwards. If SLURM is installed (or ``DDM_REQUIRE_SLURM=1``, as
``.ci/run`` sets) and the daemons cannot start, the tests fail with the daemons' log tails; only
on a machine without SLURM and without that variable are they skipped.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from ddm_hpc.config import Config
from ddm_hpc.errors import StageError
from ddm_hpc.launch import run_sharded
from ddm_hpc.storage import artifact_path

from test_launch import assert_identical, toy_merge, toy_task

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parents[1]
STAGES = ("train", "cluster", "distill", "attribute")


def _cluster_up() -> bool:
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and any(s.startswith(("idle", "mix", "alloc")) for s in out.stdout.split())


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """A running SLURM cluster for this module (started here if needed, stopped afterwards)."""
    if os.environ.get("SLURM_CONF") and _cluster_up():
        yield os.environ["SLURM_CONF"]
        return
    required = os.environ.get("DDM_REQUIRE_SLURM") == "1"
    if shutil.which("slurmctld") is None and not required:
        pytest.skip("SLURM is not installed (apt-get install slurm-wlm munge, or set DDM_REQUIRE_SLURM=1 to have "
                    ".ci/slurm-up.sh install it)")
    ports = []
    for _ in range(2):  # free ports: another test cluster on this machine must not collide
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
    env = {**os.environ, "DDM_SLURM_DIR": str(tmp_path_factory.mktemp("slurm-daemons")),
           "DDM_SLURMCTLD_PORT": str(ports[0]), "DDM_SLURMD_PORT": str(ports[1])}
    t0 = time.perf_counter()
    res = subprocess.run([str(REPO / ".ci" / "slurm-up.sh")], capture_output=True, text=True, env=env, timeout=600)
    if res.returncode != 0:
        pytest.fail(f"could not start the test SLURM cluster:\n{res.stderr[-6000:]}", pytrace=False)
    conf = res.stdout.strip().rsplit("=", 1)[-1]
    print(f"SLURM cluster up in {time.perf_counter() - t0:.1f} s ({conf})")
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    try:
        yield conf
    finally:
        subprocess.run([str(REPO / ".ci" / "slurm-down.sh")], env=env, timeout=60)
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "ddm_hpc.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


def test_pipeline_on_slurm_equals_local(slurm_cluster, tmp_path, mnist_root):
    """`ddm-hpc run --executor slurm` (train/cluster jobs, distill/attribute arrays) == the local run."""
    common = ["--preset", "smoke", "--data-root", str(mnist_root), "--distill-steps", "3", "--group-chunk", "4",
              "--batch-models", "4",
              "--no-progress"]
    local = _cli(["run", *common, "--out", str(tmp_path / "local")], REPO)
    assert local.returncode == 0, local.stderr[-3000:]
    t0 = time.perf_counter()
    slurm = _cli(["run", *common, "--out", str(tmp_path / "slurm"), "--executor", "slurm", "--profile",
                  str(REPO / "slurm" / "local-test.yaml"), "--shards", "3"], REPO)
    seconds = time.perf_counter() - t0
    assert slurm.returncode == 0, slurm.stderr[-4000:]
    print(f"pipeline on SLURM: {seconds:.1f} s")
    assert "as SLURM array" in slurm.stderr and "afterok" in slurm.stderr
    for stage in STAGES:
        assert_identical(artifact_path(tmp_path / "local", stage), artifact_path(tmp_path / "slurm", stage))
    logs = tmp_path / "slurm" / "logs"
    assert any(logs.glob("distill/*/*_log.out")), "submitit's per-task logs are kept under RUN/logs"
    status = _cli(["status", str(tmp_path / "slurm")], REPO)
    assert status.returncode == 0 and "attribution.h5   complete" in status.stdout

    # diagnose: its exact retrainings as a SLURM array (pickled task, data loaded in the task) == local
    diag = ["diagnose", "--tasks", "unlearn", "--unlearn-clusters", "2", "--no-progress"]
    local = _cli([*diag, "--out", str(tmp_path / "local")], REPO)
    assert local.returncode == 0, local.stderr[-3000:]
    slurm = _cli([*diag, "--out", str(tmp_path / "slurm"), "--executor", "slurm", "--profile",
                  str(REPO / "slurm" / "local-test.yaml")], REPO)
    assert slurm.returncode == 0, slurm.stderr[-4000:]
    assert "diagnose-unlearn" in slurm.stderr and "as SLURM array" in slurm.stderr
    with h5py.File(tmp_path / "local" / "diagnose" / "unlearn.h5") as a, \
            h5py.File(tmp_path / "slurm" / "diagnose" / "unlearn.h5") as b:
        keys = ["clusters"]
        a["single"].visit(lambda k: keys.append(f"single/{k}") if isinstance(a["single"][k], h5py.Dataset) else None)
        assert len(keys) > 10
        for key in keys:  # exact retrainings (SLURM array) and the in-process unlearning against them
            np.testing.assert_array_equal(a[key][()], b[key][()])


def test_failed_array_task_reported_with_log_and_rerun_completes(slurm_cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("DDM_TEST_FAIL", "1")  # sbatch exports the environment to the tasks
    cfg = Config.from_dict({"runtime": {"out": str(tmp_path), "executor": "slurm", "shards": 3, "progress": False,
                                        "profile": str(REPO / "slurm" / "local-test.yaml")}})
    with pytest.raises(StageError) as err:
        run_sharded("toy", cfg, toy_task, 20, toy_merge, stage="train")
    msg = str(err.value)
    assert "\n" not in msg and "1 of 3 shard tasks failed (shards 1)" in msg and "planted failure" in msg
    log_file = Path(msg.split("(log: ")[1].split(")")[0])
    assert log_file.is_file() and "planted failure in shard 1" in log_file.read_text()
    monkeypatch.delenv("DDM_TEST_FAIL")
    (tmp_path / "calls.txt").unlink()
    path = run_sharded("toy", cfg, toy_task, 20, toy_merge, stage="train")
    assert (tmp_path / "calls.txt").read_text().split() == ["1"]  # only the failed shard ran again
    np.testing.assert_array_equal(np.load(path), np.arange(20) ** 2)
