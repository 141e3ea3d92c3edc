"""Stage ``diagnose``: model behaviours beyond one prediction (paper sec. 4, supplementary sec. 9).

Each diagnostic is a task (``diagnose.base.Task``) registered by its module:

  useless   Table 3: rank clusters by the global validation objective (Eq. 14, Dist2 summed over the
            validation images), remove the lowest-ranked 1-50 % of the training data, retrain exactly,
            report test accuracy against random removal of the same amount (``removal``).
  noisy     Table 6: corrupt a fraction of the training images (additive noise, label flips), run the
            pipeline on the corrupted copy, remove the worst-ranked 10-40 %, retrain; accuracy against
            random removal and a loss-ranking baseline, and precision/recall of the corrupted rows
            (``removal``).
  unlearn   Table 4: theta_tau fine-tuned on all synsets (DDM, DDM-match), and single clusters unlearned
            by their synset against exact retraining without them and gradient ascent on the cluster's
            real images (``unlearn``).
  privacy   Fig. 4/5: synset PNG grids (reverse GM beside forward GM), nearest real image by L2 and
            SSIM against real-vs-real nearest neighbours, loss-based membership inference of a model
            trained on the synset (``privacy``).
  transfer  Table 7: KL(student, teacher) as the objective; remove the top-ranked clusters from the
            teacher's data, retrain it, distil a student with Eq. 15 (``removal``).
  pictures  Fig. 3 class x class heat map, top-k responsible clusters per query as image grids of
            their members, predicted vs exact scatter (``pictures``).

A task declares the variant runs it reads (the forward-matched synsets, the learned-label synsets,
the pipeline on a corrupted copy); the pipeline makes them before this stage runs. Every task writes
``RUN/diagnose/<name>.h5`` (its numbers; temp file + rename) and PNGs under ``RUN/diagnose/``;
:func:`run` then writes ``RUN/diagnostics.md`` embedding them all.

Room: a stage (imports ``config``, ``context``, ``data``, ``importer``, ``variants``, and ``diagnose.base`` with the task
modules ``diagnose.pictures``, ``diagnose.privacy``, ``diagnose.removal``, ``diagnose.unlearn``).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from ddm_hpc.config import Config
from ddm_hpc.context import RunContext
from ddm_hpc.data import DatasetBundle
from ddm_hpc.diagnose import pictures, privacy, removal, unlearn  # noqa: F401 (each registers its tasks)
from ddm_hpc.diagnose.base import TASKS, Section, diagnose_dir, read_section, write_markdown, write_section
from ddm_hpc.importer import check_retrainable
from ddm_hpc.variants import Variant

log = logging.getLogger(__name__)


RETRAINS_NOT = {"privacy", "pictures"}  # the tasks that never retrain exactly


def check(cfg: Config) -> None:
    """An imported run states its recipe before a task retrains it (:func:`~ddm_hpc.importer.check_retrainable`)."""
    if set(cfg.diagnose.task_list()) - RETRAINS_NOT:
        check_retrainable(cfg)


def variants(cfg: Config) -> list[Variant]:
    """The variant runs of the ``--tasks`` (made by the pipeline before the stage runs)."""
    return [v for name in cfg.diagnose.task_list() for v in TASKS[name].variants(cfg)]


def run(cfg: Config, bundle: DatasetBundle | None = None) -> Path:
    """Run ``--tasks`` on a finished run (train .. attribute) and write ``RUN/diagnostics.md``."""
    ctx = RunContext(cfg, bundle)
    for name in cfg.diagnose.task_list():
        t0 = time.perf_counter()
        log.info("diagnose: %s", name)
        sec = TASKS[name].run(ctx)
        path = write_section(ctx, sec, time.perf_counter() - t0)
        log.info("diagnose: %s done in %.1f s -> %s", name, time.perf_counter() - t0, path)
    return write_markdown(cfg.runtime.out)


def summary(run_dir: str | Path, n_show: int = 10) -> list[str]:
    """The ``ddm-hpc show`` line of the diagnostics (``diagnostics.md`` and its sections)."""
    md = Path(run_dir) / "diagnostics.md"
    names = sorted(p.stem for p in (Path(run_dir) / "diagnose").glob("*.h5") if p.stem in TASKS)
    return [f"  diagnose   {md} ({', '.join(names)})"] if md.is_file() and names else []


__all__ = ["run", "variants", "summary", "TASKS", "Section", "diagnose_dir", "read_section", "write_section",
           "write_markdown"]
