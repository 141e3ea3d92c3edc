"""Runs stages in the graph's order with resume and config-drift checks, makes variant runs, prints summaries.

:func:`run_command` is what every ``ddm-hpc <stage>`` does: check the options, run the missing
pipeline stages a stage outside ``ddm-hpc run`` reads (evaluate, diagnose), then the stage.
:func:`run_stages` decides per stage (skip a current artifact, refuse one made with other options
unless ``--overwrite``, recompute one whose upstream changed), loads the data once, makes the
variant runs the stage declares (:func:`materialise`) and runs it on the configured executor.
Nothing below this module runs a stage: methods and diagnostics declare their variants
(``ddm_hpc.variants``) and this module makes them.

Room: the top of the library (imports ``config``, ``context``, ``data``, ``graph``, ``launch``, ``storage``,
``variants``, and every stage through the graph's rows); only ``cli`` imports it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from ddm_hpc import graph
from ddm_hpc.config import Config, complete_saved
from ddm_hpc.context import RunContext, load_data
from ddm_hpc.data import DatasetBundle
from ddm_hpc.errors import ConfigError
from ddm_hpc.launch import execute, temp_files
from ddm_hpc.utils import configure_threads
from ddm_hpc.storage import artifact_path, plan_stage, read_attrs, require_upstream, stage_status, write_json_atomic
from ddm_hpc.variants import Variant

log = logging.getLogger(__name__)


def decide(cfg: Config, stages: tuple[str, ...]) -> dict[str, str]:
    """'run' or 'skip' per stage, raising before anything runs on drift or missing inputs."""
    out = Path(cfg.runtime.out)
    decisions: dict[str, str] = {}
    for stage in stages:
        upstream_runs = any(decisions.get(up) == "run" for up in graph.stage(stage).upstream)
        if upstream_runs:
            decisions[stage] = "run"  # its inputs are being recomputed
            continue
        require_upstream(out, stage, cfg)
        decisions[stage] = plan_stage(out, stage, cfg) if graph.stage(stage).artifact else "run"
    return decisions


def check(cfg: Config, stage: str) -> None:
    """The stage's own option checks (``check(cfg)`` of its module, if any), before anything runs."""
    fn = getattr(graph.stage(stage).implementation(), "check", None)
    if fn is not None:
        fn(cfg)


def preflight(cfg: Config, bundle: DatasetBundle, decisions: dict[str, str]) -> None:
    """Checks that need the data but no training, so bad options fail in seconds."""
    n_test, acfg = len(bundle.y_test), cfg.attribute
    n_seen = int(torch.unique(bundle.y_train).numel())
    if n_seen < 2:
        raise ConfigError(f"{bundle.name}: the training set has {n_seen} class; attribution needs at least 2 (with one "
                          "class the classifier's output is constant and every score 0): pass data with 2+ classes")
    if decisions.get("train") == "run":
        RunContext(cfg, bundle).build_model()  # a factory that fails, returns no nn.Module or the wrong width
    if decisions.get("attribute") == "run":
        explicit = acfg.query_positions()
        if explicit is None and acfg.n_queries > n_test:
            raise ConfigError(f"--n-queries {acfg.n_queries} exceeds the {n_test} test images: lower it or raise "
                              "--n-test")
        bad = [q for q in explicit or [] if not 0 <= q < n_test]
        if bad:
            raise ConfigError(f"--query-index {bad} outside the test subset of {n_test} images: use 0..{n_test - 1}")
    if decisions.get("cluster") == "run" and cfg.cluster.small_class == "error":
        counts = torch.bincount(bundle.y_train, minlength=bundle.num_classes)
        c = int(counts.argmin())
        if counts[c] < cfg.cluster.clusters_per_class:
            raise ConfigError(f"class {c} has {int(counts[c])} training images, fewer than --clusters-per-class "
                              f"{cfg.cluster.clusters_per_class}: lower --clusters-per-class, raise --n-train, "
                              "or pass --small-class reduce")


def run_stages(cfg: Config, stages: tuple[str, ...] = graph.RUN) -> dict[str, float]:
    """Run ``stages`` in order, skipping current artifacts; returns seconds per stage run.

    Before a stage runs, the variant runs it declares (``variants(cfg)`` of its module) are made.
    """
    out = Path(cfg.runtime.out)
    decisions = decide(cfg, stages)
    for stage, what in decisions.items():
        if what == "skip":
            log.info("%s: %s is up to date, skipping (pass --overwrite to recompute)", stage,
                     artifact_path(out, stage))
    timings: dict[str, float] = {}
    if "run" not in decisions.values():
        return timings
    t0 = time.perf_counter()
    bundle = load_data(cfg)
    timings["data"] = time.perf_counter() - t0
    preflight(cfg, bundle, decisions)
    configure_threads(cfg.runtime.threads)  # once the options are known good, before the first stage
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "config.json", {k: v for k, v in cfg.to_dict().items() if k != "runtime"})
    for stage in stages:
        if decisions[stage] == "run":
            t0 = time.perf_counter()
            declared = getattr(graph.stage(stage).implementation(), "variants", None)
            if declared is not None:
                materialise(cfg, declared(cfg), bundle)
            execute(stage, cfg, bundle=bundle)
            timings[stage] = time.perf_counter() - t0
    return timings


