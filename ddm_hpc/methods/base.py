"""The attribution-method interface and its registry.

A method is a subclass of :class:`AttributionMethod`; defining it registers it (kronfluence's factor
strategies do the same), and everything that lists methods reads the registry: ``--methods``' help
and check, ``evaluate`` (which scores them), ``report.md`` (labels, row order, plots). A new method is
therefore one file::

    from ddm_hpc.methods import AttributionMethod, MethodResult

    class Nearest(AttributionMethod, name="nearest", label="Nearest images", help="...", scatter=True):
        def score(self, ctx):                      # ctx: ddm_hpc.context.RunContext
            ...
            return MethodResult(scores, seconds)   # float32 [Q, K], higher = more responsible

and ``ddm-hpc evaluate --plugins path/to/nearest.py --methods nearest,ddm`` scores, reports and plots it.
A method that needs a derived run (other synsets, other clusters) declares it in :meth:`variants`;
the pipeline makes it before ``evaluate`` runs, and :meth:`score` only reads it. :meth:`check` refuses a run
the method cannot score (``replay``: a model with buffers) before anything is retrained.

Room: imports ``config``, ``context`` and ``variants``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ddm_hpc.config import Config
from ddm_hpc.context import RunContext
from ddm_hpc.errors import ConfigError, StageError
from ddm_hpc.variants import Variant

log = logging.getLogger(__name__)


@dataclass
class MethodResult:
    """Scores of one method and what they cost.

    Attributes:
        scores: float32 [Q, K], higher = more responsible.
        seconds: online wall time (answering these queries, given the offline artifacts).
        offline_seconds: one-off cost shared by all queries (distillation; 0 if none).
        per_objective: DDM only: objective name -> float32 [Q, K] from the same fine-tunings, each its own scores.
        note: how the scores were obtained, for the report.
        dist1_by: the objective whose scores locate Dist1 (Eq. 10: ``dist1``; displacement synsets: ``dist2``,
            :func:`ddm_hpc.methods.ddm.dist1_rule`); ``per_objective["dist1"]`` stays the Dist1 scores, so the
            report can show both rules.
    """

    scores: torch.Tensor
    seconds: float
    offline_seconds: float = 0.0
    per_objective: dict[str, torch.Tensor] = field(default_factory=dict)
    note: str = ""
    dist1_by: str = "dist1"

    def for_metric(self, metric: str) -> torch.Tensor:
        """Scores whose argmax locates the cluster for Eq. 10's ``metric`` (dist1, dist2, dist3); Dist1 by the
        ``dist1_by`` scores."""
        if metric == "dist1" and self.dist1_by in self.per_objective:
            return self.per_objective[self.dist1_by]
        if metric in self.per_objective:
            return self.per_objective[metric]
        return -self.scores if metric == "dist3" else self.scores


REGISTRY: dict[str, AttributionMethod] = {}  # name -> the method, in registration order


class AttributionMethod:
    """An attribution method ``ddm-hpc evaluate`` compares with exact retraining; subclassing registers it.

    Class keywords (all but ``name`` optional):
        name: its ``--methods`` name and its group in ``evaluation.h5``.
        label: its row in the report (default ``name``).
        help: one line for ``--methods``' help.
        scatter: the report plots its predicted against the exact effect per query.
        heatmap: the report's class x class heat map shows it beside exact retraining.
        table4: Table 4's column for theta_tau fine-tuned on all of its synsets ("" = none); such a method
            other than ``ddm`` (this run's own synsets, always in the table) implements :meth:`synset_run`.
    """

    name: ClassVar[str]
    label: ClassVar[str]
    help: ClassVar[str] = ""
    scatter: ClassVar[bool] = False
    heatmap: ClassVar[bool] = False
    table4: ClassVar[str] = ""

    def __init_subclass__(cls, name: str | None = None, label: str | None = None, help: str = "",
                          scatter: bool = False, heatmap: bool = False, table4: str = "", **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if name is None:  # an abstract intermediate class
            return
        cls.name, cls.label, cls.help = name, label or name, help
        cls.scatter, cls.heatmap, cls.table4 = scatter, heatmap, table4
        if name in REGISTRY and type(REGISTRY[name]).__qualname__ != cls.__qualname__:
            raise ConfigError(f"attribution method {name!r} is already registered by "
                              f"{type(REGISTRY[name]).__module__}; pick another name")
        REGISTRY[name] = cls()

    def variants(self, cfg: Config) -> list[Variant]:
        """The derived runs :meth:`score` reads (made by the pipeline before ``evaluate`` runs)."""
        return []

    def check(self, cfg: Config) -> None:
        """Raise a one-line ConfigError for a run this method cannot score, before ``evaluate`` retrains anything."""

    def synset_run(self, cfg: Config) -> Config | None:
        """The run whose cluster synsets Table 4 unlearns all at once (methods with ``table4``)."""
        return None

    def score(self, ctx: RunContext) -> MethodResult:
        """Scores float32 [Q, K] of every (query, cluster) pair of the run: ``ctx.query_pos`` x ``ctx.k``."""
        raise NotImplementedError


def method(name: str) -> AttributionMethod:
    """The registered method ``name``."""
    return resolve([name])[0]


def resolve(names: list[str]) -> list[AttributionMethod]:
    """The registered methods of ``--methods`` names, in the order given.

    Raises:
        ConfigError: one line naming the unknown names, the registered ones, and how to register more.
    """
    bad = [n for n in names if n not in REGISTRY]
    if bad or not names:
        raise ConfigError(f"--methods {','.join(names)!r}: unknown {bad or 'empty list'}; choose from "
                          f"{', '.join(REGISTRY)} (register others with --plugins MODULE)")
    return [REGISTRY[n] for n in names]


def describe() -> str:
    """The registered methods for ``--help``: ``name (help)``, comma-separated."""
    return ", ".join(f"{m.name} ({m.help})" if m.help else m.name for m in REGISTRY.values())


def score_methods(ctx: RunContext, names: list[str]) -> dict[str, MethodResult]:
    """Run each named method; a failing method raises (no silent gaps in the table)."""
    out = {}
    for m in resolve(names):
        log.info("evaluate: scoring with %s", m.name)
        res = m.score(ctx)
        if tuple(res.scores.shape) != (len(ctx.query_pos), ctx.k):
            raise StageError(f"method {m.name} returned scores of shape {tuple(res.scores.shape)}, expected "
                             f"[{len(ctx.query_pos)}, {ctx.k}]")
        out[m.name] = res
    return out


__all__ = ["AttributionMethod", "MethodResult", "REGISTRY", "method", "resolve", "describe", "score_methods"]
