"""Ground truth for attribution: exact leave-cluster-out retraining, LDS and the paper's metrics.

Every retraining starts from the *same* theta_0 as the full run (``build_target`` with the same
seed) and uses the same schedule and the full run's per-epoch data order with the removed rows
dropped (``train_trajectory(keep=...)``), so a retrained model differs from the full one by the
data removed, not by a reshuffle. With nothing removed it reproduces theta_tau bit for bit.

Seeds: seed offset s trains with init *and* data order from ``cfg.seed + s``. Ground truth with
n seeds averages the leave-out softmax over offsets 0..n-1 (each run with its own seed's order);
the noise floor is full-data reruns with offsets 1..n, compared against the offset-0 base.

Metrics:
  * LDS (cluster level): per query, Spearman correlation across random cluster subsets between
    the predicted effect (sum of the kept clusters' scores) and the retrained output; mean over
    queries.
  * Eq. 10 of the paper: per query, locate the cluster a method ranks highest and measure exact
    retraining without it: Dist1 (x100, L2 change of the softmax), Dist2 (cross-entropy to the
    true label), Dist3 = 1/(1 + Dist1); and the oracle (best cluster per query, per metric).

HDF5 layout written by :func:`write_ground_truth` (the ``gt`` part of ``evaluation.h5``):
  gt/base     float32 [Q, L]             softmax of the full-data model (seed offset 0)
  gt/removed  int64 [n_removed]          cluster ids, aligned with gt/outputs
  gt/outputs  float32 [n_removed, Q, L]  softmax after exact retraining without each cluster
  gt/noise    float32 [n_noise, Q, L]    full-data reruns with seed offsets 1..n_noise
  query_index int64 [Q], query_label int64 [Q]
  attrs: seconds, n_gt_seeds, n_noise_seeds, config (JSON, when given), complete

The stage (``ddm-hpc evaluate``, :func:`run_evaluate`) adds the LDS subsets (``gt/masks``,
``gt/mask_outputs``), every method's scores (``methods/<name>``, see :mod:`ddm_hpc.methods`), the
reference rows and Table 4, then writes ``report.md`` (:mod:`ddm_hpc.report`). Its retrainings
(:func:`retrain_jobs`: base, leave-one-out x seeds, noise seeds, LDS subsets x seeds) run through the
job layer (:func:`ddm_hpc.launch.run_sharded`; local processes or a SLURM array), one shard per retrained
model, merged into ``groundtruth.h5`` keyed by what the retrainings depend on (:func:`retrain_key`), so
a rerun with other methods retrains nothing and an interrupted one redoes only missing shards.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import nn

from ddm_hpc.attribute import objective_values
from ddm_hpc.config import Config
from ddm_hpc.data import DatasetBundle
from ddm_hpc.errors import ConfigError, StageError
from ddm_hpc.launch import sharded
from ddm_hpc.storage import (ParamTable, artifact_path, atomic_h5, open_read, read_attrs, upstream_uids,
                             write_provenance)
from ddm_hpc.train import build_target, load_into, train_trajectory
from ddm_hpc.utils import generator, progress, resolve_device

log = logging.getLogger(__name__)
Ids = Sequence[int] | torch.Tensor | np.ndarray


# ----------------------------------------------------------------------------- exact retraining
def _as_long(x: Ids) -> torch.Tensor:
    """Any integer sequence/array/tensor -> int64 tensor [n] on CPU."""
    return torch.as_tensor(np.asarray(x, dtype=np.int64).reshape(-1))


def keep_mask(assignment: Ids, removed: Ids) -> torch.Tensor:
    """bool [N]: True for training rows whose cluster is not in ``removed``.

    Raises:
        ConfigError: a removed id has no training rows, or nothing would be left to train on.
    """
    assign = _as_long(assignment)
    rem = _as_long(removed)
    present = torch.isin(rem, assign)
    if not present.all():
        raise ConfigError(f"cluster id(s) {rem[~present].tolist()} have no training rows: "
                          f"use ids 0..{int(assign.max())} from clusters.h5")
    keep = ~torch.isin(assign, rem)
    if not keep.any():
        raise ConfigError("removing these clusters leaves no training data: remove fewer clusters")
    return keep


def retrain_without(cfg: Config, bundle: DatasetBundle, assignment: Ids, removed: Ids, seed_offset: int = 0,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """Retrain exactly from theta_0 on D minus the union of the ``removed`` clusters.

    The init and the per-epoch data order come from ``cfg.seed + seed_offset``; removed rows are
    dropped from that order (no reshuffle). With ``removed`` empty and offset 0 the result is the
    full run's theta_tau, bit for bit (on the same device).

    Args:
        cfg: run config (model, train schedule, seed).
        bundle: the dataset; rows of ``bundle.x_train`` align with ``assignment``.
        assignment: int64 [N] cluster id of each training row.
        removed: cluster ids to leave out (may be empty).
        seed_offset: added to ``cfg.seed`` for init and data order.
        device: where to train.

    Returns:
        float32 [P] final flat parameters (theta_tau of the retrained model) on CPU.
    """
    if len(_as_long(assignment)) != len(bundle.y_train):
        raise ConfigError(f"cluster assignment has {len(_as_long(assignment))} rows but the training set has "
                          f"{len(bundle.y_train)}: cluster and train with the same --n-train")
    return retrain_keep(cfg, bundle, keep_mask(assignment, removed), seed_offset, device)


def retrain_keep(cfg: Config, bundle: DatasetBundle, keep: torch.Tensor, seed_offset: int = 0,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """Retrain exactly from theta_0 on the training rows where ``keep`` (bool [N]) is True.

    Same init, schedule and per-epoch order as the full run (seed ``cfg.seed + seed_offset``), the
    dropped rows left out of that order. Returns float32 [P] theta_tau on CPU.
    """
    if len(keep) != len(bundle.y_train):
        raise ConfigError(f"keep mask has {len(keep)} rows but the training set has {len(bundle.y_train)}")
    if not bool(keep.any()):
        raise ConfigError("removing these rows leaves no training data: remove fewer")
    seed = cfg.seed + seed_offset
    model = build_target(cfg, bundle, seed=seed)
    # Record only theta_0 and theta_tau and skip test accuracy: neither changes the training.
    tcfg = dataclasses.replace(cfg.train, save_every=cfg.train.epochs)
    traj = train_trajectory(model, bundle.x_train, bundle.y_train, bundle.x_test[:0], bundle.y_test[:0], tcfg,
                            seed, torch.device(device), keep=keep.bool(), show_progress=False,
                            loader_workers=cfg.runtime.loader_workers)
    return traj.params[-1]


@torch.no_grad()
def query_probs(model: nn.Module, table: ParamTable, flat: torch.Tensor, x: torch.Tensor,
                batch: int = 1024) -> torch.Tensor:
    """Softmax of ``model`` with parameters ``flat`` on ``x``.

    Args:
        model: architecture (its parameters are overwritten with ``flat``).
        table: names/shapes of ``flat``; flat: float32 [P].
        x: float32 [Q, C, H, W] query images.

    Returns:
        float32 [Q, L] probabilities on CPU.
    """
    load_into(model, table, flat)
    dev = next(model.parameters()).device
    was = model.training
    model.eval()
    out = [model(x[i:i + batch].to(dev)).float().softmax(-1).cpu() for i in range(0, len(x), batch)]
    model.train(was)
    return torch.cat(out) if out else torch.zeros(0, 0)


@dataclass
class GroundTruth:
    """Outputs of exactly retrained models on the queries (softmax, float32, CPU).

    Attributes:
        base: [Q, L] full-data model, seed offset 0.
        outputs: [n_removed, Q, L] mean over ``n_gt_seeds`` seeds after retraining without each cluster.
        noise: [n_noise_seeds, Q, L] full-data reruns with seed offsets 1..n_noise_seeds.
        n_gt_seeds: seeds averaged in ``outputs``.
        seconds: wall time of all retrainings.
    """

    base: torch.Tensor
    outputs: torch.Tensor
    noise: torch.Tensor
    n_gt_seeds: int
    seconds: float


def _retrain_probs(cfg: Config, bundle: DatasetBundle, assignment: Ids, jobs: list[tuple[list[int], int]],
                   query_x: torch.Tensor, device: torch.device | str, desc: str) -> list[torch.Tensor]:
    """Softmax [Q, L] on ``query_x`` of one retraining per (removed ids, seed offset) job."""
    model = build_target(cfg, bundle).to(device)
    table = ParamTable.from_module(model)
    out = []
    for removed, offset in progress(jobs, desc, cfg.runtime.progress):
        flat = retrain_without(cfg, bundle, assignment, removed, offset, device)
        out.append(query_probs(model, table, flat, query_x))
    return out


def ground_truth(cfg: Config, bundle: DatasetBundle, assignment: Ids, clusters: Sequence[int],
                 query_x: torch.Tensor, n_noise_seeds: int = 1, n_gt_seeds: int = 1,
                 device: torch.device | str = "cpu") -> GroundTruth:
    """Exact leave-one-cluster-out ground truth, plus the seed-noise floor.

    Runs 1 + len(clusters) * n_gt_seeds + n_noise_seeds retrainings.

    Args:
        cfg, bundle, assignment: as for :func:`retrain_without`.
        clusters: ids of the clusters to leave out, one at a time.
        query_x: float32 [Q, C, H, W] query images.
        n_noise_seeds: full-data reruns with seed offsets 1..n (0 = none).
        n_gt_seeds: seeds (offsets 0..n-1) averaged per left-out cluster.
        device: where to train.

    Returns:
        :class:`GroundTruth` with base [Q, L], outputs [len(clusters), Q, L], noise [n_noise_seeds, Q, L].
    """
    if n_gt_seeds < 1:
        raise ConfigError(f"n_gt_seeds must be >= 1, got {n_gt_seeds}")
    if n_noise_seeds < 0:
        raise ConfigError(f"n_noise_seeds must be >= 0, got {n_noise_seeds}")
    t0 = time.perf_counter()
    clusters = [int(c) for c in clusters]
    jobs: list[tuple[list[int], int]] = [([], 0)]
    jobs += [([c], s) for c in clusters for s in range(n_gt_seeds)]
    jobs += [([], s) for s in range(1, n_noise_seeds + 1)]
    probs = _retrain_probs(cfg, bundle, assignment, jobs, query_x, device, "ground truth")
    q, n_cls = probs[0].shape
    n_rm = len(clusters) * n_gt_seeds
    outputs = (torch.stack(probs[1:1 + n_rm]).view(len(clusters), n_gt_seeds, q, n_cls).mean(1)
               if clusters else torch.zeros(0, q, n_cls))
    noise = torch.stack(probs[1 + n_rm:]) if n_noise_seeds else torch.zeros(0, q, n_cls)
    seconds = time.perf_counter() - t0
    log.info("evaluate: %d retrainings (%d clusters x %d seeds, %d noise seeds) in %.1f s", len(jobs),
             len(clusters), n_gt_seeds, n_noise_seeds, seconds)
    return GroundTruth(probs[0], outputs, noise, n_gt_seeds, seconds)


def subset_outputs(cfg: Config, bundle: DatasetBundle, assignment: Ids, masks: torch.Tensor, query_x: torch.Tensor,
                   n_gt_seeds: int = 1, device: torch.device | str = "cpu") -> torch.Tensor:
    """Softmax after exact retraining on each random cluster subset (the LDS ground truth).

    Args:
        masks: bool [n_masks, K], True = cluster kept (see :func:`random_subset_masks`).
        query_x: float32 [Q, C, H, W].
        n_gt_seeds: seeds (offsets 0..n-1) averaged per mask.

    Returns:
        float32 [n_masks, Q, L].
    """
    if n_gt_seeds < 1:
        raise ConfigError(f"n_gt_seeds must be >= 1, got {n_gt_seeds}")
    jobs = [(torch.nonzero(~m.bool())[:, 0].tolist(), s) for m in masks for s in range(n_gt_seeds)]
    probs = torch.stack(_retrain_probs(cfg, bundle, assignment, jobs, query_x, device, "subsets"))
    return probs.view(len(masks), n_gt_seeds, *probs.shape[1:]).mean(1)


# ----------------------------------------------------------------------------- LDS
def random_subset_masks(k: int, n_masks: int, alpha: float = 0.5, gen: torch.Generator | None = None) -> torch.Tensor:
    """Random cluster subsets, each keeping exactly ``round(alpha * k)`` clusters.

    Args:
        k: number of clusters K.
        n_masks: number of subsets.
        alpha: fraction of the clusters kept (Python ``round``: ties go to the even count).
        gen: CPU generator (seeds the draw).

    Returns:
        bool [n_masks, K], True = kept.
    """
    n_keep = round(alpha * k)
    if not 0 < n_keep < k:
        raise ConfigError(f"alpha={alpha} keeps {n_keep} of {k} clusters: choose alpha so that 0 < round(alpha*K) < K")
    order = torch.rand(n_masks, k, generator=gen).argsort(1)
    return order.argsort(1) < n_keep  # rank of each cluster in a random permutation


def predicted_subset_effect(scores: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Additive prediction of each subset: sum of the scores of its *kept* clusters.

    Scores that measure the effect of *removing* a cluster (DDM's ``scores``) predict the
    output moving with the removed sum, i.e. against the kept sum: negate them (or the
    outputs) before :func:`lds` when you want a positive correlation for a good method.

    Args:
        scores: [Q, K]; masks: bool [n_masks, K] (True = kept).

    Returns:
        float64 [n_masks, Q].
    """
    return masks.double() @ scores.double().T


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks of a 1-D tensor, ties given their average rank (float64 [n])."""
    _, inverse, counts = torch.unique(x, sorted=True, return_inverse=True, return_counts=True)
    counts = counts.double()
    return (counts.cumsum(0) - (counts - 1) / 2)[inverse]


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Column-wise Spearman correlation of [n, Q] tensors: float64 [Q], NaN for a constant column."""
    ra = torch.stack([average_ranks(c) for c in a.double().T], 1)
    rb = torch.stack([average_ranks(c) for c in b.double().T], 1)
    ra, rb = ra - ra.mean(0), rb - rb.mean(0)
    den = (ra.square().sum(0) * rb.square().sum(0)).sqrt()
    return torch.where(den > 0, (ra * rb).sum(0) / den, torch.full_like(den, float("nan")))


