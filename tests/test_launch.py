"""Job layer: shard ranges, sharded distill/attribute equal for any shard count, crash safety,
failure reporting and resume, executors, SLURM parameters and the generated sbatch golden file."""
from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from ddm_hpc import launch
from ddm_hpc.config import Config, smoke_preset, merge
from ddm_hpc.errors import StageError
from ddm_hpc.launch import run_sharded, shard_path, shard_range, slurm_parameters
from ddm_hpc.storage import artifact_path

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "slurm" / "golden"
# Provenance attrs that legitimately differ between two runs of the same config.
VOLATILE_ATTRS = {"uid", "created", "seconds", "upstream", "git_revision", "n_shards", "seconds_flat", "sha256",
                  "seconds_hierarchical"}


# ----------------------------------------------------------------------------- helpers
def h5_contents(path: Path) -> dict[str, object]:
    """Every dataset (name -> array) and every non-volatile attribute of an HDF5 file."""
    out: dict[str, object] = {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                out[name] = obj[()]
            for k, v in obj.attrs.items():
                if k not in VOLATILE_ATTRS:
                    out[f"{name}@{k}"] = v
        visit("", f)
        f.visititems(visit)
    return out


def assert_identical(a: Path, b: Path) -> None:
    """Bit-identical datasets (values, dtypes, shapes) and equal attrs."""
    ca, cb = h5_contents(a), h5_contents(b)
    assert ca.keys() == cb.keys(), sorted(ca.keys() ^ cb.keys())
    for k in ca:
        va, vb = np.asarray(ca[k]), np.asarray(cb[k])
        assert va.dtype == vb.dtype and va.shape == vb.shape, k
        assert np.array_equal(va, vb, equal_nan=va.dtype.kind == "f"), f"{k} differs between {a} and {b}"


def smoke_config(mnist_root: Path, out: Path, **runtime) -> Config:
    d = merge(Config().to_dict(), smoke_preset())
    d = merge(d, {"data": {"data_root": str(mnist_root)}, "distill": {"distill_steps": 3, "group_chunk": 4},
                  "attribute": {"batch_models": 4},
                  "runtime": {"out": str(out), "progress": False, **runtime}})
    return Config.from_dict(d)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, mnist_root) -> Path:
    """A smoke run's train + cluster artifacts, copied by each test that needs them."""
    from ddm_hpc.pipeline import run_stages

    out = tmp_path_factory.mktemp("base") / "run"
    run_stages(smoke_config(mnist_root, out), ("train", "cluster"))
    return out


def copy_run(base: Path, dest: Path) -> Path:
    shutil.copytree(base, dest)
    return dest


