"""Storage: atomic writes, stage keys, config drift refusal, resume decisions."""
from __future__ import annotations

import errno
from pathlib import Path

import h5py
import numpy as np
import pytest

from ddm_hpc import storage
from ddm_hpc.config import Config
from ddm_hpc.errors import ConfigError, CorruptArtifact, OutputError, StageError
from ddm_hpc.storage import (SCHEMA_VERSION, artifact_path, atomic_h5, create_dataset, open_read, plan_stage,
                             read_attrs, require_upstream, stage_status, verify, write_json_atomic, write_provenance)


def _cfg(tmp_path, **train):
    cfg = Config.from_dict({"runtime": {"out": str(tmp_path)}, "train": train})
    return cfg


def _write(cfg, stage):
    with atomic_h5(artifact_path(cfg.runtime.out, stage)) as f:
        f.create_dataset("x", data=[1, 2, 3])
        write_provenance(f, cfg, stage)


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    path = tmp_path / "a.h5"
    with pytest.raises(RuntimeError):
        with atomic_h5(path) as f:
            f.create_dataset("x", data=[1])
            raise RuntimeError("crash mid-write")
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []  # no temp file left either
    with atomic_h5(path) as f:
        f.create_dataset("x", data=[1])
    with h5py.File(path) as f:
        assert f.attrs["complete"]


def test_incomplete_file_does_not_count(tmp_path):
    path = tmp_path / "train.h5"
    with h5py.File(path, "w") as f:  # a file some crashed writer left without the complete flag
        f.create_dataset("x", data=[1])
    assert read_attrs(path) is None
    assert stage_status(tmp_path, "train", _cfg(tmp_path)) == "missing"


def test_stage_keys_resume_and_drift(tmp_path):
    cfg = _cfg(tmp_path)
    assert plan_stage(tmp_path, "train", cfg) == "run"
    _write(cfg, "train")
    assert plan_stage(tmp_path, "train", cfg) == "skip"  # resume
    changed = _cfg(tmp_path, epochs=5)
    assert changed.stage_key("train") != cfg.stage_key("train")
    with pytest.raises(ConfigError, match=r"epochs: 30 -> 5.*--overwrite"):
        plan_stage(tmp_path, "train", changed)
    changed.runtime.overwrite = True
    assert plan_stage(tmp_path, "train", changed) == "run"
    # attribute-only options do not invalidate training
    other = Config.from_dict({"runtime": {"out": str(tmp_path)}, "attribute": {"n_queries": 3}})
    assert other.stage_key("train") == cfg.stage_key("train")
    assert other.stage_key("attribute") != cfg.stage_key("attribute")


def test_upstream_checks(tmp_path):
    cfg = _cfg(tmp_path)
    with pytest.raises(StageError, match="train.h5 is missing.*ddm-hpc train"):
        require_upstream(tmp_path, "cluster", cfg)
    _write(cfg, "train")
    require_upstream(tmp_path, "cluster", cfg)
    with pytest.raises(ConfigError, match="different config"):
        require_upstream(tmp_path, "cluster", _cfg(tmp_path, epochs=2))
    _write(cfg, "cluster")
    assert stage_status(tmp_path, "cluster", cfg) == "current"
    _write(cfg, "train")  # upstream recomputed: the cluster artifact is now outdated and reruns
    assert stage_status(tmp_path, "cluster", cfg) == "outdated"
    assert plan_stage(tmp_path, "cluster", cfg) == "run"


def test_bad_option_values_are_one_line_errors():
    for section, bad in [("train", {"epochs": 0}), ("distill", {"method": "nope"}),
                         ("attribute", {"removal_prob": 1.5}), ("model", {"model_args": "{bad"})]:
        with pytest.raises(ConfigError) as e:
            Config.from_dict({section: bad})
        assert "\n" not in str(e.value) and "--" in str(e.value)
    with pytest.raises(ConfigError, match="unknown option"):
        Config.from_dict({"train": {"epoch": 3}})


# ----------------------------------------------------------------------------- checksums
_VALUES = {"floats": np.linspace(0.25, 9.75, 4000, dtype=np.float32).reshape(400, 10), "ints": np.arange(5),
           "empty": np.zeros((0, 3), np.float32), "scalar": np.float64(2.5),
           "names": np.array(["conv.weight", "fc.bias"], dtype=h5py.string_dtype())}