def lds(pred: torch.Tensor, actual: torch.Tensor) -> float:
    """Linear datamodeling score: mean over queries of the Spearman correlation across masks.

    Args:
        pred: [n_masks, Q] predicted effect of each subset (e.g. :func:`predicted_subset_effect`).
        actual: [n_masks, Q] measured output of the model retrained on each subset.

    Returns:
        Mean over queries, skipping queries whose correlation is undefined (a constant column);
        NaN if every query is.
    """
    if pred.shape != actual.shape or pred.dim() != 2:
        raise ValueError(f"pred and actual must both be [n_masks, Q]; got {tuple(pred.shape)} and {tuple(actual.shape)}")
    return float(torch.nanmean(spearman(pred, actual)))


# ----------------------------------------------------------------------------- Eq. 10 metrics
def _gt_objectives(gt_outputs: torch.Tensor, base: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Dist1/2/3 of each retrained model per query: name -> float64 [n_removed, Q]."""
    return objective_values(gt_outputs.double(), base.double(), labels.long(), "single")


def located_clusters(scores: torch.Tensor, removed_ids: Ids) -> torch.Tensor:
    """Per query, the position in ``removed_ids`` of the highest-scored cluster (int64 [Q]).

    Only clusters with ground truth (``removed_ids``) compete; scores of others are ignored.
    """
    rem = _as_long(removed_ids)
    if len(rem) == 0:
        raise ConfigError("no left-out clusters in the ground truth: retrain without at least one cluster")
    return scores[:, rem].argmax(1)


def located_metrics(scores: torch.Tensor, gt_outputs: torch.Tensor, removed_ids: Ids, base: torch.Tensor,
                    labels: torch.Tensor) -> dict[str, float]:
    """The paper's Eq. 10 metrics of the cluster a method locates per query.

    Args:
        scores: [Q, K] attribution scores (higher = located).
        gt_outputs: [n_removed, Q, L] softmax after retraining without ``removed_ids[r]``.
        removed_ids: int [n_removed] cluster ids aligned with ``gt_outputs``.
        base: [Q, L] softmax of the full-data model; labels: int64 [Q] true labels.

    Returns:
        {'dist1': mean L2 change x 100, 'dist2': mean CE to the label, 'dist3': mean 1/(1+L2)}.
    """
    return {name: float(v.mean()) for name, v in located_values(scores, gt_outputs, removed_ids, base, labels).items()}


def located_values(scores: torch.Tensor, gt_outputs: torch.Tensor, removed_ids: Ids, base: torch.Tensor,
                   labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per query, the Eq. 10 metrics of the cluster ``scores`` locate: name -> float64 [Q] (dist1 x 100).

    Same arguments as :func:`located_metrics`, which averages these over the queries.
    """
    objs = _gt_objectives(gt_outputs, base, labels)
    pick = located_clusters(scores, removed_ids)
    q = torch.arange(len(pick))
    return {name: v[pick, q] * (100.0 if name == "dist1" else 1.0) for name, v in objs.items()}


def oracle_metrics(gt_outputs: torch.Tensor, removed_ids: Ids, base: torch.Tensor, labels: torch.Tensor
                   ) -> dict[str, float]:
    """Best achievable Eq. 10 metrics: per query and per metric separately, the max over the left-out clusters.

    For dist3 the max marks the cluster whose removal changes the output *least*, matching how
    the attribute stage reads dist3 scores. Same arguments and keys as :func:`located_metrics`.
    """
    return {name: float(v.mean()) for name, v in oracle_values(gt_outputs, removed_ids, base, labels).items()}


def oracle_values(gt_outputs: torch.Tensor, removed_ids: Ids, base: torch.Tensor, labels: torch.Tensor
                  ) -> dict[str, torch.Tensor]:
    """Per query, the best Eq. 10 metrics over the left-out clusters: name -> float64 [Q] (dist1 x 100)."""
    if len(_as_long(removed_ids)) != len(gt_outputs):
        raise ValueError(f"{len(_as_long(removed_ids))} removed ids for {len(gt_outputs)} ground-truth outputs")
    objs = _gt_objectives(gt_outputs, base, labels)
    return {name: v.max(0).values * (100.0 if name == "dist1" else 1.0) for name, v in objs.items()}


# ----------------------------------------------------------------------------- storage
def fill_ground_truth(f: h5py.Group, gt: GroundTruth, removed_ids: Ids, query_index: Ids, query_label: Ids) -> None:
    """Write the ground-truth datasets into an open file or group (layout in the module docstring)."""
    rem = _as_long(removed_ids)
    if len(rem) != len(gt.outputs):
        raise ValueError(f"{len(rem)} removed ids for {len(gt.outputs)} ground-truth outputs")
    g = f.create_group("gt")
    g.create_dataset("base", data=gt.base.float().numpy())
    g.create_dataset("removed", data=rem.numpy())
    g.create_dataset("outputs", data=gt.outputs.float().numpy())
    g.create_dataset("noise", data=gt.noise.float().numpy())
    f.create_dataset("query_index", data=_as_long(query_index).numpy())
    f.create_dataset("query_label", data=_as_long(query_label).numpy())
    f.attrs["seconds"] = float(gt.seconds)
    f.attrs["n_gt_seeds"] = int(gt.n_gt_seeds)
    f.attrs["n_noise_seeds"] = int(len(gt.noise))


def write_ground_truth(path: str | Path, gt: GroundTruth, removed_ids: Ids, query_index: Ids, query_label: Ids,
                       cfg: Config | None = None) -> Path:
    """Write the ground truth to ``path`` atomically (attrs ``config`` JSON when ``cfg`` is given)."""
    path = Path(path)
    with atomic_h5(path) as f:
        fill_ground_truth(f, gt, removed_ids, query_index, query_label)
        if cfg is not None:
            f.attrs["config"] = json.dumps(cfg.to_dict(), sort_keys=True)
    return path


# ----------------------------------------------------------------------------- the stage: retraining jobs
@dataclass(frozen=True)
class RetrainJob:
    """One exact retraining: leave out ``removed`` clusters, init and data order from seed + offset.

    kind: 'base' (full data, offset 0), 'loo' (one cluster), 'noise' (full data, offset >= 1) or
    'mask' (a random LDS subset); ``index`` is the cluster id, noise offset or mask row.
    """

    kind: str
    index: int
    removed: tuple[int, ...]
    seed_offset: int


def removed_clusters(cfg: Config, k: int) -> torch.Tensor:
    """Cluster ids retrained without one at a time: all K, or a seeded choice of --n-removed."""
    n = cfg.evaluate.n_removed
    if n == 0 or n >= k:
        return torch.arange(k)
    return torch.randperm(k, generator=generator(cfg.seed, 73))[:n].sort().values


def lds_masks(cfg: Config, k: int) -> torch.Tensor:
    """bool [n_masks, K] random cluster subsets (True = kept) for the LDS."""
    ec = cfg.evaluate
    if ec.n_masks == 0:
        return torch.zeros(0, k, dtype=torch.bool)
    return random_subset_masks(k, ec.n_masks, ec.alpha, generator(cfg.seed, 71))


def retrain_jobs(cfg: Config, k: int) -> list[RetrainJob]:
    """Every retraining the evaluate stage needs, in a fixed order (the shard layout depends on it)."""
    ec = cfg.evaluate
    jobs = [RetrainJob("base", 0, (), 0)]
    jobs += [RetrainJob("loo", int(c), (int(c),), s) for c in removed_clusters(cfg, k) for s in range(ec.gt_seeds)]
    jobs += [RetrainJob("noise", s, (), s) for s in range(1, ec.noise_seeds + 1)]
    for m, mask in enumerate(lds_masks(cfg, k)):
        rem = tuple(int(i) for i in torch.nonzero(~mask)[:, 0])
        jobs += [RetrainJob("mask", m, rem, s) for s in range(ec.gt_seeds)]
    return jobs


RETRAIN_OPTIONS = ("n_removed", "gt_seeds", "noise_seeds", "n_masks", "alpha")


def retrain_key(cfg: Config, query_pos: torch.Tensor) -> str:
    """Hash of everything the retrainings depend on: data/model/train/cluster options, the train and
    cluster artifacts, the retraining options of ``evaluate`` and the queries (not the methods)."""
    from ddm_hpc.launch import shard_key

    extra = json.dumps({"evaluate": {k: getattr(cfg.evaluate, k) for k in RETRAIN_OPTIONS},
                        "clusters": upstream_uids(cfg.runtime.out, "distill"), "queries": query_pos.tolist()},
                       sort_keys=True)
    return shard_key(cfg, "cluster", extra)


def groundtruth_path(run_dir: str | Path) -> Path:
    """The merged retrainings (kept, so a rerun with other methods retrains nothing)."""
    return Path(run_dir) / "groundtruth.h5"


def read_queries(run_dir: str | Path) -> dict[str, np.ndarray]:
    """The attribute stage's queries: position (in the test subset), index, label, base softmax."""
    with open_read(artifact_path(run_dir, "attribute")) as f:
        return {k: f[k][()] for k in ("query_position", "query_index", "query_label", "base_probs")}


def _cluster_count(run_dir: Path) -> tuple[np.ndarray, int]:
    with open_read(artifact_path(run_dir, "cluster")) as f:
        return f["clusters/assignment"][()], len(f["clusters/class"])


def retrain_task(cfg: Config, shard: int, n_shards: int, bundle: DatasetBundle | None = None
                 ) -> dict[str, np.ndarray]:
    """Job-layer task: the retrainings ``shard_range(n_jobs, shard, n_shards)`` of :func:`retrain_jobs`.

    Returns ``probs`` float32 [n, Q, L] (softmax on the queries), ``job`` int64 [n], ``seconds`` [n].
    """
    from ddm_hpc.launch import shard_range
    from ddm_hpc.train import load_data

    run_dir = Path(cfg.runtime.out)
    bundle = bundle or load_data(cfg)
    device = resolve_device(cfg.runtime.device)
    assignment, k = _cluster_count(run_dir)
    query_x = bundle.x_test[torch.from_numpy(read_queries(run_dir)["query_position"]).long()]
    jobs = retrain_jobs(cfg, k)
    i0, i1 = shard_range(len(jobs), shard, n_shards)
    model = build_target(cfg, bundle).to(device)
    table = ParamTable.from_module(model)
    probs, secs = [], []
    for i in progress(range(i0, i1), f"retrain[{i0}:{i1} of {len(jobs)}]", cfg.runtime.progress and i1 - i0 > 1):
        t0 = time.perf_counter()
        flat = retrain_without(cfg, bundle, assignment, list(jobs[i].removed), jobs[i].seed_offset, device)
        probs.append(query_probs(model, table, flat, query_x).numpy())
        secs.append(time.perf_counter() - t0)
    return {"probs": np.stack(probs).astype(np.float32), "job": np.arange(i0, i1, dtype=np.int64),
            "seconds": np.asarray(secs, dtype=np.float64)}


def merge_retrain(cfg: Config, paths: list[Path], bundle: DatasetBundle | None = None) -> Path:
    """Job-layer merge: every shard's retrainings, in job order, into ``RUN/groundtruth.h5``."""
    run_dir = Path(cfg.runtime.out)
    probs, jobs, secs = [], [], []
    for p in paths:
        with h5py.File(p, "r", locking=False) as f:
            probs.append(f["probs"][()])
            jobs.append(f["job"][()])
            secs.append(f["seconds"][()])
    job = np.concatenate(jobs)
    if not np.array_equal(job, np.arange(len(job))):
        raise StageError(f"retraining shards cover jobs {job.tolist()[:8]}...: delete {run_dir / 'shards'} and rerun")
    query_pos = torch.from_numpy(read_queries(run_dir)["query_position"]).long()
    path = groundtruth_path(run_dir)
    with atomic_h5(path) as f:
        f.create_dataset("probs", data=np.concatenate(probs))
        f.create_dataset("seconds", data=np.concatenate(secs))
        f.attrs["key"] = retrain_key(cfg, query_pos)
    return path


def run_retrainings(cfg: Config, query_pos: torch.Tensor, bundle: DatasetBundle | None = None) -> Path:
    """Every retraining through the job layer, one shard per retrained model (resumable); reuses a
    current ``groundtruth.h5``."""
    from ddm_hpc.launch import run_sharded

    run_dir = Path(cfg.runtime.out)
    key = retrain_key(cfg, query_pos)
    path = groundtruth_path(run_dir)
    attrs = read_attrs(path)
    if attrs is not None and attrs.get("key") == key:
        log.info("evaluate: %s is current, no retraining needed", path)
        return path
    _, k = _cluster_count(run_dir)
    n_jobs = len(retrain_jobs(cfg, k))
    one_each = dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, shards=n_jobs))
    return run_sharded("evaluate", one_each, retrain_task, n_jobs, merge_retrain, stage="cluster",
                       key_extra=key, context={"bundle": bundle} if bundle is not None else None)


