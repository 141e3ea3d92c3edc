"""The attribution methods ``ddm-hpc evaluate`` compares, each scoring every (query, cluster) pair.

Every method returns ``scores`` float32 [Q, K] on the run's k-means clusters with one convention:
**higher = more responsible** for the query's prediction (removing the cluster should change it
more; for the signed Dist2/LDS reading: removing it should raise the query's cross-entropy).

  random      seeded uniform scores (the paper's "Random select").
  predict     clusters whose images get the most similar predictions: -|p(query) - mean p(cluster)|_2
              with p the softmax of theta_tau (the paper's "Predict-based").
  clustering  nearest cluster centroid in the target's penultimate-feature space, clusters of the
              query's predicted class first (the paper's "Clustering-based").
  ddm         this run's attribution.h5 (flat search), one score matrix per objective.
  ddm-match   the same pipeline with forward gradient matching, run in ``RUN/variants/ddm-match``
              on this run's train.h5 and clusters.h5.
  ddm-soft    reverse matching with learned soft labels (``--syn-labels learn``; not in the paper), run
              in ``RUN/variants/ddm-soft`` on this run's train.h5 and clusters.h5.
  ddm-seq     "DDM w/o cluster": clusters by sequence number (``RUN/variants/ddm-seq``, on this
              run's train.h5). Its scores live on other clusters, so they are spread evenly over
              each sequential cluster's members and summed per k-means cluster.
  tracin      TracInCP over ``--peer-checkpoints`` checkpoints, per-sample scores summed per cluster.
  trak        TRAK with a ``--proj-dim`` random projection, per-sample scores summed per cluster.

DDM methods carry one score matrix per objective (``per_objective``): the Eq. 10 metric Dist_m
locates with the Dist_m scores, as the paper does. Other methods have one responsibility score;
Dist1 and Dist2 locate its maximum and Dist3 (the *least* influential cluster) its minimum.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ddm_hpc.config import Config, merge
from ddm_hpc.data import DatasetBundle
from ddm_hpc.errors import ConfigError, StageError
from ddm_hpc.models import penultimate_features
from ddm_hpc.storage import artifact_path, open_read, read_attrs, stage_status
from ddm_hpc.train import TrajectoryReader, build_target, load_into
from ddm_hpc.utils import generator

log = logging.getLogger(__name__)


@dataclass
class MethodResult:
    """Scores of one method and what they cost.

    Attributes:
        scores: float32 [Q, K], higher = more responsible.
        seconds: online wall time (answering these queries, given the offline artifacts).
        offline_seconds: one-off cost shared by all queries (distillation; 0 if none).
        per_objective: DDM only: objective name -> float32 [Q, K] from the same fine-tunings.
        note: how the scores were obtained, for the report.
    """

    scores: torch.Tensor
    seconds: float
    offline_seconds: float = 0.0
    per_objective: dict[str, torch.Tensor] = field(default_factory=dict)
    note: str = ""

    def for_metric(self, metric: str) -> torch.Tensor:
        """Scores whose argmax locates the cluster for Eq. 10's ``metric`` (dist1, dist2, dist3)."""
        if metric in self.per_objective:
            return self.per_objective[metric]
        return -self.scores if metric == "dist3" else self.scores


@dataclass
class Context:
    """What every method needs: the run, its data, its queries and its clusters."""

    cfg: Config
    bundle: DatasetBundle
    query_pos: torch.Tensor  # int64 [Q] positions in the test subset
    assignment: torch.Tensor  # int64 [N]
    cluster_class: torch.Tensor  # int64 [K]
    device: torch.device

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.runtime.out)

    @property
    def k(self) -> int:
        return len(self.cluster_class)

    @property
    def query_x(self) -> torch.Tensor:
        return self.bundle.x_test[self.query_pos]

    @property
    def query_y(self) -> torch.Tensor:
        return self.bundle.y_test[self.query_pos]

    def trained_model(self) -> nn.Module:
        """theta_tau loaded into the target architecture, in eval mode on the device."""
        reader = TrajectoryReader(artifact_path(self.run_dir, "train"))
        model = load_into(build_target(self.cfg, self.bundle), reader.table, reader.flat(reader.tau))
        return model.to(self.device).eval()


def cluster_means(values: torch.Tensor, assignment: torch.Tensor, k: int) -> torch.Tensor:
    """Mean of the rows of ``values`` [N, D] per cluster -> [K, D] (zeros for an empty cluster)."""
    sums = torch.zeros(k, values.shape[1], dtype=values.dtype).index_add_(0, assignment, values)
    counts = torch.bincount(assignment, minlength=k).clamp(min=1).to(values.dtype)
    return sums / counts[:, None]


def _batched(model: nn.Module, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], device: torch.device,
             batch: int = 1024) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([fn(x[i:i + batch].to(device)).float().cpu() for i in range(0, len(x), batch)])


# ----------------------------------------------------------------------------- baselines
def random_scores(ctx: Context) -> MethodResult:
    t0 = time.perf_counter()
    s = torch.rand(len(ctx.query_pos), ctx.k, generator=generator(ctx.cfg.seed, 61))
    return MethodResult(s, time.perf_counter() - t0, note="uniform random (seeded)")


