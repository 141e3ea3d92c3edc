"""Bad input fails in one line, with exit code 2, naming the problem and the fix, and writes nothing.

``python tests/test_bad_input.py`` prints the cases as the Markdown table in benchmarks/RESULTS.md.

Each case: (id, files to write, command-line arguments, a fragment the message must hold). The cases
fail on the behaviour before they were fixed (a TypeError traceback, a crash in training, or a
message blaming the learning rate)."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from ddm_hpc import __version__
from ddm_hpc.cli import main


def _nan_npz(path):
    x = np.random.default_rng(0).random((300, 8, 8), dtype=np.float32)
    x[7, 2, 3] = np.nan
    np.savez(path, x=x, y=np.arange(300) % 3)


def _npz(**arrays):
    def write(path):
        np.savez(path, **arrays)
    return write


_X = np.random.default_rng(1).random((300, 8, 8), dtype=np.float32)
_Y = np.arange(300) % 3


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
    ("data: no 'x' array", {"d.npz": _npz(images=_X, y=_Y)}, ["--dataset", "{d.npz}"], "has no 'x' array"),
    ("data: images of the wrong rank", {"d.npz": _npz(x=_X[:, None, None], y=_Y)}, ["--dataset", "{d.npz}"],
     "expected [N,H,W]"),
    ("data: labels not integers", {"d.npz": _npz(x=_X, y=_Y.astype(np.float32))}, ["--dataset", "{d.npz}"],
     "expected integer labels"),
    ("data: negative labels", {"d.npz": _npz(x=_X, y=_Y - 1)}, ["--dataset", "{d.npz}"], "negative labels"),
    ("data: labels that skip class ids", {"d.npz": _npz(x=_X, y=_Y + 7)}, ["--dataset", "{d.npz}"],
     "contiguous ids 0..L-1"),
    ("data: fewer labels than images", {"d.npz": _npz(x=_X, y=_Y[:200])}, ["--dataset", "{d.npz}"], "labels but"),
    ("data: a single class", {"d.npz": _npz(x=_X, y=np.zeros(300, dtype=np.int64))},
     ["--dataset", "{d.npz}", "--n-train", "200", "--n-test", "50"], "attribution needs at least 2"),
    ("data: fewer images in a class than clusters", {"d.npz": _npz(x=_X, y=_Y)},
     ["--dataset", "{d.npz}", "--n-train", "200", "--n-test", "50", "--clusters-per-class", "80"],
     "fewer than --clusters-per-class"),
    ("data: a file that is not an array file", {"d.npz": "not a zip"}, ["--dataset", "{d.npz}"], "could not read"),
    ("options: unknown model", {}, ["--model", "resnet9000"], "unknown model 'resnet9000'"),
    ("options: a query outside the test set", {}, ["--query-index", "99999"], "--query-index [99999] outside"),
    ("options: more queries than test images", {}, ["--n-queries", "5000"], "exceeds the 100 test images"),
    ("options: zero shards", {}, ["--shards", "0"], "--shards must be >= 1"),
    ("options: negative threads", {}, ["--threads", "-2"], "--threads must be >= 0"),
    ("options: an unknown removal protocol", {}, ["evaluate", "--gt-removal", "reshuffle"], "--gt-removal 'reshuffle'"),
    ("options: a kept fraction out of range", {}, ["evaluate", "--lds-alphas", "1.5"], "--lds-alphas"),
    ("options: an unknown method", {}, ["evaluate", "--methods", "ddm,bogus"], "bogus"),
    ("options: an unknown training recipe", {}, ["evaluate", "--imported-recipe", "mine"], "--imported-recipe 'mine'"),
]

# Run directories: each made by its own test below (they need an earlier run, a corrupted file or a failing
# write), which checks the whole line; the table prints them after CASES. RUN: the --out, RO: a read-only folder,
# VERSION: ddm_hpc's version (the schema case's file has this version's package version and schema 2).
RUN_DIR_CASES = {
    "nan": ("run directory: NaN images in synsets.h5", "ddm-hpc attribute --overwrite",
            "RUN/synsets.h5: cluster images hold NaN/inf, so the file is corrupt: rerun distill with --overwrite"),
    "bytes": ("run directory: 64 bytes overwritten in synsets.h5", "ddm-hpc run",
              "RUN/synsets.h5 is corrupt (cluster/images: its checksum does not match): rerun distill with "
              "--overwrite"),
    "schema": ("run directory: an artifact of another version's schema", "ddm-hpc run",
               "RUN/clusters.h5 was made by another version of ddm_hpc (VERSION, artifact schema 2; this is VERSION, "
               "schema 1): rerun cluster with --overwrite, or choose another --out (or read it with ddm_hpc VERSION)"),
    "full": ("run directory: the disk fills while clusters.h5 is written", "ddm-hpc run",
             "cannot write to RUN: no space left on the device; free space there or pass another --out, then rerun "
             "the same command (nothing half-written is kept)"),
    "read-only": ("run directory: a read-only output folder", "ddm-hpc run --out RO/run",
                  "cannot write to RO: it is read-only; make it writable or pass another --out, then rerun the same "
                  "command (nothing half-written is kept)"),
}


def _expected(key: str, **paths) -> str:
    """The one error line of RUN_DIR_CASES[key] with its placeholders (RUN, RO) filled in."""
    text = RUN_DIR_CASES[key][2].replace("VERSION", __version__)
    for name, path in paths.items():
        text = text.replace(name, str(path))
    return f"ddm-hpc: error: {text}"


@pytest.mark.parametrize("case, files, args, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_in_one_line(tmp_path, capsys, mnist_root, case, files, args, message):
    paths = {}
    for name, content in files.items():
        p = tmp_path / name
        content(p) if callable(content) else p.write_text(content)
        paths[name] = str(p)
    out = tmp_path / "run"
    command, args = (args[0], args[1:]) if args and args[0] == "evaluate" else ("run", args)
    argv = [command, "--preset", "smoke", "--no-progress", "--data-root", str(mnist_root), "--out", str(out),
            *[paths[a[1:-1]] if a.startswith("{") else a for a in args]]
    assert main(argv) == 2, case
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("ddm-hpc: error: ")]
    # one error line (a 'loaded ...' progress line may precede it), no traceback
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err, err
    assert not out.exists()  # nothing written


def test_corrupt_synsets_are_refused_in_one_line(tmp_path, capsys, mnist_root):
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
    assert err == [_expected("nan", RUN=out)]
    assert main(["distill", "--overwrite", *common]) == 0  # recomputed from the (intact) trajectory
    assert main(["attribute", "--overwrite", *common]) == 0
    # 64 bytes overwritten inside the synsets' pixels (tiny finite floats: no NaN check sees them)
    with h5py.File(out / "synsets.h5", "r") as f:
        offset = f["cluster/images"].id.get_chunk_info(0).byte_offset + 16
    with open(out / "synsets.h5", "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\x01" * 64)
    capsys.readouterr()
    for command in ("run", "attribute"):
        assert main([command, *common]) == 2
        err = capsys.readouterr().err
        assert _expected("bytes", RUN=out) in err.splitlines() and "Traceback" not in err
    assert main(["distill", "--overwrite", *common]) == 0
    assert main(["run", *common]) == 0


def _failing_open(target: str, code: int):
    """builtins.open for ddm_hpc.storage: writing ``target``'s temp file fails with ``code`` once it exists."""
    def fake(file, mode="r", *args, **kwargs):
        if "w" in mode and f".{target}.tmp." in str(file):
            open(file, mode).close()
            raise OSError(code, os.strerror(code), str(file))
        return open(file, mode, *args, **kwargs)
    return fake