@dataclass
class Retrained:
    """Merged retraining results (see :func:`load_retrained`)."""

    gt: GroundTruth
    removed: torch.Tensor  # int64 [n_removed]
    masks: torch.Tensor  # bool [n_masks, K]
    mask_outputs: torch.Tensor  # float32 [n_masks, Q, L]
    seconds_per_retrain: float


def load_retrained(cfg: Config, k: int, query_pos: torch.Tensor) -> Retrained:
    """Split ``groundtruth.h5`` (job order of :func:`retrain_jobs`) into base, leave-outs, noise, subsets."""
    path = groundtruth_path(cfg.runtime.out)
    attrs = read_attrs(path)
    if attrs is None or attrs.get("key") != retrain_key(cfg, query_pos):
        raise StageError(f"{path} is missing or was made for other retrainings: rerun `ddm-hpc evaluate`")
    with h5py.File(path, "r", locking=False) as f:
        probs = torch.from_numpy(f["probs"][()])
        secs = f["seconds"][()]
    jobs = retrain_jobs(cfg, k)
    ec = cfg.evaluate
    kind = np.array([j.kind for j in jobs])
    q, n_cls = probs.shape[1:]
    removed = removed_clusters(cfg, k)
    masks = lds_masks(cfg, k)
    loo, noise, mk = probs[kind == "loo"], probs[kind == "noise"], probs[kind == "mask"]
    outputs = loo.view(len(removed), ec.gt_seeds, q, n_cls).mean(1)
    mask_out = mk.view(len(masks), ec.gt_seeds, q, n_cls).mean(1)
    gt = GroundTruth(probs[0], outputs, noise, ec.gt_seeds, float(secs.sum()))
    return Retrained(gt, removed, masks, mask_out, float(secs.mean()))