def predict_scores(ctx: Context) -> MethodResult:
    t0 = time.perf_counter()
    model = ctx.trained_model()
    sm = lambda xb: model(xb).softmax(-1)  # noqa: E731
    p_train = _batched(model, ctx.bundle.x_train, sm, ctx.device)
    p_query = _batched(model, ctx.query_x, sm, ctx.device)
    means = cluster_means(p_train, ctx.assignment, ctx.k)
    s = -torch.cdist(p_query.double(), means.double()).float()
    return MethodResult(s, time.perf_counter() - t0, note="-L2 between query softmax and cluster mean softmax")


def clustering_scores(ctx: Context) -> MethodResult:
    t0 = time.perf_counter()
    model = ctx.trained_model()
    feat = lambda xb: penultimate_features(model, xb)  # noqa: E731
    f_train = _batched(model, ctx.bundle.x_train, feat, ctx.device)
    f_query = _batched(model, ctx.query_x, feat, ctx.device)
    pred = _batched(model, ctx.query_x, lambda xb: model(xb).argmax(-1).float(), ctx.device).long()
    d = torch.cdist(f_query.double(), cluster_means(f_train.double(), ctx.assignment, ctx.k))
    other = (ctx.cluster_class[None, :] != pred[:, None]).double()
    s = -(d + other * (d.max() + 1.0))  # every cluster of the predicted class ranks above the others
    return MethodResult(s.float(), time.perf_counter() - t0,
                        note="-L2 to the cluster centroid in penultimate features; predicted class first")


# ----------------------------------------------------------------------------- DDM and its variants
def read_ddm_scores(run_dir: Path, note: str) -> MethodResult:
    """A run's flat attribution scores (every objective) and its online/offline seconds."""
    path = artifact_path(run_dir, "attribute")
    with open_read(path) as f:
        if str(f.attrs["query_mode"]) != "single":
            raise ConfigError(f"{path} was made with --query-mode batch: evaluate needs per-query scores, rerun "
                              "attribute with --query-mode single")
        if "objectives" not in f:
            raise ConfigError(f"{path} has no flat scores (it was run with --search hierarchical): rerun attribute "
                              "with --search flat or both before evaluate")
        per = {name: torch.from_numpy(f["objectives"][name]["scores"][()]) for name in f["objectives"]}
        objective = str(f.attrs["objective"])
        online = float(f.attrs.get("seconds_flat", f.attrs["seconds"]))
    offline = float(read_attrs(artifact_path(run_dir, "distill"))["seconds"])
    # the signed responsibility for LDS is the CE effect (dist2); the stored objective is reported too
    main = per.get("dist2", per[objective])
    return MethodResult(main, online, offline, {k: v for k, v in per.items() if k in ("dist1", "dist2", "dist3")},
                        note=f"{note}; attribute objective {objective}")


def _link_or_copy(src: Path, dst: Path) -> None:
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


def variant_run(ctx: Context, name: str, overrides: dict, shared: tuple[str, ...], stages: tuple[str, ...],
                sources: dict[str, Path] | None = None) -> Path:
    """Run ``stages`` of a variant of this run in ``RUN/variants/<name>`` (resumable).

    The variant shares the ``shared`` artifacts (hard links, so the same uids) of this run, or of the
    run directory ``sources[stage]`` (e.g. another variant's synsets), and differs by ``overrides``
    (a nested config dict). Up-to-date variant artifacts are reused.
    """
    from ddm_hpc.pipeline import run_stages

    out = ctx.run_dir / "variants" / name
    for stage in shared:
        _link_or_copy(artifact_path((sources or {}).get(stage, ctx.run_dir), stage), artifact_path(out, stage))
    d = merge(ctx.cfg.to_dict(), overrides)
    d["runtime"]["out"] = str(out)
    d["runtime"]["overwrite"] = False
    vcfg = Config.from_dict(d)
    for stage in stages:  # a variant's own artifacts belong to evaluate: made with other options, redo them
        if stage_status(out, stage, vcfg) == "stale":
            artifact_path(out, stage).unlink()
    timings = run_stages(vcfg, stages)
    log.info("evaluate: variant %s %s", name, ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()) or "up to date")
    return out


VARIANT_ATTRIBUTE = {"attribute": {"search": "flat"}, "distill": {"levels": "cluster"}}


def ddm_scores(ctx: Context) -> MethodResult:
    return read_ddm_scores(ctx.run_dir, "this run (reverse gradient matching)")


def ddm_match_scores(ctx: Context) -> MethodResult:
    over = merge(VARIANT_ATTRIBUTE, {"distill": {"method": "ddm-match"}})
    out = variant_run(ctx, "ddm-match", over, ("train", "cluster"), ("distill", "attribute"))
    return read_ddm_scores(out, "forward gradient matching, same clusters")