@contextlib.contextmanager
def run_lock(run_dir: str | Path, command: str) -> Iterator[None]:
    """Hold ``RUN/.lock`` (an exclusive ``flock``, released by the kernel when the process dies, so a killed
    command never leaves it behind) while ``command`` writes the run directory.

    Raises:
        ConfigError: another command holds it (its pid and command named): two commands never interleave
            their artifacts or shards in one run directory.
    """
    run_dir = Path(run_dir)
    made = not run_dir.exists()
    path = run_dir / ".lock"
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise ConfigError(f"{run_dir} is in use by {holder}: wait for it to finish, or pass another --out"
                              ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} (ddm-hpc {command})".encode(), 0)
        # no other command writes here while we hold the lock, so these are orphans; shard folders are left alone
        # (a SLURM task of a killed submitter may still be writing there; a rerun redoes what it leaves)
        left = [p for p in temp_files(run_dir) if "shards" not in p.relative_to(run_dir).parts]
        if left:
            log.info("%s: removing %d temp file(s) left by interrupted writers", run_dir, len(left))
            for p in left:
                p.unlink(missing_ok=True)
        yield
    finally:
        os.close(fd)  # releases the lock
        if made and [p.name for p in run_dir.iterdir()] == [".lock"]:
            shutil.rmtree(run_dir, ignore_errors=True)  # a command that failed before writing leaves nothing


def run_command(cfg: Config, command: str) -> dict[str, float]:
    """``ddm-hpc <command>``: ``run`` (every stage of ``graph.RUN``), one of those stages, or a stage outside
    ``run`` (evaluate, diagnose) after the missing pipeline stages it reads (without ``--overwrite``: that
    applies to the stage asked for). Holds the run directory's lock (:func:`run_lock`) while stages run.
    Returns seconds per stage run."""
    stages = graph.RUN if command == "run" else (command,)
    for stage in dict.fromkeys(up for s in stages for up in (*graph.stage(s).upstream, s)):
        check(cfg, stage)  # every stage it may run, upstream ones included
    timings: dict[str, float] = {}
    with run_lock(cfg.runtime.out, command):
        if command != "run" and not graph.stage(command).in_run:
            keep = dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, overwrite=False))
            timings = run_stages(keep, graph.RUN)
        timings.update(run_stages(cfg, stages))
    return timings


# ----------------------------------------------------------------------------- variant runs
def _link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` as a hard link of ``src`` (a copy where links are impossible); kept if it already is one."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    src_uid = (read_attrs(src) or {}).get("uid")
    if dst.exists():
        if (read_attrs(dst) or {}).get("uid") == src_uid:
            return
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _merged(variants: list[Variant], root: Config) -> list[Variant]:
    """One entry per directory, in first-declared order, running every stage any declaration asked for."""
    by_dir: dict[Path, Variant] = {}
    for v in variants:
        key = v.directory(root)
        if key in by_dir:
            stages = set(by_dir[key].stages) | set(v.stages)
            by_dir[key] = by_dir[key].with_stages(tuple(s.name for s in graph.STAGES if s.name in stages))
        else:
            by_dir[key] = v
    return list(by_dir.values())


def materialise(cfg: Config, variants: list[Variant], bundle: DatasetBundle | None = None) -> list[Path]:
    """Make each variant run of ``cfg``'s run (resumable: up-to-date artifacts are kept); returns their directories.

    Shared artifacts are hard links of the source run's (same uids, so the variant's own stages see them
    as current); a variant's own artifacts made with other options are recomputed (its directory belongs to
    whoever declares it); ``prepare`` makes its inputs first.
    """
    dirs = []
    for v in _merged(variants, cfg):
        out = v.directory(cfg)
        if v.prepare is not None:
            base = v.base_config(cfg)
            v.prepare(RunContext(base, bundle if v.parent is None else None), out)
        for stage in v.shared:
            _link_or_copy(artifact_path(v.source_directory(cfg, stage), stage), artifact_path(out, stage))
        vcfg = v.config(cfg)
        for stage in v.stages:
            if graph.stage(stage).artifact and stage_status(out, stage, vcfg) == "stale":
                artifact_path(out, stage).unlink()
        timings = run_stages(vcfg, v.stages)
        log.info("variant %s: %s", v.path, ", ".join(f"{k} {s:.1f} s" for k, s in timings.items()) or "up to date")
        dirs.append(out)
    return dirs


# ----------------------------------------------------------------------------- reading a run
def summary(run_dir: str | Path, n_show: int = 10) -> str:
    """A human-readable summary of a run directory's artifacts (each stage's ``summary``)."""
    run_dir = Path(run_dir)
    lines = [f"run directory: {run_dir}"]
    for stage in graph.STAGES:
        lines += stage.implementation().summary(run_dir, n_show)
    return "\n".join(lines)


def load_saved_config(run_dir: str | Path) -> dict:
    """The config a run directory was last run with ({} if none); options added since it ran are at the value it ran
    with (``config.complete_saved``)."""
    p = Path(run_dir) / "config.json"
    return complete_saved(json.loads(p.read_text())) if p.exists() else {}


__all__ = ["run_command", "run_stages", "materialise", "summary", "load_saved_config", "decide"]
