"""Extension points used from the user's own files: an attribution method in one file (scored, reported, plotted
with nothing else edited) and a model factory named by path (built in worker processes too)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from ddm_hpc.cli import main
from ddm_hpc.methods import REGISTRY

PLUGINS = Path(__file__).resolve().parent / "plugins"


@pytest.fixture
def toy_method():
    """The plugin's registration is undone afterwards, so other tests see only the built-in methods."""
    yield PLUGINS / "toy_method.py"
    REGISTRY.pop("toy", None)


def test_a_method_in_one_file_is_scored_reported_and_plotted(tmp_path, mnist_root, capsys, toy_method):
    out = tmp_path / "run"
    args = ["evaluate", "--preset", "smoke", "--plugins", str(toy_method), "--methods", "toy,random", "--n-masks", "4",
            "--noise-seeds", "0", "--data-root", str(mnist_root), "--out", str(out), "--no-progress"]
    assert main(args) == 0
    shown = capsys.readouterr().out
    assert "Toy (nearest mean image)" in shown  # the show table lists it
    with h5py.File(out / "evaluation.h5") as f:
        g = f["methods/toy"]
        scores = g["scores"][()]
        assert scores.shape == (3, 30) and g.attrs["label"] == "Toy (nearest mean image)"
        assert np.isfinite([g.attrs[m] for m in ("dist1", "dist2", "dist3", "lds")]).all()
        qpos = f["query_position"][()]
    # the scores are the plugin's own computation, recomputed here from the run's data and clusters
    from ddm_hpc.config import Config
    from ddm_hpc.context import RunContext
    from ddm_hpc.data import dense

    ctx = RunContext(Config.from_dict({**__import__("json").loads((out / "config.json").read_text()),
                                       "runtime": {"out": str(out)}}))
    x = dense(ctx.bundle.x_train).flatten(1).double()
    means = torch.stack([x[ctx.assignment == c].mean(0) for c in range(ctx.k)])
    want = -torch.cdist(ctx.bundle.x_test[torch.from_numpy(qpos)].flatten(1).double(), means).float()
    torch.testing.assert_close(torch.from_numpy(scores), want, rtol=1e-5, atol=1e-5)
    report = (out / "report.md").read_text()
    assert "| Toy (nearest mean image) |" in report and "(scatter_toy.png)" in report
    assert (out / "scatter_toy.png").stat().st_size > 0
    # the report is rebuilt from evaluation.h5 alone, in a process that never imports the plugin
    (out / "report.md").unlink()
    res = subprocess.run([sys.executable, "-m", "ddm_hpc.report", str(out / "evaluation.h5")], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr
    assert "| Toy (nearest mean image) |" in (out / "report.md").read_text()


def test_an_unregistered_method_names_the_plugins_option(tmp_path, capsys):
    assert main(["evaluate", "--methods", "toy,ddm", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ddm-hpc: error: --methods") and "'toy'" in err and "--plugins" in err
    assert len(err.splitlines()) == 1 and not any(tmp_path.iterdir())


def test_a_model_factory_by_path_builds_in_worker_processes(tmp_path, mnist_root, monkeypatch):
    import os

    from ddm_hpc.utils import import_object

    spec = f"{PLUGINS / 'toy_model.py'}:factory"
    pids = tmp_path / "pids.txt"
    monkeypatch.setenv("DDM_TOY_MODEL_PIDS", str(pids))  # spawned workers inherit it
    out = tmp_path / "run"
    args = ["run", "--preset", "smoke", "--model", spec, "--model-args", '{"width": 6}', "--shards", "2",
            "--workers", "2", "--data-root", str(mnist_root), "--out", str(out), "--no-progress"]
    assert main(args) == 0
    model = import_object(spec, "--model")(1, 10, (28, 28), width=6)
    with h5py.File(out / "train.h5") as f:
        assert [n.decode() for n in f["params/name"][()]] == [n for n, _ in model.named_parameters()]
    with h5py.File(out / "synsets.h5") as f:
        assert f["cluster/images"].shape[0] == 30 and f.attrs["n_shards"] == 2
    with h5py.File(out / "attribution.h5") as f:
        assert f["scores"].shape == (3, 30)
    workers = set(pids.read_text().split()) - {str(os.getpid())}
    assert len(workers) >= 2  # the distill and attribute shards built the model in other processes


def test_bad_model_factories_are_one_line_errors(tmp_path, mnist_root, capsys):
    common = ["train", "--preset", "smoke", "--data-root", str(mnist_root), "--out", str(tmp_path / "r"), "--no-progress"]
    for spec, words in ((f"{PLUGINS / 'toy_model.py'}:not_a_model", "not an nn.Module"),
                        (f"{PLUGINS / 'missing.py'}:factory", "cannot be loaded"),
                        ("toy_model.py", "unknown model")):
        assert main([*common, "--model", spec]) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("ddm-hpc: error:") and words in last, last
    assert not (tmp_path / "r" / "train.h5").exists()