def ddm_soft_scores(ctx: Context) -> MethodResult:
    over = merge(VARIANT_ATTRIBUTE, {"distill": {"syn_labels": "learn"}})
    out = variant_run(ctx, "ddm-soft", over, ("train", "cluster"), ("distill", "attribute"))
    return read_ddm_scores(out, "reverse gradient matching with learned soft labels, same clusters")


def ddm_seq_scores(ctx: Context) -> MethodResult:
    over = merge(VARIANT_ATTRIBUTE, {"cluster": {"cluster_method": "sequential"}})
    out = variant_run(ctx, "ddm-seq", over, ("train",), ("cluster", "distill", "attribute"))
    res = read_ddm_scores(out, "clusters by sequence number, mapped to k-means clusters by membership")
    with open_read(artifact_path(out, "cluster")) as f:
        seq_assign = torch.from_numpy(f["clusters/assignment"][()]).long()
    mapped = {k: spread_to_clusters(v, seq_assign, ctx.assignment, ctx.k) for k, v in res.per_objective.items()}
    return MethodResult(spread_to_clusters(res.scores, seq_assign, ctx.assignment, ctx.k), res.seconds,
                        res.offline_seconds, mapped, res.note)


def spread_to_clusters(scores: torch.Tensor, src_assign: torch.Tensor, dst_assign: torch.Tensor, k: int
                       ) -> torch.Tensor:
    """Re-express [Q, K_src] cluster scores on other clusters: each source cluster's score is spread
    evenly over its members, and the members' shares are summed per destination cluster -> [Q, k]."""
    sizes = torch.bincount(src_assign, minlength=scores.shape[1]).clamp(min=1).to(scores.dtype)
    per_sample = (scores / sizes)[:, src_assign]  # [Q, N]
    return torch.zeros(scores.shape[0], k, dtype=scores.dtype).index_add_(1, dst_assign, per_sample)


# ----------------------------------------------------------------------------- peers
def _peer_inputs(ctx: Context) -> tuple[nn.Module, object, list[torch.Tensor], int]:
    reader = TrajectoryReader(artifact_path(ctx.run_dir, "train"))
    n = ctx.cfg.evaluate.peer_checkpoints
    rows = np.unique(np.linspace(reader.tau, 1, min(n, reader.tau)).round().astype(int))[::-1]
    ckpts = [reader.flat(int(r)) for r in sorted(rows)]
    model = build_target(ctx.cfg, ctx.bundle).to(ctx.device)
    return model, reader.table, ckpts, len(ckpts)


def tracin_cluster_scores(ctx: Context) -> MethodResult:
    from ddm_hpc.peers import to_clusters, tracin_scores

    t0 = time.perf_counter()
    model, table, ckpts, n = _peer_inputs(ctx)
    lr = ctx.cfg.train.lr
    per = tracin_scores(model, table, ckpts, [lr] * n, ctx.bundle.x_train, ctx.bundle.y_train, ctx.query_x,
                        ctx.query_y, device=ctx.device, show_progress=ctx.cfg.runtime.progress)
    s = to_clusters(per, ctx.assignment, ctx.k)
    return MethodResult(s, time.perf_counter() - t0, note=f"TracInCP, {n} checkpoints, summed per cluster")


def trak_cluster_scores(ctx: Context) -> MethodResult:
    from ddm_hpc.peers import to_clusters, trak_scores

    t0 = time.perf_counter()
    model, table, ckpts, n = _peer_inputs(ctx)
    per = trak_scores(model, table, ckpts, ctx.bundle.x_train, ctx.bundle.y_train, ctx.query_x, ctx.query_y,
                      proj_dim=ctx.cfg.evaluate.proj_dim, seed=ctx.cfg.seed, device=ctx.device,
                      show_progress=ctx.cfg.runtime.progress)
    s = to_clusters(per, ctx.assignment, ctx.k)
    return MethodResult(s, time.perf_counter() - t0,
                        note=f"TRAK, proj_dim {ctx.cfg.evaluate.proj_dim}, {n} checkpoints, summed per cluster")


METHOD_FUNCTIONS: dict[str, Callable[[Context], MethodResult]] = {
    "random": random_scores,
    "predict": predict_scores,
    "clustering": clustering_scores,
    "ddm-seq": ddm_seq_scores,
    "ddm-match": ddm_match_scores,
    "ddm": ddm_scores,
    "ddm-soft": ddm_soft_scores,
    "tracin": tracin_cluster_scores,
    "trak": trak_cluster_scores,
}


def score_methods(ctx: Context, names: list[str]) -> dict[str, MethodResult]:
    """Run each named method; a failing method raises (no silent gaps in the table)."""
    out = {}
    for name in names:
        log.info("evaluate: scoring with %s", name)
        res = METHOD_FUNCTIONS[name](ctx)
        if tuple(res.scores.shape) != (len(ctx.query_pos), ctx.k):
            raise StageError(f"method {name} returned scores of shape {tuple(res.scores.shape)}, expected "
                             f"[{len(ctx.query_pos)}, {ctx.k}]")
        out[name] = res
    return out


__all__ = ["MethodResult", "Context", "score_methods", "METHOD_FUNCTIONS", "spread_to_clusters",
           "cluster_means"]
