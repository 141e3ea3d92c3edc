"""Every HDF5 artifact: paths, atomic writes, provenance attrs, stage-key checks, param tables.

A run directory holds one file per stage (``graph.ARTIFACTS``) plus ``config.json``. Writes go to a
temporary file in the same directory and are renamed into place only after the file is
complete and closed, so a crash never leaves a half-written file under the final name.
Each file's root attrs carry ``config`` (JSON of the sections the stage depends on),
``stage_key`` (hash of that JSON), ``stage``, ``complete``, ``schema`` (:data:`SCHEMA_VERSION`), package
versions and git revision.

Checksums: every dataset written through :func:`create_dataset` carries an HDF5 fletcher32 checksum on each
chunk (scalars and variable-length strings, which HDF5 cannot filter, a ``sha256`` attr instead); files are
written in the HDF5 1.10 format, whose object headers carry checksums too, and the root a ``sha256`` of every
object's attrs (string attrs live in HDF5's global heap, which nothing checks). :func:`verify` reads a file
through once and raises :class:`~ddm_hpc.errors.CorruptArtifact` on any mismatch, so bytes overwritten on disk
give one line naming the file and the fix instead of being read. A file written before the checksums existed
has none of them and still reads (nothing to check but its structure).

Room: imports ``config`` and ``graph`` (and ``errors``); every stage module may import it.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib
import json
import logging
import os
import re
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
from ddm_hpc.errors import ConfigError, CorruptArtifact, OutputError, StageError

log = logging.getLogger(__name__)

# The layout of the artifacts (dataset names, shapes, meanings) this code writes and reads. Bump it only when a
# change makes old artifacts unreadable or wrong to read; behaviour-preserving code changes keep it, so they never
# invalidate existing runs (a git revision would). Artifacts without the attr predate it: schema 1.
SCHEMA_VERSION = 1
READABLE_SCHEMAS = frozenset({1})
CHECKSUMS = True  # fletcher32 / sha256 on what create_dataset writes (tests turn it off to show what it catches)
_LIBVER = ("v110", "latest")  # object headers with checksums; readable by HDF5 >= 1.10 (2018)
# errno values that mean "this folder cannot take the file": read-only, no permission, disk or quota full
WRITE_ERRNOS = {errno.EROFS: "it is read-only", errno.EACCES: "permission denied", errno.EPERM: "permission denied",
                errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded"}


def artifact_path(run_dir: str | Path, stage: str) -> Path:
    """Where stage ``stage`` writes its artifact in ``run_dir``."""
    return Path(run_dir) / graph.ARTIFACTS[stage]


# ----------------------------------------------------------------------------- writing
def write_errno(e: BaseException) -> int | None:
    """The errno of an OSError that means the folder cannot take a file (:data:`WRITE_ERRNOS`), else None.

    HDF5 reports a failed write in its message (``... errno = 28, error message = 'No space left ...'``)
    without setting ``OSError.errno``; both are looked at."""
    if not isinstance(e, OSError):
        return None
    if e.errno in WRITE_ERRNOS:
        return e.errno
    m = re.search(r"errno = (\d+)", str(e))
    if m and int(m.group(1)) in WRITE_ERRNOS:
        return int(m.group(1))
    text = str(e).lower()
    for code, words in ((errno.ENOSPC, "no space left"), (errno.EROFS, "read-only file system"),
                        (errno.EACCES, "permission denied"), (errno.EDQUOT, "quota exceeded")):
        if words in text:
            return code
    return None


def output_error(folder: str | Path, code: int) -> OutputError:
    """The one-line error for a folder that cannot take a file (``code`` from :func:`write_errno`)."""
    fix = ("free space there" if code in (errno.ENOSPC, errno.EDQUOT) else "make it writable")
    return OutputError(f"cannot write to {folder}: {WRITE_ERRNOS[code]}; {fix} or pass another --out, then rerun "
                       "the same command (nothing half-written is kept)")


def temp_path(path: str | Path) -> Path:
    """The temp file beside ``path`` that this process writes before renaming it to ``path``."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp.{os.getpid()}")


