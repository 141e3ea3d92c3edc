"""The job layer: how a stage's work runs, in this process, in local processes or as SLURM job arrays.

Stages never launch jobs themselves; they call one of two functions here.

``execute(stage, cfg, **kwargs) -> Path``
    Run a whole stage (a name of the stage graph, ``ddm_hpc.graph``). A stage that submits its own
    jobs (``Stage.submits_jobs``: distill, attribute, evaluate, diagnose) runs in this process and
    calls :func:`run_sharded`. Any other stage (train, cluster) runs in this process on
    ``--executor local``, through submitit's debug executor on ``debug``, and as one SLURM job on
    ``slurm`` (where the in-process ``bundle`` keyword is dropped: the job loads its own data; other
    keywords are pickled with the job).

``run_sharded(name, cfg, task_fn, n_items, merge_fn=None, *, stage=None, key_extra="", context=None)``
    Split ``n_items`` work items into ``n = resolve_shards(cfg, n_items)`` tasks and return
    ``merge_fn(cfg, shard_paths, **context)`` (or the shard paths when ``merge_fn`` is None).

    - ``task_fn(cfg, shard, n_shards, **context) -> dict[str, np.ndarray]`` is a plain picklable
      module-level function. It computes items ``shard_range(n_items, shard, n_shards)`` and
      returns HDF5 dataset name -> array. The layer writes them to
      ``RUN/shards/<name>/<name>-SSSSS-of-NNNNN.h5`` atomically (temp file + rename) with root
      attrs ``key`` (hash of the stage's config, the upstream artifacts' uids and ``key_extra``),
      ``shard``, ``n_shards``, ``n_items``, ``schema`` (``storage.SCHEMA_VERSION``) and ``complete``, each
      dataset with a checksum (``storage.create_dataset``). ``context`` (e.g. the loaded data
      bundle) is passed only to tasks run in this process, never pickled.
    - Resume: a shard whose file is complete with the same key, shard count and schema, and whose
      checksums pass, is not recomputed (``--overwrite`` discards every shard of an earlier run).
      A rerun after a failure or a kill therefore redoes only the missing shards.
    - Failure: other shards still run and are kept; then one ``StageError`` line names the failed
      shards, the first error and its log file (``RUN/logs/<name>/...``).
    - ``merge_fn(cfg, shard_paths, **context) -> Path`` builds the stage's artifact from the
      complete shards (in shard order). On SLURM it is submitted as a job (without ``context``)
      with an ``afterok`` dependency on the array. After a successful merge the shard folder is
      removed (the artifact holds everything).
    - Example, one exact retraining per task (``n_items`` = models; each task returns its
      models' outputs, the merge writes the stage's file)::

          def retrain_task(cfg, shard, n_shards, bundle=None):
              i0, i1 = shard_range(n_models, shard, n_shards)
              return {"model_id": np.arange(i0, i1), "probs": ...}

          path = run_sharded("evaluate", cfg, retrain_task, n_models, merge_evaluation,
                             context={"bundle": bundle})

    The merged result must not depend on the shard count: tasks draw randomness per item (e.g.
    ``utils.generator(seed, salt, item_id)``), never from a stream shared across items, and
    compute in blocks that never straddle shards.

Executors (``--executor``): ``local`` runs shards in this process (``--workers 1``, default) or in
``--workers`` spawned processes (worker i computes on ``cuda:(i % GPUs)`` when ``--device`` is ``auto``
or ``cuda``); ``debug`` goes through submitit's in-process debug executor (the SLURM code path without
a cluster); ``slurm`` submits job arrays with submitit's ``AutoExecutor.map_array``. SLURM parameters come from ``--profile slurm/<cluster>.yaml`` and the
``--slurm-*`` flags (flags win); see slurm/README.md. Long tasks are
``submitit.helpers.Checkpointable``: on preemption or timeout SLURM requeues them, and the
requeued task skips a shard that completed meanwhile.

``status(run_dir)`` reports each artifact and each shard set's progress, failed tasks and logs
(``ddm-hpc status RUN_DIR``).

Every job process imports ``--plugins`` first (``utils.load_plugins``), so models and methods a user
registers in their own module exist there too.

Room: imports ``config``, ``graph`` and ``storage``; the stages call it, and it calls no stage except
through the graph's rows (:func:`execute`).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import re
import shutil
import signal
import time
import tomllib
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import submitit
import torch
import yaml

from ddm_hpc import graph
from ddm_hpc.config import Config
from ddm_hpc.errors import ConfigError, CorruptArtifact, StageError
from ddm_hpc.storage import (SCHEMA_VERSION, atomic_h5, create_dataset, read_attrs, schema_of, temp_path,
                             upstream_uids, verify, write_json_atomic)
from ddm_hpc.utils import load_plugins, set_worker_index

log = logging.getLogger(__name__)

EXECUTORS = ("local", "debug", "slurm")
CRASH_ENV = "DDM_CRASH_AT"  # "NAME:SHARD": SIGKILL that task mid-write (tests of crash safety)
# Profile keys -> submitit AutoExecutor parameters.
PROFILE_KEYS = {
    "partition": "slurm_partition", "gpus_per_task": "slurm_gpus_per_task", "gpus_per_node": "gpus_per_node",
    "cpus_per_task": "cpus_per_task", "mem_gb": "mem_gb", "timeout_min": "timeout_min",
    "array_parallelism": "slurm_array_parallelism", "account": "slurm_account", "qos": "slurm_qos",
    "constraint": "slurm_constraint", "additional": "slurm_additional_parameters", "setup": "slurm_setup",
    "signal_delay_s": "slurm_signal_delay_s",
}

TaskFn = Callable[..., dict[str, np.ndarray]]
MergeFn = Callable[[Config, list[Path]], Path]


# ----------------------------------------------------------------------------- shard bookkeeping
def shard_range(n: int, shard: int, n_shards: int) -> tuple[int, int]:
    """Items ``[i0, i1)`` of ``shard``: contiguous, balanced, every item in exactly one shard."""
    if not 0 <= shard < n_shards:
        raise ValueError(f"shard {shard} outside 0..{n_shards - 1}")
    return n * shard // n_shards, n * (shard + 1) // n_shards


def resolve_shards(cfg: Config, n_items: int, name: str = "", announce: bool = True) -> int:
    """Number of tasks for ``n_items`` items: ``--shards``, at most one per item, at least 1.

    A cap is logged (``announce``), naming the shard set ``name``: ``--shards 3`` silently became 2."""
    n = max(1, min(cfg.runtime.shards, n_items))
    if n < cfg.runtime.shards and announce:
        log.info("%s--shards %d, but only %d work item(s) to share out: running %d shard(s)",
                 f"{name}: " if name else "", cfg.runtime.shards, n_items, n)
    return n


def temp_files(run_dir: str | Path) -> list[Path]:
    """Temp files (``.<name>.tmp.<pid>``) under ``run_dir``: what killed writers left behind (never read)."""
    return sorted(p for p in Path(run_dir).rglob(".*.tmp.*") if p.is_file())


def shard_dir(run_dir: str | Path, name: str) -> Path:
    return Path(run_dir) / "shards" / name


def log_dir(run_dir: str | Path, name: str) -> Path:
    return Path(run_dir) / "logs" / name


def shard_path(run_dir: str | Path, name: str, shard: int, n_shards: int) -> Path:
    return shard_dir(run_dir, name) / f"{name}-{shard:05d}-of-{n_shards:05d}.h5"


def shard_paths(run_dir: str | Path, name: str, n_shards: int) -> list[Path]:
    return [shard_path(run_dir, name, s, n_shards) for s in range(n_shards)]


def shard_key(cfg: Config, stage: str, extra: str = "") -> str:
    """Hash of what a shard's content depends on: the stage's config, upstream uids, ``extra``."""
    if stage in graph.BY_NAME:
        base = cfg.stage_key(stage)
        ups = upstream_uids(cfg.runtime.out, stage)
    else:
        base = json.dumps({k: v for k, v in cfg.to_dict().items() if k != "runtime"}, sort_keys=True)
        ups = {}
    blob = json.dumps([base, ups, extra], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def shard_done(path: Path, key: str, n_shards: int) -> bool:
    """True if ``path`` is a complete shard written with ``key`` for ``n_shards`` shards by this artifact schema,
    whose checksums pass (a corrupt shard is recomputed, never merged)."""
    if not path.exists():
        return False
    try:
        with h5py.File(path, "r", locking=False) as f:
            a = dict(f.attrs)
    except OSError:
        return False
    if not (a.get("complete") and a.get("key") == key and int(a.get("n_shards", -1)) == n_shards
            and schema_of(a) == SCHEMA_VERSION):
        return False
    try:
        verify(path)
    except CorruptArtifact as e:
        log.warning("%s; recomputing the shard", e)
        return False
    return True


def _failed_marker(path: Path) -> Path:
    return path.with_name(path.name + ".failed.json")


def _absolute(cfg: Config) -> Config:
    """A copy of ``cfg`` whose run directory is absolute (jobs may start elsewhere)."""
    return dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, out=str(Path(cfg.runtime.out).resolve())))


# ----------------------------------------------------------------------------- the task
class ShardTask(submitit.helpers.Checkpointable):
    """One shard: run ``task_fn`` and write its arrays atomically; skip it if already complete.

    Picklable (sent to SLURM jobs and worker processes). As a ``Checkpointable``, a task that
    SLURM preempts or times out is requeued with the same arguments; it then skips the shard
    if it completed meanwhile and otherwise recomputes it (a shard is the unit of resumption).
    """

    def __init__(self, name: str, cfg: Config, task_fn: TaskFn, n_shards: int, n_items: int, key: str,
                 threads: int = 0):
        self.name, self.cfg, self.task_fn = name, cfg, task_fn
        self.n_shards, self.n_items, self.key, self.threads = n_shards, n_items, key, threads

    def __call__(self, shard: int, context: dict[str, Any] | None = None, log_file: Path | None = None) -> str:
        """Compute and write ``shard``; returns the shard file's path."""
        path = shard_path(self.cfg.runtime.out, self.name, shard, self.n_shards)
        if shard_done(path, self.key, self.n_shards):
            return str(path)
        load_plugins(self.cfg.runtime.plugins)
        if self.threads:
            torch.set_num_threads(self.threads)
        if not logging.getLogger().handlers:  # a fresh job process: progress lines go to its log
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        with _log_to(log_file):
            t0 = time.perf_counter()
            log.info("%s: shard %d of %d (items %s..%s)", self.name, shard, self.n_shards,
                     *shard_range(self.n_items, shard, self.n_shards))
            try:
                arrays = self.task_fn(self.cfg, shard, self.n_shards, **(context or {}))
                write_shard(path, arrays, name=self.name, shard=shard, n_shards=self.n_shards,
                            n_items=self.n_items, key=self.key, seconds=time.perf_counter() - t0)
            except Exception:
                log.error("%s: shard %d failed:\n%s", self.name, shard, traceback.format_exc())
                raise
        return str(path)