# ----------------------------------------------------------------------------- the stage: metrics
METRICS = ("dist1", "dist2", "dist3")


def _mean_sem(v: torch.Tensor) -> tuple[float, float]:
    v = v[~torch.isnan(v)].double()
    if len(v) == 0:
        return float("nan"), float("nan")
    sem = float(v.std() / math.sqrt(len(v))) if len(v) > 1 else 0.0
    return float(v.mean()), sem


def method_metrics(res, r: Retrained, labels: torch.Tensor) -> dict[str, object]:
    """Eq. 10 metrics (mean and s.e.m. over queries) and the LDS of one :class:`~ddm_hpc.methods.MethodResult`.

    Returns:
        {'dist1', 'dist2', 'dist3', 'lds': (mean, sem), 'located': int64 [3, Q] cluster ids,
         'lds_per_query': float64 [Q]}. Dist1 is x100 as in the paper's tables.
    """
    out: dict[str, object] = {}
    for m in METRICS:
        out[m] = _mean_sem(located_values(res.for_metric(m), r.gt.outputs, r.removed, r.gt.base, labels)[m])
    out["located"] = torch.stack([r.removed[located_clusters(res.for_metric(m), r.removed)] for m in METRICS])
    if len(r.masks):
        # a removal raises the query's CE by the removed clusters' scores: predict with the removed sum
        pred = predicted_subset_effect(res.scores, ~r.masks)
        actual = _gt_objectives(r.mask_outputs, r.gt.base, labels)["dist2"].float()
        per_q = spearman(pred, actual)
        out["lds"] = _mean_sem(per_q)
        out["lds_per_query"] = per_q
    else:
        out["lds"] = (float("nan"), float("nan"))
        out["lds_per_query"] = torch.full((len(labels),), float("nan"))
    return out


