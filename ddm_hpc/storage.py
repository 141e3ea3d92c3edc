"""Every HDF5 artifact: paths, atomic writes, provenance attrs, stage-key checks, param tables.

A run directory holds one file per stage (``graph.ARTIFACTS``) plus ``config.json``. Writes go to a
temporary file in the same directory and are renamed into place only after the file is
complete and closed, so a crash never leaves a half-written file under the final name.
Each file's root attrs carry ``config`` (JSON of the sections the stage depends on),
``stage_key`` (hash of that JSON), ``stage``, ``complete``, package versions and git revision.

Room: imports ``config`` and ``graph`` (and ``errors``); every stage module may import it.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from ddm_hpc import __version__, graph
from ddm_hpc.config import Config, diff
from ddm_hpc.errors import ConfigError, StageError

log = logging.getLogger(__name__)


def artifact_path(run_dir: str | Path, stage: str) -> Path:
    """Where stage ``stage`` writes its artifact in ``run_dir``."""
    return Path(run_dir) / graph.ARTIFACTS[stage]


@contextlib.contextmanager
def atomic_h5(path: str | Path) -> Iterator[h5py.File]:
    """Open a temp HDF5 file beside ``path``; rename it to ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as f:
            yield f
            f.attrs["complete"] = True
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json_atomic(path: str | Path, obj: object) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _git_revision() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict[str, str]:
    """Versions of the packages a result depends on (recorded in every artifact)."""
    v = {"ddm_hpc": __version__, "torch": torch.__version__, "numpy": np.__version__, "h5py": h5py.__version__}
    for mod in ("torchvision", "faiss", "triton"):  # heavy optional imports, deferred to the first artifact written
        try:
            v[mod] = importlib.import_module(mod).__version__
        except Exception:  # optional packages: absent or broken is recorded, not fatal
            v[mod] = "absent"
    return v