def _write_checked(cfg, stage="train"):
    with atomic_h5(artifact_path(cfg.runtime.out, stage)) as f:
        for k, v in _VALUES.items():
            create_dataset(f, k, data=v)
        create_dataset(f.create_group("g"), "nested", data=np.ones(7))
        f["g"].attrs["note"] = "a string attr, stored in HDF5's unchecked global heap"
        write_provenance(f, cfg, stage)
    return artifact_path(cfg.runtime.out, stage)


def _overwrite(path, offset, data=b"\x01" * 64):
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(data)


def test_checksummed_datasets_read_back_bit_identical(tmp_path):
    path = _write_checked(_cfg(tmp_path))
    with h5py.File(path) as f:
        for k, v in _VALUES.items():
            got = f[k].asstr()[()] if k == "names" else f[k][()]
            assert np.asarray(got).dtype == np.asarray(v).dtype
            assert np.asarray(got).tobytes() == np.asarray(v).tobytes() if k != "names" else list(got) == list(v)
        assert f["floats"].fletcher32 and f["empty"].fletcher32 and f["g/nested"].fletcher32
        assert "sha256" in f["scalar"].attrs and "sha256" in f["names"].attrs  # HDF5 cannot filter these
        assert f.attrs["schema"] == SCHEMA_VERSION
    verify(path)
    assert stage_status(tmp_path, "train", _cfg(tmp_path)) == "current"


@pytest.mark.parametrize("checksums", [True, False], ids=["checksums", "without checksums (today's files)"])
def test_64_bytes_overwritten_in_a_dataset_are_refused(tmp_path, monkeypatch, checksums):
    """The defect: 64 bytes overwritten inside an artifact were read as up to date. Without the checksums the same
    overwrite goes unnoticed (the second case shows what the first one catches)."""
    monkeypatch.setattr(storage, "CHECKSUMS", checksums)
    cfg = _cfg(tmp_path)
    path = _write_checked(cfg)
    with h5py.File(path) as f:
        d = f["floats"]
        offset = (d.id.get_chunk_info(0).byte_offset if d.chunks else d.id.get_offset()) + 100
    _overwrite(path, offset)  # tiny finite floats: nothing a NaN check would see
    if not checksums:
        assert stage_status(tmp_path, "train", cfg) == "current"  # trusted ...
        with open_read(path) as f:
            assert not np.array_equal(f["floats"][()], _VALUES["floats"])  # ... and read, wrong
        return
    assert stage_status(tmp_path, "train", cfg) == "corrupt"
    for call in (lambda: plan_stage(tmp_path, "train", cfg), lambda: open_read(path),
                 lambda: require_upstream(tmp_path, "cluster", cfg)):
        with pytest.raises(CorruptArtifact) as e:
            call()
        assert str(e.value) == (f"{path} is corrupt (floats: its checksum does not match): rerun train with "
                                "--overwrite")
    cfg.runtime.overwrite = True
    assert plan_stage(tmp_path, "train", cfg) == "run"


