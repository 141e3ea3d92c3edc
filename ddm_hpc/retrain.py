"""Exact retraining: the ground truth every attribution is measured against.

Every retraining starts from the *same* theta_0 as the full run (``build_target`` with the same
seed) and uses the same schedule and the full run's per-epoch data order. Two removal protocols
(``--gt-removal``, :data:`REMOVALS`):

  * ``drop``: the removed rows are dropped from that order and the rest re-batched
    (``train_trajectory(keep=...)``), so every minibatch after the first removed row changes its
    composition;
  * ``zero-weight``: every minibatch keeps its slots and the removed rows' loss weight is 0
    (``train_trajectory(weights=...)``, loss ``(1/B) sum_i w_i l_i``), so the only change is the
    removed data's contribution: the protocol under which data weights have a metagradient
    (``ddm_hpc.replay``).

With nothing removed either reproduces theta_tau bit for bit.

Seeds: seed offset s trains with init *and* data order from ``cfg.seed + s``. Ground truth with
n seeds averages the leave-out softmax over offsets 0..n-1 (each run with its own seed's order);
the noise floor is full-data reruns with offsets 1..n, compared against the offset-0 base.

HDF5 layout written by :func:`write_ground_truth` (the ``gt`` part of ``evaluation.h5``):
  gt/base     float32 [Q, L]             softmax of the full-data model (seed offset 0)
  gt/removed  int64 [n_removed]          cluster ids, aligned with gt/outputs
  gt/outputs  float32 [n_removed, Q, L]  softmax after exact retraining without each cluster
  gt/noise    float32 [n_noise, Q, L]    full-data reruns with seed offsets 1..n_noise
  query_index int64 [Q], query_label int64 [Q]
  attrs: seconds, n_gt_seeds, n_noise_seeds, config (JSON, when given), complete

Room: imports ``config``, ``data``, ``models``, ``storage``, ``train`` and ``trajectory``; the evaluate
stage and the removal diagnostics retrain through it.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import torch
from torch import nn

from ddm_hpc.config import REMOVALS, Config
from ddm_hpc.data import DatasetBundle
from ddm_hpc.errors import ConfigError
from ddm_hpc.models import build_target
from ddm_hpc.storage import ParamTable, atomic_h5, create_dataset
from ddm_hpc.train import train_trajectory
from ddm_hpc.trajectory import load_into
from ddm_hpc.utils import Ids, as_long, progress

log = logging.getLogger(__name__)


def keep_mask(assignment: Ids, removed: Ids) -> torch.Tensor:
    """bool [N]: True for training rows whose cluster is not in ``removed``.

    Raises:
        ConfigError: a removed id has no training rows, or nothing would be left to train on.
    """
    assign = as_long(assignment)
    rem = as_long(removed)
    present = torch.isin(rem, assign)
    if not present.all():
        raise ConfigError(f"cluster id(s) {rem[~present].tolist()} have no training rows: "
                          f"use ids 0..{int(assign.max())} from clusters.h5")
    keep = ~torch.isin(assign, rem)
    if not keep.any():
        raise ConfigError("removing these clusters leaves no training data: remove fewer clusters")
    return keep


def retrain_without(cfg: Config, bundle: DatasetBundle, assignment: Ids, removed: Ids, seed_offset: int = 0,
                    device: torch.device | str = "cpu", removal: str = "drop") -> torch.Tensor:
    """Retrain exactly from theta_0 on D minus the union of the ``removed`` clusters.

    The init and the per-epoch data order come from ``cfg.seed + seed_offset``; removed rows are
    dropped from that order (no reshuffle) or, with ``removal='zero-weight'``, kept in their slots with loss
    weight 0. With ``removed`` empty and offset 0 the result is the full run's theta_tau, bit for bit (on
    the same device).

    Args:
        cfg: run config (model, train schedule, seed).
        bundle: the dataset; rows of ``bundle.x_train`` align with ``assignment``.
        assignment: int64 [N] cluster id of each training row.
        removed: cluster ids to leave out (may be empty).
        seed_offset: added to ``cfg.seed`` for init and data order.
        device: where to train.
        removal: ``drop`` or ``zero-weight`` (:data:`REMOVALS`).

    Returns:
        float32 [P] final flat parameters (theta_tau of the retrained model) on CPU; [P + B] with the final buffers
        after them for a model with buffers (:meth:`~ddm_hpc.trajectory.Trajectory.state_row`).
    """
    if len(as_long(assignment)) != len(bundle.y_train):
        raise ConfigError(f"cluster assignment has {len(as_long(assignment))} rows but the training set has "
                          f"{len(bundle.y_train)}: cluster and train with the same --n-train")
    return retrain_keep(cfg, bundle, keep_mask(assignment, removed), seed_offset, device, removal)


def retrain_keep(cfg: Config, bundle: DatasetBundle, keep: torch.Tensor, seed_offset: int = 0,
                 device: torch.device | str = "cpu", removal: str = "drop") -> torch.Tensor:
    """Retrain exactly from theta_0 on the training rows where ``keep`` (bool [N]) is True.

    Same init, schedule and per-epoch order as the full run (seed ``cfg.seed + seed_offset``); the other
    rows are left out of that order (``drop``) or keep their slots with loss weight 0 (``zero-weight``).
    Returns float32 [P] theta_tau on CPU (for a model with buffers, [P + B]: its state row, the buffers after the
    parameters, which :func:`query_probs` and ``trajectory.load_into`` read).
    """
    if removal not in REMOVALS:
        raise ConfigError(f"--gt-removal {removal!r}: choose from {', '.join(REMOVALS)}")
    if len(keep) != len(bundle.y_train):
        raise ConfigError(f"keep mask has {len(keep)} rows but the training set has {len(bundle.y_train)}")
    if not bool(keep.any()):
        raise ConfigError("removing these rows leaves no training data: remove fewer")
    seed = cfg.seed + seed_offset
    model = build_target(cfg, bundle, seed=seed)
    # Record only theta_0 and theta_tau and skip test accuracy: neither changes the training.
    tcfg = dataclasses.replace(cfg.train, save_every=cfg.train.epochs)
    split = {"keep": keep.bool()} if removal == "drop" else {"weights": keep.float()}
    traj = train_trajectory(model, bundle.x_train, bundle.y_train, bundle.x_test[:0], bundle.y_test[:0], tcfg,
                            seed, torch.device(device), show_progress=False,
                            loader_workers=cfg.runtime.loader_workers, **split)
    return traj.state_row(-1)


@torch.no_grad()
def query_probs(model: nn.Module, table: ParamTable, flat: torch.Tensor, x: torch.Tensor,
                batch: int = 1024) -> torch.Tensor:
    """Softmax of ``model`` with parameters ``flat`` on ``x``.

    Args:
        model: architecture (its parameters are overwritten with ``flat``).
        table: names/shapes of ``flat``; flat: float32 [P], or a state row [P + B] (buffers after the parameters).
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


def fill_ground_truth(f: h5py.Group, gt: GroundTruth, removed_ids: Ids, query_index: Ids, query_label: Ids) -> None:
    """Write the ground-truth datasets into an open file or group (layout in the module docstring)."""
    rem = as_long(removed_ids)
    if len(rem) != len(gt.outputs):
        raise ValueError(f"{len(rem)} removed ids for {len(gt.outputs)} ground-truth outputs")
    g = f.create_group("gt")
    create_dataset(g, "base", data=gt.base.float().numpy())
    create_dataset(g, "removed", data=rem.numpy())
    create_dataset(g, "outputs", data=gt.outputs.float().numpy())
    create_dataset(g, "noise", data=gt.noise.float().numpy())
    create_dataset(f, "query_index", data=as_long(query_index).numpy())
    create_dataset(f, "query_label", data=as_long(query_label).numpy())
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