def write_provenance(f: h5py.File, cfg: Config, stage: str, seconds: float | None = None) -> None:
    """Root attrs: config JSON of the stage's sections, its key, versions, git revision, time."""
    f.attrs["stage"] = stage
    f.attrs["stage_key"] = cfg.stage_key(stage)
    f.attrs["uid"] = uuid.uuid4().hex
    f.attrs["upstream"] = json.dumps(upstream_uids(cfg.runtime.out, stage), sort_keys=True)
    f.attrs["config"] = json.dumps(cfg.stage_dict(stage), sort_keys=True)
    f.attrs["versions"] = json.dumps(versions(), sort_keys=True)
    f.attrs["git_revision"] = _git_revision()
    f.attrs["created"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    f.attrs["device"] = cfg.runtime.device
    if seconds is not None:
        f.attrs["seconds"] = float(seconds)


def read_attrs(path: Path) -> dict[str, object] | None:
    """Root attrs of a complete artifact, or None if it is missing or incomplete."""
    if not path.exists():
        return None
    try:
        with h5py.File(path, "r", locking=False) as f:
            attrs = dict(f.attrs)
    except OSError:
        return None
    return attrs if attrs.get("complete") else None


def upstream_uids(run_dir: str | Path, stage: str) -> dict[str, str]:
    """uid of each upstream artifact now in ``run_dir`` (missing ones omitted)."""
    out = {}
    for up in graph.stage(stage).upstream:
        attrs = read_attrs(artifact_path(run_dir, up))
        if attrs is not None:
            out[up] = str(attrs.get("uid", ""))
    return out


def stage_status(run_dir: str | Path, stage: str, cfg: Config) -> str:
    """State of a stage's artifact.

    'missing'; 'stale' (made with another config); 'outdated' (same config, but an upstream
    artifact was recomputed since); 'current'.
    """
    attrs = read_attrs(artifact_path(run_dir, stage))
    if attrs is None:
        return "missing"
    if attrs.get("stage_key") != cfg.stage_key(stage):
        return "stale"
    if json.loads(str(attrs.get("upstream", "{}"))) != upstream_uids(run_dir, stage):
        return "outdated"
    return "current"


def drift_message(run_dir: str | Path, stage: str, cfg: Config) -> str:
    """One line naming the options that differ between the artifact and ``cfg``."""
    attrs = read_attrs(artifact_path(run_dir, stage)) or {}
    old = json.loads(str(attrs.get("config", "{}")))
    changes = diff(old, cfg.stage_dict(stage))
    shown = "; ".join(changes[:4]) + (f"; ... ({len(changes)} in all)" if len(changes) > 4 else "")
    return (f"{artifact_path(run_dir, stage)} was made with a different config ({shown or 'unknown difference'}): "
            f"pass --overwrite to recompute it and later stages, or choose another --out")


def require_upstream(run_dir: str | Path, stage: str, cfg: Config) -> None:
    """Raise unless every upstream artifact of ``stage`` exists and matches ``cfg``."""
    for up in graph.stage(stage).upstream:
        status = stage_status(run_dir, up, cfg)
        if status == "missing":
            raise StageError(f"{artifact_path(run_dir, up)} is missing: run `ddm-hpc {up} --out {run_dir}` "
                             f"(or `ddm-hpc run`) first")
        if status == "stale":
            raise ConfigError(drift_message(run_dir, up, cfg))
        if status == "outdated":
            raise StageError(f"{artifact_path(run_dir, up)} is older than the artifacts it was made from: "
                             f"run `ddm-hpc {up} --out {run_dir}` (or `ddm-hpc run`) to refresh it")


# ----------------------------------------------------------------------------- parameter tables
@dataclass
class ParamTable:
    """Names, shapes and offsets of a model's parameters in a flat float32 vector."""

    names: list[str]
    shapes: list[tuple[int, ...]]

    @property
    def numels(self) -> list[int]:
        return [int(np.prod(s)) if s else 1 for s in self.shapes]

    @property
    def offsets(self) -> list[int]:
        return [int(x) for x in np.concatenate([[0], np.cumsum(self.numels)[:-1]])] if self.names else []

    @property
    def total(self) -> int:
        return int(sum(self.numels))

    @classmethod
    def from_module(cls, model: torch.nn.Module) -> ParamTable:
        named = list(model.named_parameters())
        return cls([n for n, _ in named], [tuple(p.shape) for _, p in named])

    @classmethod
    def buffers_of(cls, model: torch.nn.Module) -> ParamTable:
        """The model's saved buffers (those in its ``state_dict``: BatchNorm running statistics and counters)."""
        saved = model.state_dict(keep_vars=True)
        named = [(n, b) for n, b in model.named_buffers() if n in saved]
        return cls([n for n, _ in named], [tuple(b.shape) for _, b in named])

    def flatten(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """dict name -> tensor  to  float32 [P] on CPU."""
        return torch.cat([params[n].detach().reshape(-1).float().cpu() for n in self.names])

    def unflatten(self, vec: torch.Tensor) -> dict[str, torch.Tensor]:
        """float [P] (any device) to dict name -> view of the right shape."""
        if vec.numel() != self.total:
            raise StageError(f"parameter vector has {vec.numel()} values but the model has {self.total}: "
                             "the artifact was made with another model; rerun with --overwrite")
        return {n: vec[o:o + k].view(s) for n, o, k, s in zip(self.names, self.offsets, self.numels, self.shapes)}

    def write(self, g: h5py.Group) -> None:
        ndim = max((len(s) for s in self.shapes), default=1)
        shape_arr = np.zeros((len(self.shapes), max(ndim, 1)), dtype=np.int64)
        for i, s in enumerate(self.shapes):
            shape_arr[i, :len(s)] = s
        g.create_dataset("name", data=np.array(self.names, dtype=h5py.string_dtype()))
        g.create_dataset("shape", data=shape_arr)
        g.create_dataset("ndim", data=np.array([len(s) for s in self.shapes], dtype=np.int64))
        g.create_dataset("offset", data=np.array(self.offsets, dtype=np.int64))
        g.create_dataset("numel", data=np.array(self.numels, dtype=np.int64))

    @classmethod
    def read(cls, g: h5py.Group) -> ParamTable:
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in g["name"][()]]
        shapes = [tuple(int(x) for x in row[:nd]) for row, nd in zip(g["shape"][()], g["ndim"][()])]
        return cls(names, shapes)


def open_read(path: str | Path) -> h5py.File:
    """Open a complete artifact read-only (no HDF5 file locking: safe on network filesystems)."""
    path = Path(path)
    if read_attrs(path) is None:
        raise StageError(f"{path} is missing or incomplete: run the stage that writes it first")
    return h5py.File(path, "r", locking=False)


def plan_stage(run_dir: str | Path, stage: str, cfg: Config) -> str:
    """Decide what to do with a stage's own artifact: 'run' or 'skip' (raises on unasked drift).

    A current artifact is kept (resume) unless --overwrite; one made with a different config is
    an error unless --overwrite; an outdated one (upstream recomputed) is recomputed.
    """
    status = stage_status(run_dir, stage, cfg)
    if status == "current" and not cfg.runtime.overwrite:
        return "skip"
    if status == "stale" and not cfg.runtime.overwrite:
        raise ConfigError(drift_message(run_dir, stage, cfg))
    return "run"
