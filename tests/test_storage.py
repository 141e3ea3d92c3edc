"""Storage: atomic writes, stage keys, config drift refusal, resume decisions."""
from __future__ import annotations

import h5py
import pytest

from ddm_hpc.config import Config
from ddm_hpc.errors import ConfigError, StageError
from ddm_hpc.storage import (artifact_path, atomic_h5, plan_stage, read_attrs, require_upstream, stage_status,
                             write_provenance)


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
