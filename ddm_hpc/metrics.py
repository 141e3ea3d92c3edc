"""Metrics of attribution against exact retraining: the objectives, LDS and the paper's Eq. 10.

  * Objectives of a model's softmax on the queries (:func:`objective_values`): Dist1 (L2 change of the
    softmax from theta_tau's), Dist2 (cross-entropy to the true label), Dist3 = 1/(1 + Dist1).
  * LDS (cluster level): per query, Spearman correlation across random cluster subsets between
    the predicted effect (sum of the kept clusters' scores) and the retrained output; mean over
    queries.
  * Eq. 10 of the paper: per query, locate the cluster a method ranks highest and measure exact
    retraining without it: Dist1 (x100), Dist2, Dist3; and the oracle (best cluster per query, per metric).

Room: imports ``errors`` and ``utils`` only (the attribute and evaluate stages, the report and the
diagnostics use it).
"""
from __future__ import annotations

import math

import torch

from ddm_hpc.errors import ConfigError
from ddm_hpc.utils import Ids, as_long

METRICS = ("dist1", "dist2", "dist3")


def objective_values(probs: torch.Tensor, base: torch.Tensor, labels: torch.Tensor, mode: str) -> dict[str, torch.Tensor]:
    """Per-query objectives.

    Args:
        probs: [M, Q, L] softmax of M perturbed models on Q query images.
        base: [Q, L] softmax of theta_tau; labels: int64 [Q] true labels.
        mode: 'single' (one value per query) or 'batch' (mean over the queries: one value).

    Returns:
        name -> [M, Q] (single) or [M, 1] (batch) for dist1, dist2, dist3.
    """
    d1 = (probs - base[None]).norm(dim=-1)
    d2 = -torch.log(probs.gather(-1, labels[None, :, None].expand(len(probs), -1, 1))[..., 0].clamp(min=1e-12))
    d3 = 1.0 / (1.0 + d1)
    out = {"dist1": d1, "dist2": d2, "dist3": d3}
    if mode == "batch":
        out = {k: v.mean(1, keepdim=True) for k, v in out.items()}
    return out


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


def gt_objectives(gt_outputs: torch.Tensor, base: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Dist1/2/3 of each retrained model per query: name -> float64 [n_removed, Q]."""
    return objective_values(gt_outputs.double(), base.double(), labels.long(), "single")


def located_clusters(scores: torch.Tensor, removed_ids: Ids) -> torch.Tensor:
    """Per query, the position in ``removed_ids`` of the highest-scored cluster (int64 [Q]).

    Only clusters with ground truth (``removed_ids``) compete; scores of others are ignored.
    """
    rem = as_long(removed_ids)
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
    objs = gt_objectives(gt_outputs, base, labels)
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
    if len(as_long(removed_ids)) != len(gt_outputs):
        raise ValueError(f"{len(as_long(removed_ids))} removed ids for {len(gt_outputs)} ground-truth outputs")
    objs = gt_objectives(gt_outputs, base, labels)
    return {name: v.max(0).values * (100.0 if name == "dist1" else 1.0) for name, v in objs.items()}


def mean_sem(v: torch.Tensor) -> tuple[float, float]:
    v = v[~torch.isnan(v)].double()
    if len(v) == 0:
        return float("nan"), float("nan")
    sem = float(v.std() / math.sqrt(len(v))) if len(v) > 1 else 0.0
    return float(v.mean()), sem