@contextlib.contextmanager
def temp_then_rename(path: str | Path) -> Iterator[Path]:
    """Yield the temp file beside ``path`` to write; rename it to ``path`` only if the block succeeds, else remove it.

    Raises:
        OutputError: the folder is read-only, not writable or full (one line naming it; no temp file left).
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        code = write_errno(e)
        if code is None:
            raise
        raise output_error(path.parent, code) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_h5(path: str | Path, *, in_memory: bool = True) -> Iterator[h5py.File]:
    """Open a temp HDF5 file beside ``path``; rename it to ``path`` only if the block succeeds.

    Args:
        path: the artifact's final name.
        in_memory: build the file in memory (HDF5's core driver) and write its image to the temp file in one
            plain write: a full disk or a read-only folder is then a clean OSError, where HDF5 writing to a full
            disk itself fails in its destructors and crashes the interpreter (the trial's exit 139). False for
            files streamed out in pieces too large to hold (features), which HDF5 writes itself.

    Raises:
        OutputError: the folder is read-only, not writable or full (one line naming it; no temp file left).
    """
    libver = _LIBVER if CHECKSUMS else None
    with temp_then_rename(path) as tmp:
        if in_memory:
            f = h5py.File(tmp, "w", driver="core", backing_store=False, block_size=1 << 20, libver=libver)
        else:
            f = h5py.File(tmp, "w", libver=libver)
        with f:
            yield f
            f.attrs["complete"] = True
            if CHECKSUMS:
                f.attrs["sha256"] = _attrs_digest(f)
            if in_memory:
                f.flush()
                image = f.id.get_file_image()
        if in_memory:
            with open(tmp, "wb") as fh:
                fh.write(image)


def write_json_atomic(path: str | Path, obj: object) -> None:
    """Write ``obj`` as JSON to a temp file beside ``path`` and rename it into place (OutputError as atomic_h5)."""
    with temp_then_rename(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _digest(data: np.ndarray) -> str:
    """sha256 of an array's dtype, shape and values (strings as UTF-8 JSON)."""
    h = hashlib.sha256(f"{data.dtype.kind}{data.dtype.itemsize}{data.shape}".encode())
    if data.dtype.kind in "OSU":
        h.update(json.dumps([x.decode() if isinstance(x, bytes) else str(x) for x in data.reshape(-1)]).encode())
    else:
        h.update(np.ascontiguousarray(data).tobytes())
    return h.hexdigest()


def _attrs_digest(f: h5py.File) -> str:
    """sha256 of the attrs of every object in ``f`` (the root's ``sha256`` excepted), by name, type and value:
    string attrs live in HDF5's global heap, which has no checksum of its own."""
    h = hashlib.sha256()
    objects: list[tuple[str, h5py.HLObject]] = [("/", f)]
    f.visititems(lambda name, obj: objects.append((name, obj)))
    for name, obj in objects:
        for k in sorted(obj.attrs):
            if not (name == "/" and k == "sha256"):
                h.update(f"{name}@{k}={_digest(np.asarray(obj.attrs[k]))};".encode())
    return h.hexdigest()


def create_dataset(group: h5py.Group, name: str, data: object = None, **kwargs: object) -> h5py.Dataset:
    """``group.create_dataset(name, data=data, **kwargs)`` with a checksum :func:`verify` checks.

    Arrays with at least one dimension get ``fletcher32`` (chunked: HDF5 filters need chunks; h5py chooses
    them unless ``chunks`` is given); scalars and variable-length strings, which HDF5 cannot filter, get a
    ``sha256`` attr of their values. Values are stored as given (the checksums do not change one bit).
    """
    arr = None if data is None else np.asarray(data)
    if not CHECKSUMS:
        return group.create_dataset(name, data=arr, **kwargs)
    shape = arr.shape if arr is not None else kwargs.get("shape")
    shape = (shape,) if isinstance(shape, int) else tuple(shape or ())
    dtype = np.dtype(kwargs["dtype"]) if kwargs.get("dtype") is not None else (arr.dtype if arr is not None
                                                                                else np.dtype("f4"))
    if shape and dtype.kind != "O" and h5py.check_string_dtype(dtype) is None:
        return group.create_dataset(name, data=arr, fletcher32=True, **kwargs)
    ds = group.create_dataset(name, data=arr, **kwargs)
    ds.attrs["sha256"] = _digest(np.asarray(ds[()]))
    return ds


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
    f.attrs["schema"] = SCHEMA_VERSION
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
    """Root attrs of a complete artifact, or None if it is missing, incomplete or cannot be opened."""
    if not path.exists():
        return None
    try:
        with h5py.File(path, "r", locking=False) as f:
            attrs = dict(f.attrs)
    except OSError:
        return None
    return attrs if attrs.get("complete") else None


_VERIFY_BLOCK = 64 << 20  # bytes read at a time by verify()
_VERIFIED: dict[tuple[str, int, int, int], None] = {}  # files verify() passed, by (path, inode, size, mtime)


def verify(path: str | Path, stage: str | None = None) -> None:
    """Read every dataset and attr of ``path`` once and check its checksums (fletcher32, sha256 attrs, the
    HDF5 metadata checksums); a file that passed is not read again while it is unchanged.

    Args:
        path: an HDF5 file (an artifact or a shard).
        stage: the stage that writes it, for the fix in the message (default: looked up from the file name).

    Raises:
        CorruptArtifact: one line, ``<path> is corrupt (<what failed>): rerun <stage> with --overwrite``.
    """
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if key in _VERIFIED:
        return
    where = "the file"
    try:
        with h5py.File(path, "r", locking=False) as f:
            where = "its attrs"
            dict(f.attrs)
            if "sha256" in f.attrs and _attrs_digest(f) != f.attrs["sha256"]:
                raise ValueError("the attrs do not match their sha256")
            bad: list[str] = []

            def visit(name: str, obj: h5py.HLObject) -> None:
                nonlocal where
                where = name
                dict(obj.attrs)
                if isinstance(obj, h5py.Dataset):
                    if "sha256" in obj.attrs:  # scalars and strings: small
                        if _digest(np.asarray(obj[()])) != obj.attrs["sha256"]:
                            bad.append(name)
                    elif obj.ndim == 0 or obj.nbytes <= _VERIFY_BLOCK:
                        obj[()]
                    else:  # fletcher32 is checked as each chunk is read: read in blocks of rows
                        rows = max(1, _VERIFY_BLOCK // max(1, obj.nbytes // obj.shape[0]))
                        for i in range(0, obj.shape[0], rows):
                            obj[i:i + rows]

            f.visititems(visit)
            if bad:
                where = bad[0]
                raise ValueError("values do not match their sha256")
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
        stage = stage or _stage_of(path)
        fix = f"rerun {stage} with --overwrite" if stage else "delete it and rerun the command that wrote it"
        text = " ".join(str(e).split())
        checksum = re.search(r"filter returned failure|fletcher32|checksum", text, re.IGNORECASE)
        what = "its checksum does not match" if checksum else text[:120]
        raise CorruptArtifact(f"{path} is corrupt ({where}: {what}): {fix}") from None
    _VERIFIED[key] = None


def intact(path: str | Path) -> bool:
    """True if the cache file ``path`` passes :func:`verify`; a corrupt one is logged (and then recomputed)."""
    try:
        verify(path)
    except CorruptArtifact as e:
        log.warning("%s; recomputing what it held", str(e).split(": rerun")[0].split(": delete")[0])
        return False
    return True


def _stage_of(path: Path) -> str | None:
    """The stage whose artifact file name ``path`` has (None for shards and other files)."""
    return next((s for s, name in graph.ARTIFACTS.items() if name == path.name), None)


def schema_of(attrs: dict[str, object]) -> int:
    """The artifact schema a file was written with (1 before the attr existed)."""
    return int(attrs.get("schema", 1))  # type: ignore[call-overload]


def schema_message(path: Path, attrs: dict[str, object], stage: str) -> str:
    """One line: ``path`` was made by a ddm_hpc whose artifacts this version cannot read, and what to do."""
    made = json.loads(str(attrs.get("versions", "{}"))).get("ddm_hpc", "?")
    return (f"{path} was made by another version of ddm_hpc ({made}, artifact schema {schema_of(attrs)}; this is "
            f"{__version__}, schema {SCHEMA_VERSION}): rerun {stage} with --overwrite, or choose another --out "
            f"(or read it with ddm_hpc {made})")


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

    'missing' (or incomplete); 'corrupt' (present but unreadable, or its checksums fail: :func:`verify`);
    'incompatible' (written with an artifact schema this version cannot read); 'stale' (made with another
    config); 'outdated' (same config, but an upstream artifact was recomputed since); 'current'.
    """
    path = artifact_path(run_dir, stage)
    attrs = read_attrs(path)
    if attrs is None:
        if not path.exists():
            return "missing"
        try:
            with h5py.File(path, "r", locking=False) as f:
                complete = bool(f.attrs.get("complete"))
        except OSError:
            return "corrupt"
        return "corrupt" if complete else "missing"
    if schema_of(attrs) not in READABLE_SCHEMAS:
        return "incompatible"
    try:
        verify(path, stage)
    except CorruptArtifact:
        return "corrupt"
    if attrs.get("stage_key") != cfg.stage_key(stage):
        return "stale"
    if json.loads(str(attrs.get("upstream", "{}"))) != upstream_uids(run_dir, stage):
        return "outdated"
    return "current"


def _refuse(run_dir: str | Path, stage: str, status: str) -> None:
    """Raise the one-line error of a 'corrupt' or 'incompatible' artifact."""
    path = artifact_path(run_dir, stage)
    if status == "corrupt":
        if read_attrs(path) is None:
            raise CorruptArtifact(f"{path} is corrupt (HDF5 cannot open it): rerun {stage} with --overwrite")
        verify(path, stage)  # raises with what failed
    if status == "incompatible":
        raise StageError(schema_message(path, read_attrs(path) or {}, stage))


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
        if status in ("corrupt", "incompatible"):
            _refuse(run_dir, up, status)
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
        create_dataset(g, "name", data=np.array(self.names, dtype=h5py.string_dtype()))
        create_dataset(g, "shape", data=shape_arr)
        create_dataset(g, "ndim", data=np.array([len(s) for s in self.shapes], dtype=np.int64))
        create_dataset(g, "offset", data=np.array(self.offsets, dtype=np.int64))
        create_dataset(g, "numel", data=np.array(self.numels, dtype=np.int64))

    @classmethod
    def read(cls, g: h5py.Group) -> ParamTable:
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in g["name"][()]]
        shapes = [tuple(int(x) for x in row[:nd]) for row, nd in zip(g["shape"][()], g["ndim"][()])]
        return cls(names, shapes)


def open_read(path: str | Path) -> h5py.File:
    """Open a complete artifact read-only (no HDF5 file locking: safe on network filesystems)."""
    path = Path(path)
    attrs = read_attrs(path)
    if attrs is None:
        if path.exists():
            verify(path)  # a file HDF5 cannot open is corrupt, not missing
        raise StageError(f"{path} is missing or incomplete: run the stage that writes it first")
    if schema_of(attrs) not in READABLE_SCHEMAS:
        raise StageError(schema_message(path, attrs, _stage_of(path) or "the stage that wrote it"))
    verify(path)
    return h5py.File(path, "r", locking=False)


def plan_stage(run_dir: str | Path, stage: str, cfg: Config) -> str:
    """Decide what to do with a stage's own artifact: 'run' or 'skip' (raises on unasked drift).

    A current artifact is kept (resume) unless --overwrite; one made with a different config, a corrupt one
    and one of an incompatible schema are errors unless --overwrite; an outdated one (upstream recomputed) is
    recomputed.
    """
    status = stage_status(run_dir, stage, cfg)
    if status in ("corrupt", "incompatible") and not cfg.runtime.overwrite:
        _refuse(run_dir, stage, status)
    if status == "current" and not cfg.runtime.overwrite:
        return "skip"
    if status == "stale" and not cfg.runtime.overwrite:
        raise ConfigError(drift_message(run_dir, stage, cfg))
    return "run"