# ----------------------------------------------------------------------------- shard ranges
@pytest.mark.parametrize("n", [0, 1, 2, 7, 10, 31, 100])
@pytest.mark.parametrize("n_shards", [1, 2, 3, 7, 16])
def test_shard_ranges_cover_every_item_exactly_once(n, n_shards):
    seen = []
    for s in range(n_shards):
        i0, i1 = shard_range(n, s, n_shards)
        assert 0 <= i0 <= i1 <= n
        assert i1 - i0 in (n // n_shards, -(-n // n_shards))  # balanced
        seen += range(i0, i1)
    assert seen == list(range(n))


def test_resolve_shards_caps_at_items(tmp_path, caplog):
    cfg = Config.from_dict({"runtime": {"out": str(tmp_path), "shards": 7}})
    with caplog.at_level("INFO", logger="ddm_hpc.launch"):
        assert launch.resolve_shards(cfg, 3, "distill") == 3
    assert caplog.messages == ["distill: --shards 7, but only 3 work item(s) to share out: running 3 shard(s)"]
    assert launch.resolve_shards(cfg, 0) == 1
    assert launch.resolve_shards(cfg, 100) == 7


# ----------------------------------------------------------------------------- real stages
def test_distill_groups_subset_equals_full_run(base_run, mnist_root):
    """A block's synsets do not depend on which other blocks are distilled with it."""
    from ddm_hpc.cluster import read_clusters
    from ddm_hpc.distill import distill_groups, influence_spec
    from ddm_hpc.context import load_data
    from ddm_hpc.models import build_target
    from ddm_hpc.trajectory import TrajectoryReader

    cfg = smoke_config(mnist_root, base_run)
    bundle = load_data(cfg)
    reader = TrajectoryReader(artifact_path(base_run, "train"))
    model = build_target(cfg, bundle)
    assignment, cclass = read_clusters(base_run)
    args = (model, reader, bundle.x_train, bundle.y_train, torch.from_numpy(assignment), torch.from_numpy(cclass),
            cfg.distill, 5, torch.device("cpu"))
    influence = influence_spec(cfg, len(bundle.y_train))  # the default target; its solve is per block too
    full = distill_groups(*args, show_progress=False, influence=influence)
    part = distill_groups(*args, show_progress=False, group_ids=torch.tensor([4, 5, 6, 7]), influence=influence)
    assert torch.equal(full.images[4:8], part.images)
    np.testing.assert_array_equal(full.group_history[4:8], part.group_history)
    np.testing.assert_array_equal(full.final_loss[4:8], part.final_loss)
    assert not torch.equal(full.images[4], full.images[5])  # the groups really differ


def test_merged_artifacts_bit_identical_for_1_3_7_shards(base_run, tmp_path, mnist_root):
    """distill + attribute (flat and hierarchical) give the same files for 1, 3 and 7 shards.

    Promised bit for bit on every device this runs on (``--device auto``): the CPU, and a CUDA GPU with
    ``--deterministic`` (the default; README "Determinism"): each block is computed the same way in any shard."""
    from ddm_hpc.pipeline import run_stages

    runs = {}
    for n in (1, 3, 7):
        out = copy_run(base_run, tmp_path / f"s{n}")
        run_stages(smoke_config(mnist_root, out, shards=n), ("distill", "attribute"))
        runs[n] = out
        assert not (out / "shards").exists(), "shards are removed once the artifact is merged"
    for stage in ("distill", "attribute"):
        for n in (3, 7):
            assert_identical(artifact_path(runs[1], stage), artifact_path(runs[n], stage))
    with h5py.File(artifact_path(runs[7], "distill")) as f:
        assert f["cluster/images"].shape[0] == 30 and f["class/images"].shape[0] == 10
    with h5py.File(artifact_path(runs[7], "attribute")) as f:
        assert f["scores"].shape == (3, 30) and np.isfinite(f["scores"][()]).all()
        assert "hierarchy/cluster" in f


def test_killed_task_leaves_no_complete_shard_and_rerun_finishes_identically(base_run, tmp_path, mnist_root):
    """SIGKILL in the middle of writing shard 1: shard 0 kept, shard 1 not counted; rerun equals a clean run."""
    # the reference runs in a subprocess with the same thread count: float reductions depend on it
    ref = copy_run(base_run, tmp_path / "ref")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "ddm_hpc.cli", "distill", "--out", str(ref), "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = copy_run(base_run, tmp_path / "crash")
    cmd = [sys.executable, "-m", "ddm_hpc.cli", "distill", "--out", str(out), "--shards", "3", "--no-progress"]
    env = {**env, launch.CRASH_ENV: "distill:1"}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    key = launch.shard_key(smoke_config(mnist_root, out.resolve()), "distill")
    s0, s1 = (shard_path(out.resolve(), "distill", s, 3) for s in (0, 1))
    assert launch.shard_done(s0, key, 3)
    assert not s1.exists() and not launch.shard_done(s1, key, 3)
    assert list(s1.parent.glob(f".{s1.name}.tmp.*")), "the killed task left its temp file, not the shard"
    assert not artifact_path(out, "distill").exists()
    mtime0 = s0.stat().st_mtime_ns
    env.pop(launch.CRASH_ENV)
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "1 of 3 shards already complete" in res.stderr
    assert_identical(artifact_path(ref, "distill"), artifact_path(out, "distill"))
    assert mtime0  # shard 0 was reused, not recomputed (the log line above says so)


# ----------------------------------------------------------------------------- the layer, with a toy task
def toy_task(cfg: Config, shard: int, n_shards: int, fail: tuple[int, ...] = ()) -> dict[str, np.ndarray]:
    """Squares of the shard's items; fails on shards listed in DDM_TEST_FAIL (or ``fail``)."""
    failing = set(fail) | {int(s) for s in os.environ.get("DDM_TEST_FAIL", "").split(",") if s}
    if shard in failing:
        raise ValueError(f"planted failure in shard {shard}")
    i0, i1 = shard_range(20, shard, n_shards)
    counter = Path(cfg.runtime.out) / "calls.txt"
    with counter.open("a") as fh:
        fh.write(f"{shard}\n")
    return {"item": np.arange(i0, i1), "square": np.arange(i0, i1) ** 2}


def toy_merge(cfg: Config, paths: list[Path], **_) -> Path:
    out = Path(cfg.runtime.out) / "toy.npy"
    parts = []
    for p in paths:
        with h5py.File(p, "r") as f:
            parts.append(f["square"][()])
    np.save(out, np.concatenate(parts))
    return out


def toy_cfg(tmp_path: Path, **runtime) -> Config:
    return Config.from_dict({"runtime": {"out": str(tmp_path), "progress": False, **runtime}})


@pytest.mark.parametrize("executor,workers", [("local", 1), ("local", 2), ("debug", 1)])
def test_toy_stage_on_each_executor(tmp_path, executor, workers):
    cfg = toy_cfg(tmp_path, executor=executor, workers=workers, shards=4)
    path = run_sharded("toy", cfg, toy_task, 20, toy_merge, stage="train")
    np.testing.assert_array_equal(np.load(path), np.arange(20) ** 2)
    assert not (tmp_path / "shards").exists()


def worker_task(cfg: Config, shard: int, n_shards: int) -> dict[str, np.ndarray]:
    """The worker index this shard ran under (utils.set_worker_index) and the process id."""
    from ddm_hpc import utils

    return {"worker": np.array(-1 if utils._worker_index is None else utils._worker_index), "pid": np.array(os.getpid())}


def test_workers_get_distinct_indices_for_their_gpus(tmp_path):
    """--workers 2: each process takes its own index 0 or 1 (so --device auto/cuda is cuda:(i % GPUs) there)."""
    cfg = toy_cfg(tmp_path, workers=2, shards=4)
    paths = run_sharded("toy", cfg, worker_task, 4, stage="train")
    by_pid = {}
    for p in paths:
        with h5py.File(p, "r") as f:
            by_pid.setdefault(int(f["pid"][()]), set()).add(int(f["worker"][()]))
    assert all(len(v) == 1 for v in by_pid.values()), by_pid  # one index per process
    indices = sorted(i for v in by_pid.values() for i in v)
    assert set(indices) <= {0, 1} and len(indices) == len(set(indices)), by_pid


def test_failed_shard_reported_others_kept_rerun_redoes_only_missing(tmp_path, monkeypatch):
    cfg = toy_cfg(tmp_path, shards=5)
    monkeypatch.setenv("DDM_TEST_FAIL", "2")
    with pytest.raises(StageError) as err:
        run_sharded("toy", cfg, toy_task, 20, toy_merge, stage="train")
    msg = str(err.value)
    assert "\n" not in msg and "1 of 5 shard tasks failed" in msg and "planted failure in shard 2" in msg
    log_file = tmp_path.resolve() / "logs" / "toy" / "shard-00002-of-00005.log"
    assert str(log_file) in msg and "planted failure" in log_file.read_text()
    assert [launch.shard_done(p, launch.shard_key(launch._absolute(cfg), "train"), 5)
            for p in launch.shard_paths(tmp_path.resolve(), "toy", 5)] == [True, True, False, True, True]
    report = launch.status(tmp_path)
    assert "4 of 5 complete, missing 2" in report and "FAILED shard 2" in report and str(log_file) in report
    monkeypatch.delenv("DDM_TEST_FAIL")
    (tmp_path / "calls.txt").unlink()
    path = run_sharded("toy", cfg, toy_task, 20, toy_merge, stage="train")
    assert (tmp_path / "calls.txt").read_text().split() == ["2"]  # only the missing shard ran again
    np.testing.assert_array_equal(np.load(path), np.arange(20) ** 2)


def test_debug_executor_reports_failures_too(tmp_path, monkeypatch):
    import pdb

    monkeypatch.setattr(pdb, "post_mortem", lambda *a: None)  # the debug executor opens pdb on a failure
    monkeypatch.setenv("DDM_TEST_FAIL", "0,3")
    with pytest.raises(StageError, match=r"2 of 4 shard tasks failed \(shards 0,3\)"):
        run_sharded("toy", toy_cfg(tmp_path, executor="debug", shards=4), toy_task, 20, toy_merge, stage="train")


def test_shards_of_another_config_are_recomputed(tmp_path):
    cfg = toy_cfg(tmp_path, shards=2)
    run_sharded("toy", cfg, toy_task, 20, None, stage="train")
    (tmp_path / "calls.txt").unlink()
    run_sharded("toy", cfg, toy_task, 20, None, stage="train")
    assert not (tmp_path / "calls.txt").exists()  # complete and verified: skipped
    other = dataclasses.replace(cfg, seed=1)
    run_sharded("toy", other, toy_task, 20, None, stage="train")
    assert sorted((tmp_path / "calls.txt").read_text().split()) == ["0", "1"]


def test_corrupt_or_other_schema_shards_are_recomputed_not_merged(tmp_path):
    """A shard whose bytes no longer match its checksum, or one written with another artifact schema, is computed
    again (the trial's NaN shards were merged); --overwrite discards every earlier shard."""
    cfg = toy_cfg(tmp_path, shards=3)
    paths = run_sharded("toy", cfg, toy_task, 20, None, stage="train")
    with h5py.File(paths[0]) as f:
        offset = f["square"].id.get_chunk_info(0).byte_offset
    with open(paths[0], "r+b") as fh:  # a 64-byte overwrite inside shard 0's data
        fh.seek(offset)
        fh.write(b"\x01" * 64)
    with h5py.File(paths[2], "r+") as f:
        f.attrs["schema"] = 99
    (tmp_path / "calls.txt").unlink()
    paths = run_sharded("toy", cfg, toy_task, 20, None, stage="train")
    assert sorted((tmp_path / "calls.txt").read_text().split()) == ["0", "2"]
    with h5py.File(paths[0]) as f:
        assert f["square"][()].tolist() == [i * i for i in range(6)]
    (tmp_path / "calls.txt").unlink()
    run_sharded("toy", dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, overwrite=True)), toy_task,
                20, None, stage="train")
    assert sorted((tmp_path / "calls.txt").read_text().split()) == ["0", "1", "2"]