def reference_rows(r: Retrained, labels: torch.Tensor) -> dict[str, dict[str, tuple[float, float]]]:
    """Rows the report prints beside the methods: the oracle, the mean over all clusters, the noise floor."""
    objs = _gt_objectives(r.gt.outputs, r.gt.base, labels)
    scale = {"dist1": 100.0, "dist2": 1.0, "dist3": 1.0}
    oracle = oracle_values(r.gt.outputs, r.removed, r.gt.base, labels)
    rows = {"oracle": {m: _mean_sem(oracle[m]) for m in METRICS},
            "mean over clusters": {m: _mean_sem(objs[m].mean(0) * scale[m]) for m in METRICS}}
    if len(r.gt.noise):
        nz = _gt_objectives(r.gt.noise, r.gt.base, labels)
        rows["noise floor (seed reruns)"] = {m: _mean_sem(nz[m].mean(0) * scale[m]) for m in METRICS}
    return rows


def unlearn_all_accuracy(cfg: Config, bundle: DatasetBundle, run_dir: Path, device: torch.device) -> float:
    """Test accuracy of theta_tau fine-tuned on *all* cluster synsets (Table 4's "unlearn everything").

    Uses the attribute stage's fine-tune (same steps, rate, scale and direction) with every cluster
    removed; exact retraining on nothing is theta_0, whose accuracy is the reference.
    """
    from ddm_hpc.attribute import finetune_many, group_weights, removal_spec
    from ddm_hpc.distill import read_synsets
    from ddm_hpc.train import TrajectoryReader

    reader = TrajectoryReader(artifact_path(run_dir, "train"))
    model = build_target(cfg, bundle).to(device)
    level = read_synsets(run_dir, "cluster")
    ac, tc = cfg.attribute, cfg.train
    lr = ac.finetune_lr or tc.lr
    w = group_weights(level, ac.finetune_scale, tc.lr, tc.momentum, tc.batch_size, lr)
    spec = removal_spec(torch.zeros(1, len(level.size)), level.images.shape[1], w)
    probs = finetune_many(model, reader.params(reader.tau), level.images.flatten(0, 1), level.flat_targets(),
                          spec, ac.finetune_steps or reader.tau, lr, level.unlearn_direction, bundle.x_test, 1,
                          device, "unlearn all", cfg.runtime.progress)
    return float((probs[0].argmax(1) == bundle.y_test).float().mean())