def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(tmp_path, capsys, mnist_root, monkeypatch):
    """The trial's disk full during a merge segfaulted (exit 139) after 261 lines of HDF5 errors."""
    from ddm_hpc import storage

    out = tmp_path / "run"
    common = ["--preset", "smoke", "--no-progress", "--data-root", str(mnist_root), "--out", str(out)]
    monkeypatch.setattr(storage, "open", _failing_open("clusters.h5", errno.ENOSPC), raising=False)
    assert main(["run", *common]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("ddm-hpc: error: ")]
    assert errors == [_expected("full", RUN=out)], err
    assert "Traceback" not in err and not list(out.rglob(".*.tmp.*")) and not (out / "clusters.h5").exists()
    assert storage.read_attrs(out / "train.h5")["complete"]  # the artifact before it is kept
    monkeypatch.undo()
    assert main(["cluster", *common]) == 0
    # a run directory whose clusters.h5 a ddm_hpc of another artifact schema wrote
    with h5py.File(out / "clusters.h5", "r+") as f:
        f.attrs["schema"] = storage.SCHEMA_VERSION + 1
    capsys.readouterr()
    assert main(["run", *common]) == 2
    err = capsys.readouterr().err
    assert [ln for ln in err.splitlines() if ln.startswith("ddm-hpc: error: ")] == [_expected("schema", RUN=out)]


def test_a_read_only_output_folder_is_one_line(tmp_path, capsys, mnist_root, monkeypatch):
    """Root ignores permissions here: the folder's mkdir fails as on a read-only mount."""
    ro = tmp_path / "ro"
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self.is_relative_to(ro):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    assert main(["run", "--preset", "smoke", "--no-progress", "--data-root", str(mnist_root),
                 "--out", str(ro / "run")]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == _expected("read-only", RO=ro)
    assert "Traceback" not in err and not ro.exists()


if __name__ == "__main__":  # the table of cases for benchmarks/RESULTS.md
    print("| case | command (`--preset smoke`; FILE written by the test) | the one-line error contains |")
    print("|---|---|---|")
    for case, files, args, message in CASES:
        command, args = (args[0], args[1:]) if args and args[0] == "evaluate" else ("run", args)
        shown = f"ddm-hpc {command} " + " ".join(a[1:-1] if a.startswith("{") else a for a in args)
        print(f"| {case} | `{shown}` | {message} |")
    for case, command, message in RUN_DIR_CASES.values():
        print(f"| {case} | `{command}` | {message} |")