def write_shard(path: Path, arrays: dict[str, np.ndarray], **attrs: Any) -> None:
    """Write ``arrays`` (dataset name -> array) to ``path`` atomically, with ``attrs`` on the root."""
    crash = os.environ.get(CRASH_ENV, "")
    with atomic_h5(path) as f:
        for i, (k, v) in enumerate(arrays.items()):
            create_dataset(f, k, data=np.asarray(v))
            if crash == f"{attrs.get('name')}:{attrs.get('shard')}" and i == len(arrays) // 2:
                f.flush()
                image = f.id.get_file_image()  # built in memory: half its image on disk, as a kill mid-write
                temp_path(path).write_bytes(image[:len(image) // 2])
                os.kill(os.getpid(), signal.SIGKILL)  # test hook: die with a half-written temp file
        for k, v in attrs.items():
            f.attrs[k] = v
        f.attrs["schema"] = SCHEMA_VERSION
    _failed_marker(path).unlink(missing_ok=True)


@contextlib.contextmanager
def _log_to(path: Path | None) -> Iterator[None]:
    """Copy this package's log records (and tracebacks) to ``path`` while the block runs."""
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("ddm_hpc")
    old_level = root.level
    root.addHandler(handler)
    if root.getEffectiveLevel() > logging.INFO:
        root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()


class MergeTask(submitit.helpers.Checkpointable):
    """The merge step as a job: ``merge_fn(cfg, shard_paths)``."""

    def __init__(self, cfg: Config, merge_fn: MergeFn, paths: list[Path]):
        self.cfg, self.merge_fn, self.paths = cfg, merge_fn, paths

    def __call__(self) -> Path:
        load_plugins(self.cfg.runtime.plugins)
        return self.merge_fn(self.cfg, self.paths)


# ----------------------------------------------------------------------------- run a sharded stage
def run_sharded(name: str, cfg: Config, task_fn: TaskFn, n_items: int, merge_fn: MergeFn | None = None, *,
                stage: str | None = None, key_extra: str = "", context: dict[str, Any] | None = None
                ) -> Path | list[Path]:
    """Run ``task_fn`` over ``n_items`` items in shards on the configured executor, then merge.

    Args:
        name: shard set name (folder ``RUN/shards/<name>``, logs ``RUN/logs/<name>``).
        cfg: the run's config; its ``runtime`` picks the executor, shard count and SLURM options.
        task_fn: picklable ``task_fn(cfg, shard, n_shards, **context) -> {dataset: array}``.
        n_items: work items; shards are ``shard_range(n_items, s, n)``.
        merge_fn: ``merge_fn(cfg, shard_paths, **context) -> Path`` writing the artifact; None returns
            the paths.
        stage: whose config and upstream artifacts the shards depend on (default ``name``).
        key_extra: anything else the shards depend on (e.g. a plan computed from earlier shards).
        context: keyword arguments for tasks and the merge run in this process only (e.g. ``bundle``);
            never pickled.

    Returns:
        ``merge_fn``'s path, or the list of complete shard paths when ``merge_fn`` is None.

    Raises:
        StageError: one line naming the failed shards, the first error and its log file.
    """
    cfg = _absolute(cfg)
    run_dir = Path(cfg.runtime.out)
    n = resolve_shards(cfg, n_items, name)
    key = shard_key(cfg, stage or name, key_extra)
    paths = shard_paths(run_dir, name, n)
    if cfg.runtime.overwrite and shard_dir(run_dir, name).exists():
        # --overwrite recomputes whatever exists: shards left by an earlier run are not reused (a rerun without
        # --overwrite resumes them), since their key cannot see a corrupt-then-restored upstream file
        log.info("%s: --overwrite: discarding the shards of an earlier run in %s", name, shard_dir(run_dir, name))
        remove_shards(run_dir, name)
    pending = [s for s, p in enumerate(paths) if not shard_done(p, key, n)]
    if len(pending) < n:
        log.info("%s: %d of %d shards already complete, running %d", name, n - len(pending), n, len(pending))
    executor = cfg.runtime.executor
    if executor == "slurm":
        result = _run_slurm(name, cfg, task_fn, n, n_items, key, pending, merge_fn, paths)
    else:
        failures = _run_here(name, cfg, task_fn, n, n_items, key, pending, context)
        _raise_failures(name, n, failures, paths)
        result = merge_fn(cfg, paths, **(context or {})) if merge_fn is not None else paths
    if merge_fn is not None:
        remove_shards(run_dir, name)
    return result


def remove_shards(run_dir: str | Path, name: str) -> None:
    """Delete a shard set once its artifact is written (and ``RUN/shards`` if now empty)."""
    shutil.rmtree(shard_dir(run_dir, name), ignore_errors=True)
    with contextlib.suppress(OSError):
        (Path(run_dir) / "shards").rmdir()  # only succeeds if no other shard set is left


def _run_here(name: str, cfg: Config, task_fn: TaskFn, n: int, n_items: int, key: str, pending: list[int],
              context: dict[str, Any] | None) -> dict[int, tuple[str, str]]:
    """local/debug executors; returns shard -> (error line, log path) of failed shards."""
    logs = log_dir(cfg.runtime.out, name)
    failures: dict[int, tuple[str, str]] = {}
    workers = cfg.runtime.worker_count
    if cfg.runtime.executor == "debug":
        ex = submitit.AutoExecutor(folder=logs / "%j", cluster="debug")
        jobs = ex.map_array(ShardTask(name, cfg, task_fn, n, n_items, key), pending)
        for s, job in zip(pending, jobs):
            try:
                job.result()
            except Exception as e:  # noqa: BLE001 - every task failure is collected and reported
                failures[s] = (job_error_line(e), str(job.paths.stderr))
        return failures
    if workers <= 1 or len(pending) <= 1:
        task = ShardTask(name, cfg, task_fn, n, n_items, key)
        for s in pending:
            lf = logs / f"shard-{s:05d}-of-{n:05d}.log"
            try:
                task(s, context=context, log_file=lf)
            except Exception as e:  # noqa: BLE001
                failures[s] = (job_error_line(e), str(lf))
        return failures
    workers = min(workers, len(pending))
    threads = cfg.runtime.threads or max(1, (os.cpu_count() or 1) // workers)
    task = ShardTask(name, cfg, task_fn, n, n_items, key, threads=threads)
    ctx = multiprocessing.get_context("spawn")
    indices = ctx.Queue()  # worker i computes on cuda:(i % GPUs) (utils.set_worker_index)
    for i in range(workers):
        indices.put(i)
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                                initargs=(indices,)) as pool:
        futs = {pool.submit(task, s, None, logs / f"shard-{s:05d}-of-{n:05d}.log"): s for s in pending}
        for fut in concurrent.futures.as_completed(futs):
            s = futs[fut]
            try:
                fut.result()
            except Exception as e:  # noqa: BLE001 (BrokenProcessPool included: a killed worker)
                failures[s] = (job_error_line(e), str(logs / f"shard-{s:05d}-of-{n:05d}.log"))
    return failures


def _init_worker(indices: Any) -> None:
    """Pool initializer: take this worker's index (0..workers-1) from the queue, so that ``--device auto``/``cuda``
    resolves to GPU ``index % device_count`` here and the workers spread over the node's GPUs."""
    try:
        set_worker_index(indices.get(timeout=10))
    except Exception:  # noqa: BLE001 - no index left (a replacement worker): the default device
        set_worker_index(None)


def _run_slurm(name: str, cfg: Config, task_fn: TaskFn, n: int, n_items: int, key: str, pending: list[int],
               merge_fn: MergeFn | None, paths: list[Path]) -> Path | list[Path]:
    """Submit the pending shards as one job array and the merge as an afterok job; wait for both."""
    logs = log_dir(cfg.runtime.out, name)
    params = slurm_parameters(cfg)
    jobs: list[Any] = []
    if pending:
        ex = make_executor(logs, params, f"ddm-{name}")
        jobs = ex.map_array(ShardTask(name, cfg, task_fn, n, n_items, key), pending)
        array_id = str(jobs[0].job_id).split("_")[0]
        log.info("%s: submitted %d shard tasks as SLURM array %s (logs %s)", name, len(jobs), array_id, logs)
        _record_jobs(cfg.runtime.out, name, {s: str(j.job_id) for s, j in zip(pending, jobs)}, logs)
    merge_job = None
    if merge_fn is not None:
        mparams = {k: v for k, v in params.items() if k not in ("slurm_array_parallelism", "slurm_gpus_per_task",
                                                                "gpus_per_node")}
        if jobs:
            extra = dict(mparams.get("slurm_additional_parameters") or {})
            extra["dependency"] = f"afterok:{array_id}"
            mparams["slurm_additional_parameters"] = extra
        mex = make_executor(logs, mparams, f"ddm-{name}-merge")
        merge_job = mex.submit(MergeTask(cfg, merge_fn, paths))
        log.info("%s: merge submitted as SLURM job %s (afterok)", name, merge_job.job_id)
    failures: dict[int, tuple[str, str]] = {}
    for s, job in zip(pending, jobs):
        try:
            job.result()
        except Exception as e:  # noqa: BLE001 - every task failure is collected and reported
            failures[s] = (job_error_line(e), str(job.paths.stderr))
    if failures and merge_job is not None:
        merge_job.cancel(check=False)
    _raise_failures(name, n, failures, paths)
    if merge_job is None:
        return paths
    try:
        return Path(merge_job.result())
    except Exception as e:  # noqa: BLE001
        raise StageError(f"{name}: the merge job {merge_job.job_id} failed ({job_error_line(e)}); log "
                         f"{merge_job.paths.stderr}; the shards are kept: rerun the same command") from None


def _record_jobs(run_dir: str | Path, name: str, jobs: dict[int, str], logs: Path) -> None:
    write_json_atomic(shard_dir(run_dir, name) / "jobs.json", {"jobs": {str(k): v for k, v in jobs.items()},
                                                               "logs": str(logs)})


def job_error_line(e: BaseException) -> str:
    """The last meaningful line of an exception (submitit wraps remote tracebacks)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    exc_lines = [ln for ln in lines if re.match(r"^[A-Za-z_.]*(Error|Exception|Interrupt)\b", ln)]
    text = exc_lines[-1] if exc_lines else (lines[-1] if lines else "")
    return f"{type(e).__name__}: {text}" if not exc_lines else text


def _raise_failures(name: str, n: int, failures: dict[int, tuple[str, str]], paths: list[Path]) -> None:
    """Record failed shards beside their files and raise one StageError line."""
    if not failures:
        return
    for s, (err, logf) in failures.items():
        write_json_atomic(_failed_marker(paths[s]), {"shard": s, "error": err, "log": logf})
    first = min(failures)
    err, logf = failures[first]
    shown = ",".join(str(s) for s in sorted(failures)[:8]) + ("..." if len(failures) > 8 else "")
    raise StageError(f"{name}: {len(failures)} of {n} shard tasks failed (shards {shown}); shard {first}: {err} "
                     f"(log: {logf}); the {n - len(failures)} others are kept: fix the cause and rerun the same "
                     "command to redo only the missing shards")


# ----------------------------------------------------------------------------- SLURM parameters
def load_profile(path: str | Path) -> dict[str, Any]:
    """A SLURM profile (YAML or TOML) as a dict of PROFILE_KEYS; unknown keys raise ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--profile {path}: no such file; use one of slurm/*.yaml or write one (slurm/README.md)")
    text = p.read_text()
    data = tomllib.loads(text) if p.suffix == ".toml" else (yaml.safe_load(text) or {})
    if not isinstance(data, dict):
        raise ConfigError(f"--profile {path}: expected a mapping of SLURM options (partition:, mem_gb:, ...)")
    bad = sorted(set(data) - set(PROFILE_KEYS))
    if bad:
        raise ConfigError(f"--profile {path}: unknown key(s) {bad}; known: {', '.join(sorted(PROFILE_KEYS))}")
    return data


def slurm_parameters(cfg: Config) -> dict[str, Any]:
    """submitit AutoExecutor parameters from ``--profile`` overridden by the ``--slurm-*`` flags."""
    rt = cfg.runtime
    prof = load_profile(rt.profile) if rt.profile else {}
    flags = {"partition": rt.slurm_partition or None, "gpus_per_task": rt.slurm_gpus_per_task,
             "cpus_per_task": rt.slurm_cpus_per_task, "mem_gb": rt.slurm_mem_gb, "timeout_min": rt.slurm_time,
             "array_parallelism": rt.slurm_array_parallelism, "account": rt.slurm_account or None,
             "qos": rt.slurm_qos or None, "constraint": rt.slurm_constraint or None}
    merged = {**prof, **{k: v for k, v in flags.items() if v is not None}}
    if rt.slurm_extra:
        extra = dict(merged.get("additional") or {})
        for item in rt.slurm_extra.split(";"):
            if item.strip():
                k, _, v = item.strip().lstrip("-").partition("=")
                extra[k.strip()] = v.strip() if v else True
        merged["additional"] = extra
    params = {PROFILE_KEYS[k]: v for k, v in merged.items() if v is not None}
    if "mem_gb" in params:
        params["mem_gb"] = float(params["mem_gb"])
    return params


class _NoSacctNoise(logging.Filter):
    """Drop submitit's per-poll 'Bypassing sacct error' warning: without an accounting daemon (as on
    the single-node test cluster) every poll fails, while results still come back through files."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Bypassing sacct error" not in record.getMessage()


def make_executor(folder: Path, params: dict[str, Any], job_name: str) -> submitit.AutoExecutor:
    """A SLURM AutoExecutor writing logs to ``folder/%j`` (raises ConfigError without sbatch)."""
    if shutil.which("sbatch") is None or shutil.which("srun") is None:
        raise ConfigError("--executor slurm: sbatch/srun not found on PATH; run on a SLURM login node, or use "
                          "--executor local")
    sub_log = logging.getLogger("submitit")
    if not any(isinstance(f, _NoSacctNoise) for f in sub_log.filters):
        sub_log.addFilter(_NoSacctNoise())
    ex = submitit.AutoExecutor(folder=Path(folder) / "%j", cluster="slurm")
    ex.update_parameters(name=job_name, **params)
    return ex


# ----------------------------------------------------------------------------- whole stages
class StageJob:
    """A whole stage as a job: ``graph.stage(name).implementation().run(cfg, **kwargs)``, plugins imported first.

    Picklable (it carries the stage's name, not its function); not requeued on preemption, as a stage that
    does not shard its work has no partial result to resume from."""

    def __init__(self, name: str, cfg: Config, kwargs: dict[str, Any]):
        self.name, self.cfg, self.kwargs = name, cfg, kwargs

    def __call__(self) -> Path:
        load_plugins(self.cfg.runtime.plugins)
        return graph.stage(self.name).implementation().run(self.cfg, **self.kwargs)


def execute(stage: str, cfg: Config, **kwargs: Any) -> Path:
    """Run stage ``stage`` (``run(cfg, **kwargs)`` of its module) on the configured executor; returns its artifact.

    Stages that submit their own jobs (``graph.Stage.submits_jobs``) run here. Others run here on
    ``local``, through submitit's debug executor on ``debug``, and as one SLURM job on ``slurm``
    (without ``bundle``, an in-process convenience; other ``kwargs`` go with the job).
    """
    executor = cfg.runtime.executor
    if executor not in EXECUTORS:
        raise ConfigError(f"--executor {executor!r} is not available: use one of {', '.join(EXECUTORS)}")
    row = graph.stage(stage)
    if executor == "local" or row.submits_jobs:
        return row.implementation().run(cfg, **kwargs)
    cfg = _absolute(cfg)
    logs = log_dir(cfg.runtime.out, stage)
    if executor == "debug":
        job = submitit.AutoExecutor(folder=logs / "%j", cluster="debug").submit(StageJob(stage, cfg, kwargs))
    else:
        params = {k: v for k, v in slurm_parameters(cfg).items() if k != "slurm_array_parallelism"}
        remote = {k: v for k, v in kwargs.items() if k != "bundle"}  # the job loads its own data
        job = make_executor(logs, params, f"ddm-{stage}").submit(StageJob(stage, cfg, remote))
        log.info("%s: submitted as SLURM job %s (log %s)", stage, job.job_id, job.paths.stderr)
    try:
        return Path(job.result())
    except Exception as e:  # noqa: BLE001
        raise StageError(f"{stage}: job {job.job_id} failed ({job_error_line(e)}); log {job.paths.stderr}: fix the "
                         "cause and rerun the same command (completed stages are kept)") from None


# ----------------------------------------------------------------------------- status
def status(run_dir: str | Path) -> str:
    """Per-stage artifact state and per-shard-set progress, failed tasks and their logs."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise StageError(f"{run_dir} is not a run directory: pass the --out of an earlier run")
    lines = [f"run directory: {run_dir}"]
    for stage, fname in graph.ARTIFACTS.items():
        a = read_attrs(run_dir / fname)
        state = f"complete ({a.get('created', '?')}, {float(a.get('seconds', 0)):.1f} s)" if a else "missing"
        if a is not None or (run_dir / fname).exists():
            try:
                verify(run_dir / fname, stage)
            except CorruptArtifact as e:
                state = f"CORRUPT: {e}"
        lines.append(f"  {stage:<10} {fname:<16} {state}")
    root = run_dir / "shards"
    sets = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not sets:
        lines.append("  no shards in progress")
    for d in sets:
        by_n: dict[int, list[int]] = {}
        for p in d.glob(f"{d.name}-*-of-*.h5"):
            m = re.match(rf"{re.escape(d.name)}-(\d+)-of-(\d+)\.h5$", p.name)
            if m:
                by_n.setdefault(int(m.group(2)), [])
                with contextlib.suppress(OSError), h5py.File(p, "r", locking=False) as f:
                    if f.attrs.get("complete"):
                        by_n[int(m.group(2))].append(int(m.group(1)))
        failed = sorted(d.glob("*.failed.json"))
        for n, done in sorted(by_n.items()) or [(0, [])]:
            lines.append(f"  shards {d.name}: {len(done)} of {n or '?'} complete"
                         + (f", missing {_ranges(sorted(set(range(n)) - set(done)))}" if n and len(done) < n else ""))
        jobs = d / "jobs.json"
        if jobs.exists():
            info = json.loads(jobs.read_text())
            ids = sorted(set(v.split("_")[0] for v in info["jobs"].values()))
            lines.append(f"    SLURM job(s) {', '.join(ids)}; logs {info['logs']}")
        for fj in failed:
            info = json.loads(fj.read_text())
            lines.append(f"    FAILED shard {info['shard']}: {info['error']} (log: {info['log']})")
    left = temp_files(run_dir)
    if left:
        size = sum(p.stat().st_size for p in left) / 2**20
        lines.append(f"  {len(left)} temp file(s) of interrupted writers ({size:.1f} MiB, never read; the next command "
                     f"on this directory removes them): {', '.join(str(p.relative_to(run_dir)) for p in left[:3])}"
                     + (" ..." if len(left) > 3 else ""))
    return "\n".join(lines)


def _ranges(xs: list[int]) -> str:
    """[0,1,2,5] -> '0-2,5'."""
    out, i = [], 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(f"{xs[i]}-{xs[j]}" if j > i else str(xs[i]))
        i = j + 1
    return ",".join(out)


__all__ = ["execute", "run_sharded", "shard_range", "resolve_shards", "shard_paths", "shard_key", "temp_files",
           "slurm_parameters", "load_profile", "status", "EXECUTORS"]