def test_status_of_a_finished_run(base_run):
    text = launch.status(base_run)
    assert "train.h5" in text and "complete" in text and "synsets.h5" in text and "missing" in text


# ----------------------------------------------------------------------------- SLURM parameters
def test_profile_and_flags_make_submitit_parameters(tmp_path):
    cfg = toy_cfg(tmp_path, profile=str(REPO / "slurm" / "gpu-cluster.yaml"), slurm_mem_gb=48.0,
                  slurm_extra="reservation=abc;exclusive")
    p = slurm_parameters(cfg)
    assert p["mem_gb"] == 48.0  # flag wins
    assert p["slurm_partition"] == "gpu" and p["slurm_gpus_per_task"] == 1
    assert p["slurm_additional_parameters"]["reservation"] == "abc"
    assert p["slurm_additional_parameters"]["exclusive"] is True


def test_unknown_profile_key_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("partiton: gpu\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['partiton'\]"):
        slurm_parameters(toy_cfg(tmp_path, profile=str(bad)))


@pytest.mark.parametrize("profile", ["gpu-cluster", "local-test"])
def test_generated_sbatch_matches_golden_file(profile, monkeypatch):
    """The sbatch script submitit writes for a 7-task array from each profile."""
    from submitit.slurm.slurm import SlurmExecutor

    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 2))  # pretend srun exists
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    cfg = toy_cfg(Path("/shared/runs/example"), profile=str(REPO / "slurm" / f"{profile}.yaml"))
    ex = launch.make_executor(Path("/shared/runs/example/logs/distill"), slurm_parameters(cfg), "ddm-distill")
    ex._executor.python = "/opt/venv/bin/python"
    ex._executor.parameters["map_count"] = 7
    text = ex._executor._make_submission_file_text(ex._executor._submitit_command_str, "uid")
    golden = GOLDEN / f"{profile}.sbatch"
    if os.environ.get("DDM_UPDATE_GOLDEN") == "1":
        golden.write_text(text)
    assert text == golden.read_text(), f"regenerate with DDM_UPDATE_GOLDEN=1 if the change is intended:\n{text}"


def test_slurm_executor_without_sbatch_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ValueError, match=r"sbatch/srun not found on PATH.*--executor local$"):
        run_sharded("toy", toy_cfg(tmp_path, executor="slurm", shards=2), toy_task, 20, toy_merge, stage="train")


def test_overwrite_discards_complete_shards_of_an_earlier_run(tmp_path):
    """--overwrite recomputes whatever exists: complete shards with the current key are not reused (their key
    cannot see an upstream file corrupted and restored in between); without it they are (resume)."""
    cfg = toy_cfg(tmp_path, shards=2)
    run_sharded("toy", cfg, toy_task, 20, None, stage="train")
    (tmp_path / "calls.txt").unlink()
    run_sharded("toy", cfg, toy_task, 20, None, stage="train")
    assert not (tmp_path / "calls.txt").exists()
    again = dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, overwrite=True))
    run_sharded("toy", again, toy_task, 20, None, stage="train")
    assert sorted((tmp_path / "calls.txt").read_text().split()) == ["0", "1"]
