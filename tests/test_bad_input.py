"""Bad input fails in one line, with exit code 2, naming the problem and the fix, and writes nothing.

Each case: (id, files to write, command-line arguments, a fragment the message must hold). The cases
fail on the behaviour before they were fixed (a TypeError traceback, a crash in training, or a
message blaming the learning rate)."""
from __future__ import annotations

import numpy as np
import pytest

from ddm_hpc.cli import main


def _nan_npz(path):
    x = np.random.default_rng(0).random((300, 8, 8), dtype=np.float32)
    x[7, 2, 3] = np.nan
    np.savez(path, x=x, y=np.arange(300) % 3)


CASES = [
    ("config: a word for an integer", {"c.yaml": 'train:\n  epochs: "ten"\n'}, ["--config", "{c.yaml}"],
     "--epochs must be an integer, got 'ten'"),
    ("config: a fraction for an integer", {"c.yaml": "train:\n  epochs: 2.5\n"}, ["--config", "{c.yaml}"],
     "--epochs must be an integer, got 2.5"),
    ("config: a list for a number", {"c.json": '{"train": {"lr": [0.1]}}'}, ["--config", "{c.json}"],
     "--lr must be a number"),
    ("config: a string for a switch", {"c.json": '{"evaluate": {"plots": "no"}}'}, ["--config", "{c.json}"],
     "--plots must be true or false"),
    ("config: a word for the seed", {"c.json": '{"seed": "zero"}'}, ["--config", "{c.json}"],
     "--seed must be an integer"),
    ("config: broken YAML", {"c.yaml": "train: [epochs\n"}, ["--config", "{c.yaml}"], "not valid YAML at line"),
    ("config: broken JSON", {"c.json": '{"train": '}, ["--config", "{c.json}"], "not valid JSON"),
    ("data: NaN pixels", {"bad.npz": _nan_npz}, ["--dataset", "{bad.npz}", "--n-train", "200", "--n-test", "50"],
     "NaN/inf pixel value(s) in 1 image(s)"),
    ("options: hierarchical search without class synsets", {}, ["--levels", "cluster"],
     "--search both needs class synsets"),
]


@pytest.mark.parametrize("case, files, args, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_in_one_line(tmp_path, capsys, case, files, args, message):
    paths = {}
    for name, content in files.items():
        p = tmp_path / name
        content(p) if callable(content) else p.write_text(content)
        paths[name] = str(p)
    out = tmp_path / "run"
    argv = ["run", "--preset", "smoke", "--no-progress", "--out", str(out),
            *[paths[a[1:-1]] if a.startswith("{") else a for a in args]]
    assert main(argv) == 2, case
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("ddm-hpc: error: ") and message in err, err
    assert not out.exists()  # nothing written


def test_corrupt_synsets_are_refused_in_one_line(tmp_path, capsys, mnist_root):
    import h5py

    out = tmp_path / "run"
    common = ["--preset", "smoke", "--no-progress", "--data-root", str(mnist_root), "--out", str(out)]
    assert main(["run", *common]) == 0
    with h5py.File(out / "synsets.h5", "r+") as f:
        images = f["cluster/images"]
        bad = images[()]
        bad[0, 0, 0, :4] = np.nan
        images[...] = bad
    capsys.readouterr()
    assert main(["attribute", "--overwrite", *common]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ddm-hpc: error:")]
    assert len(err) == 1 and "NaN/inf" in err[0] and "corrupt" in err[0] and "rerun distill" in err[0]
    assert main(["distill", "--overwrite", *common]) == 0  # recomputed from the (intact) trajectory
    assert main(["attribute", "--overwrite", *common]) == 0
