"""The train stage resumes after a kill and finishes bit-identical to an uninterrupted run (CPU)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from ddm_hpc import train
from ddm_hpc.config import Config
from ddm_hpc.train import ResumeFiles, resume_dir


def _cfg(out, mnist_root, **train_opts):
    return Config.from_dict({"data": {"n_train": 200, "n_test": 50, "data_root": str(mnist_root)},
                             "model": {"width": 4},
                             "train": {"epochs": 4, "batch_size": 64, **train_opts},
                             "runtime": {"out": str(out), "progress": False}})


def _datasets(path):
    with h5py.File(path) as f:
        out = {}
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
        return out


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


class Killed(Exception):
    pass


@pytest.mark.parametrize("kill_after", [1, 3])
def test_training_resumes_bit_identically(tmp_path, mnist_root, monkeypatch, kill_after):
    ref = tmp_path / "ref"
    train.run(_cfg(ref, mnist_root, save_every=2))
    want = _datasets(ref / "train.h5")
    assert not resume_dir(ref).exists()  # cleaned up once train.h5 is written

    out = tmp_path / "killed"
    real_save = ResumeFiles.save
    seen = []

    def dying_save(self, st):
        real_save(self, st)
        seen.append(st.epoch)
        if st.epoch == kill_after:
            raise Killed  # the process dies right after a checkpoint

    monkeypatch.setattr(ResumeFiles, "save", dying_save)
    with pytest.raises(Killed):
        train.run(_cfg(out, mnist_root, save_every=2))
    assert not (out / "train.h5").exists() and (resume_dir(out) / "state.pt").exists()
    seen.clear()
    train.run(_cfg(out, mnist_root, save_every=2))
    assert seen == list(range(kill_after + 1, 5))  # only the missing epochs ran
    _same(_datasets(out / "train.h5"), want)


def test_resume_state_of_another_config_or_corrupt_is_ignored(tmp_path, mnist_root, monkeypatch, caplog):
    out = tmp_path / "run"
    monkeypatch.setattr(ResumeFiles, "clear", lambda self: None)  # keep the state of a finished run
    train.run(_cfg(out, mnist_root, lr=0.02))
    monkeypatch.undo()
    (out / "train.h5").unlink()
    ref = tmp_path / "ref"
    train.run(_cfg(ref, mnist_root))
    with caplog.at_level("WARNING"):
        train.run(_cfg(out, mnist_root))  # other lr: the saved state is not used
    assert "another config" in caplog.text
    _same(_datasets(out / "train.h5"), _datasets(ref / "train.h5"))
    d = resume_dir(out)
    d.mkdir()
    (d / "state.pt").write_bytes(b"not a checkpoint")
    (out / "train.h5").unlink()
    with caplog.at_level("WARNING"):
        train.run(_cfg(out, mnist_root))
    assert "unreadable" in caplog.text
    _same(_datasets(out / "train.h5"), _datasets(ref / "train.h5"))


def test_sigkill_during_training_then_rerun(tmp_path, mnist_root):
    """A real SIGKILL of ``ddm-hpc train`` once an epoch state exists; the rerun matches an uninterrupted run."""
    args = ["--n-train", "300", "--n-test", "50", "--width", "8", "--epochs", "12", "--batch-size", "32",
            "--data-root", str(mnist_root), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "ddm_hpc.cli", "train", *args]
    ref, out = tmp_path / "ref", tmp_path / "killed"
    subprocess.run([*cmd, "--out", str(ref)], check=True, env=env, capture_output=True)
    proc = subprocess.Popen([*cmd, "--out", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (resume_dir(out) / "row_000002.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    killed = proc.poll() is None
    if killed:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    if not killed:
        pytest.skip("training finished before it could be killed")
    assert not (out / "train.h5").exists()
    subprocess.run([*cmd, "--out", str(out)], check=True, env=env, capture_output=True)
    _same(_datasets(out / "train.h5"), _datasets(ref / "train.h5"))
