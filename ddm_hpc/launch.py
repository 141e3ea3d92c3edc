"""The job layer: how a stage's work is executed.

Only the ``local`` executor exists now (the stage runs in this process). The SLURM/submitit
executors and sharding plug in here; stages call :func:`execute` and never launch jobs
themselves.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ddm_hpc.config import Config
from ddm_hpc.errors import ConfigError

EXECUTORS = ("local",)


def execute(stage_fn: Callable[..., Path], cfg: Config, **kwargs) -> Path:
    """Run ``stage_fn(cfg, **kwargs)`` on the configured executor and return the artifact path."""
    if cfg.runtime.executor == "local":
        return stage_fn(cfg, **kwargs)
    raise ConfigError(f"--executor {cfg.runtime.executor!r} is not available: use one of {', '.join(EXECUTORS)}")