def run_context(cfg: Config, bundle: DatasetBundle | None = None):
    """(:class:`~ddm_hpc.methods.Context`, query labels int64 [Q]) of the run in ``cfg.runtime.out``: its
    data (loaded unless given), the attribute stage's queries and the clusters."""
    from ddm_hpc.methods import Context
    from ddm_hpc.train import load_data

    run_dir = Path(cfg.runtime.out)
    bundle = bundle or load_data(cfg)
    queries = read_queries(run_dir)
    with open_read(artifact_path(run_dir, "cluster")) as f:
        assignment = torch.from_numpy(f["clusters/assignment"][()]).long()
        cluster_class = torch.from_numpy(f["clusters/class"][()]).long()
    ctx = Context(cfg, bundle, torch.from_numpy(queries["query_position"]).long(), assignment, cluster_class,
                  resolve_device(cfg.runtime.device))
    return ctx, torch.from_numpy(queries["query_label"]).long()


# ----------------------------------------------------------------------------- the stage
@sharded
def run_evaluate(cfg: Config, bundle: DatasetBundle | None = None) -> Path:
    """Retrain exactly, score every method, write ``evaluation.h5`` and ``report.md`` (+ PNGs).

    The retrainings run on the configured executor (SLURM arrays included); scoring the methods,
    their variant runs and the report run in this process."""
    from ddm_hpc.methods import score_methods
    from ddm_hpc.report import write_report

    t0 = time.perf_counter()
    run_dir = Path(cfg.runtime.out)
    ctx, labels = run_context(cfg, bundle)
    bundle, device, query_pos, k = ctx.bundle, ctx.device, ctx.query_pos, ctx.k
    queries = read_queries(run_dir)
    n_jobs = len(retrain_jobs(cfg, k))
    log.info("evaluate: %d exact retrainings (K=%d leave-one-out x %d seeds, %d noise seeds, %d LDS subsets), "
             "%d queries", n_jobs, len(removed_clusters(cfg, k)), cfg.evaluate.gt_seeds, cfg.evaluate.noise_seeds,
             cfg.evaluate.n_masks, len(query_pos))
    run_retrainings(cfg, query_pos, bundle)
    retrained = load_retrained(cfg, k, query_pos)
    retrain_seconds = retrained.gt.seconds  # summed over the retrainings, whenever they ran
    drift = float((retrained.gt.base - torch.from_numpy(queries["base_probs"])).abs().max())
    if drift > 1e-4:
        log.warning("evaluate: the full-data retraining differs from theta_tau by %.2g in softmax: training is not "
                    "deterministic on this device, so ground truth carries that noise too", drift)

    results = score_methods(ctx, cfg.evaluate.method_list())
    metrics = {name: method_metrics(res, retrained, labels) for name, res in results.items()}
    refs = reference_rows(retrained, labels)
    with open_read(artifact_path(run_dir, "train")) as f:
        accs = f["trajectory/test_accuracy"][()]
    table4 = {"theta_0": float(accs[0]), "theta_tau": float(accs[-1]),
              "ddm": unlearn_all_accuracy(cfg, bundle, run_dir, device)}
    for variant in ("ddm-match", "ddm-soft"):
        if variant in results:
            table4[variant] = unlearn_all_accuracy(cfg, bundle, run_dir / "variants" / variant, device)

    path = artifact_path(run_dir, "evaluate")
    with atomic_h5(path) as f:
        fill_ground_truth(f, retrained.gt, retrained.removed, queries["query_index"], labels)
        f.create_dataset("query_position", data=query_pos.numpy())
        f["gt"].create_dataset("masks", data=retrained.masks.numpy())
        f["gt"].create_dataset("mask_outputs", data=retrained.mask_outputs.float().numpy())
        f["gt"].attrs.update(seconds=retrain_seconds, seconds_per_retrain=retrained.seconds_per_retrain,
                             base_drift=drift, n_retrainings=n_jobs)
        for name, res in results.items():
            g = f.create_group(f"methods/{name}")
            g.create_dataset("scores", data=res.scores.float().numpy())
            g.create_dataset("seconds", data=np.float64(res.seconds))
            g.create_dataset("offline_seconds", data=np.float64(res.offline_seconds))
            g.create_dataset("located", data=metrics[name]["located"].numpy())
            g.create_dataset("lds_per_query", data=metrics[name]["lds_per_query"].float().numpy())
            for obj, s in res.per_objective.items():
                g.create_dataset(f"objectives/{obj}", data=s.float().numpy())
            g.attrs["note"] = res.note
            for m in (*METRICS, "lds"):
                g.attrs[m], g.attrs[f"{m}_sem"] = metrics[name][m]
        r = f.create_group("reference")
        for row, vals in refs.items():
            for m, (mean, sem) in vals.items():
                r.attrs[f"{row}/{m}"], r.attrs[f"{row}/{m}_sem"] = mean, sem
        t4 = f.create_group("table4")
        t4.attrs.update(table4)
        write_provenance(f, cfg, "evaluate", time.perf_counter() - t0)
    report = write_report(path, run_dir / "report.md", plots=cfg.evaluate.plots)
    log.info("evaluate: %d methods against %d retrainings in %.1f s -> %s, %s", len(results), n_jobs,
             time.perf_counter() - t0, path, report)
    return path
