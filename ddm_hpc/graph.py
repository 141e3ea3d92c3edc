"""The stage graph: one table, read by everything that lists, orders, keys or runs stages.

Each :class:`Stage` row names the stage's artifact in the run directory, the stages it reads
(``upstream``), the config sections its result depends on (its stage key hashes them, with the
seed), the command's help line, and the module that implements it. The CLI builds one
subcommand per row, ``storage`` checks artifacts and upstreams, ``config`` keys stages,
``launch.status`` lists artifacts and ``pipeline`` runs them in this order.

An implementing module (``Stage.module``) defines:

- ``run(cfg, bundle=None) -> Path``: compute the stage and write its artifact;
- ``summary(run_dir, n_show) -> list[str]``: the lines ``ddm-hpc show`` prints for its artifact (``n_show``:
  queries to list, for a stage that lists them);
- optionally ``check(cfg)``: option checks that need more than the config (a registry), run before any stage;
- optionally ``variants(cfg) -> list[Variant]``: derived runs the stage reads, which the pipeline makes
  before ``run`` (``ddm_hpc.variants``).

Room: a leaf. It imports nothing of ddm_hpc; :meth:`Stage.implementation` is the one deliberate
deferred import of the package (the stage modules sit above ``storage`` and ``config``, which read
this table, so a static import here would be a cycle).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline.

    Attributes:
        name: the stage and its subcommand (``ddm-hpc <name>``).
        artifact: file name in the run directory, or None (diagnose writes ``RUN/diagnose/*.h5``).
        upstream: stages whose artifacts it reads (all of them, transitively closed).
        sections: config sections its result depends on; its stage key hashes these and the seed.
        help: one line for ``ddm-hpc --help``.
        module: the module implementing it (``run``, ``summary``, optionally ``variants``).
        in_run: part of ``ddm-hpc run`` (else run alone, after its missing upstream stages).
        submits_jobs: splits its own work into jobs (``launch.run_sharded``: local processes or SLURM arrays),
            so the stage itself runs in the submitting process on every executor.
    """

    name: str
    artifact: str | None
    upstream: tuple[str, ...]
    sections: tuple[str, ...]
    help: str
    module: str
    in_run: bool = True
    submits_jobs: bool = False

    def implementation(self) -> ModuleType:
        """The implementing module (imported on first use: see the module docstring)."""
        return importlib.import_module(self.module)


_PIPELINE = ("data", "model", "train", "cluster", "distill", "attribute")
STAGES: tuple[Stage, ...] = (
    Stage("train", "train.h5", (), _PIPELINE[:3],
          "train the target and record its trajectory -> train.h5", "ddm_hpc.train"),
    Stage("cluster", "clusters.h5", ("train",), _PIPELINE[:4],
          "k-means each class into C clusters -> clusters.h5", "ddm_hpc.cluster"),
    Stage("distill", "synsets.h5", ("train", "cluster"), _PIPELINE[:5],
          "learn a synset per cluster/class (influence matching, or reverse gradient matching) -> synsets.h5",
          "ddm_hpc.distill",
          submits_jobs=True),
    Stage("attribute", "attribution.h5", ("train", "cluster", "distill"), _PIPELINE,
          "perturb synsets, fine-tune, fit the attribution matrix -> attribution.h5", "ddm_hpc.attribute",
          submits_jobs=True),
    Stage("evaluate", "evaluation.h5", ("train", "cluster", "distill", "attribute"), (*_PIPELINE, "evaluate"),
          "exact leave-cluster-out retraining, baselines and peers, LDS -> evaluation.h5 + report.md",
          "ddm_hpc.evaluate", in_run=False, submits_jobs=True),
    Stage("diagnose", None, ("train", "cluster", "distill", "attribute"), (*_PIPELINE, "diagnose"),
          "useless/noisy data, quick unlearning, synset privacy, transferability, pictures -> diagnostics.md",
          "ddm_hpc.diagnose", in_run=False, submits_jobs=True),
)
BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}
RUN: tuple[str, ...] = tuple(s.name for s in STAGES if s.in_run)  # what `ddm-hpc run` runs, in order
ARTIFACTS: dict[str, str] = {s.name: s.artifact for s in STAGES if s.artifact is not None}


def stage(name: str) -> Stage:
    """The row of stage ``name`` (KeyError names the known stages)."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r}; stages: {', '.join(BY_NAME)}") from None


__all__ = ["Stage", "STAGES", "BY_NAME", "RUN", "ARTIFACTS", "stage"]