def test_every_64_byte_overwrite_is_refused_or_harmless(tmp_path):
    """64 bytes of garbage at every 64-byte offset of an artifact: verify() refuses it, or the file reads back
    exactly as written (the bytes were unused): never different values, attrs or names taken as good."""
    path = _write_checked(_cfg(tmp_path))

    def contents(p):
        out = {}
        with h5py.File(p, "r") as f:
            def visit(name, obj):
                out[name] = str(dict(obj.attrs))
                if isinstance(obj, h5py.Dataset):
                    out[name + "[]"] = repr(obj[()].tolist() if obj.dtype.kind == "O" else obj[()].tobytes())
            visit("/", f)
            f.visititems(visit)
        return out

    good, image = contents(path), path.read_bytes()
    rng = np.random.default_rng(0)
    refused = 0
    for offset in range(0, len(image) - 64, 64):
        bad = tmp_path / f"bad{offset}.h5"
        bad.write_bytes(image[:offset] + rng.bytes(64) + image[offset + 64:])
        try:
            verify(bad)
        except CorruptArtifact:
            refused += 1
            continue
        assert contents(bad) == good, f"64 bytes at offset {offset} changed the file without being refused"
        bad.unlink()
    assert refused > (len(image) // 64) // 2


def test_an_old_artifact_without_checksums_still_reads(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    monkeypatch.setattr(storage, "CHECKSUMS", False)
    with atomic_h5(artifact_path(tmp_path, "train")) as f:  # as written before this change: no schema either
        f.create_dataset("x", data=[1.5, 2.5])
        write_provenance(f, cfg, "train")
        del f.attrs["schema"]
    monkeypatch.setattr(storage, "CHECKSUMS", True)
    assert stage_status(tmp_path, "train", cfg) == "current" and plan_stage(tmp_path, "train", cfg) == "skip"
    with open_read(artifact_path(tmp_path, "train")) as f:
        assert f["x"][()].tolist() == [1.5, 2.5]


def test_a_file_hdf5_cannot_open_is_corrupt_not_missing(tmp_path):
    cfg = _cfg(tmp_path)
    path = _write_checked(cfg)
    _overwrite(path, 0, b"\0" * 64)  # the superblock
    assert stage_status(tmp_path, "train", cfg) == "corrupt"
    with pytest.raises(CorruptArtifact, match=r"train.h5 is corrupt .*rerun train with --overwrite"):
        require_upstream(tmp_path, "cluster", cfg)


# ----------------------------------------------------------------------------- a run made by another version
def test_an_artifact_of_another_schema_is_refused_in_one_line(tmp_path):
    cfg = _cfg(tmp_path)
    path = _write_checked(cfg)
    with h5py.File(path, "r+") as f:  # as a future ddm_hpc that changed the artifacts' layout would write it
        f.attrs["schema"] = SCHEMA_VERSION + 1
    assert stage_status(tmp_path, "train", cfg) == "incompatible"
    for call in (lambda: plan_stage(tmp_path, "train", cfg), lambda: require_upstream(tmp_path, "cluster", cfg),
                 lambda: open_read(path)):
        with pytest.raises(StageError) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and f"{path} was made by another version of ddm_hpc" in msg
        assert f"artifact schema {SCHEMA_VERSION + 1}" in msg and "rerun train with --overwrite" in msg
    cfg.runtime.overwrite = True
    assert plan_stage(tmp_path, "train", cfg) == "run"


def test_the_schema_version_is_not_the_code_version(tmp_path, monkeypatch):
    """A behaviour-preserving change (a new package version or git revision) keeps existing runs current."""
    cfg = _cfg(tmp_path)
    _write_checked(cfg)
    monkeypatch.setattr(storage, "__version__", "99.0")
    monkeypatch.setattr(storage, "_git_revision", lambda: "another")
    assert stage_status(tmp_path, "train", cfg) == "current"


# ----------------------------------------------------------------------------- a folder that cannot take a file
@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "no space left on the device; free space there"),
                                         (errno.EROFS, "it is read-only; make it writable")])
def test_a_full_or_read_only_folder_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, code, words):
    real_open = open

    def failing_open(file, mode="r", *args, **kwargs):  # the write of the file's image, as the kernel fails it
        if "w" in mode and ".tmp." in str(file):
            real_open(file, mode).close()  # the temp file exists when the write fails
            raise OSError(code, "simulated", str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", failing_open)
    with pytest.raises(OutputError) as e:
        with atomic_h5(tmp_path / "a.h5") as f:
            create_dataset(f, "x", data=np.arange(10))
    assert str(e.value).startswith(f"cannot write to {tmp_path}: {words} or pass another --out")
    assert list(tmp_path.iterdir()) == []  # no artifact, no temp file


def test_a_json_file_in_a_full_folder_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    def half_then_full(self, *args, **kwargs):
        Path.write_bytes(self, b"{")  # half-written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_text", half_then_full)
    with pytest.raises(OutputError, match=f"cannot write to {tmp_path}: no space left"):
        write_json_atomic(tmp_path / "config.json", {"a": 1})
    assert list(tmp_path.iterdir()) == []


def test_hdf5_messages_without_errno_are_recognised():
    """HDF5 reports a failed write in its message and leaves OSError.errno unset."""
    e = OSError("Can't write data (file write failed: ... errno = 28, error message = 'No space left on device')")
    assert storage.write_errno(e) == errno.ENOSPC
    assert storage.write_errno(OSError("Unable to open file (unable to lock file)")) is None


def test_a_corrupt_cache_is_recomputed_not_read(tmp_path, caplog):
    """groundtruth.h5 and the diagnose caches are caches: a corrupt one is logged and recomputed (storage.intact)."""
    path = tmp_path / "groundtruth.h5"
    with atomic_h5(path) as f:
        create_dataset(f, "probs", data=np.linspace(0, 1, 3000, dtype=np.float32))
    assert storage.intact(path)
    with h5py.File(path) as f:
        offset = f["probs"].id.get_chunk_info(0).byte_offset
    _overwrite(path, offset + 8)
    with caplog.at_level("WARNING", logger="ddm_hpc.storage"):
        assert not storage.intact(path)
    assert caplog.messages == [f"{path} is corrupt (probs: its checksum does not match); recomputing what it held"]
