"""The paper's baselines: random, predict-based and clustering-based attribution.

  random      seeded uniform scores (the paper's "Random select").
  predict     clusters whose images get the most similar predictions: -|p(query) - mean p(cluster)|_2
              with p the softmax of theta_tau (the paper's "Predict-based").
  clustering  nearest cluster centroid in the target's penultimate-feature space, clusters of the
              query's predicted class first (the paper's "Clustering-based").

Room: a method file (imports ``context``, ``methods.base``, ``models``).
"""
from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from ddm_hpc.context import RunContext
from ddm_hpc.methods.base import AttributionMethod, MethodResult
from ddm_hpc.models import penultimate_features
from ddm_hpc.utils import generator


def cluster_means(values: torch.Tensor, assignment: torch.Tensor, k: int) -> torch.Tensor:
    """Mean of the rows of ``values`` [N, D] per cluster -> [K, D] (zeros for an empty cluster)."""
    sums = torch.zeros(k, values.shape[1], dtype=values.dtype).index_add_(0, assignment, values)
    counts = torch.bincount(assignment, minlength=k).clamp(min=1).to(values.dtype)
    return sums / counts[:, None]


def _batched(x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], device: torch.device,
             batch: int = 1024) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([fn(x[i:i + batch].to(device)).float().cpu() for i in range(0, len(x), batch)])


class Random(AttributionMethod, name="random", label="Random select", help="seeded uniform scores"):
    def score(self, ctx: RunContext) -> MethodResult:
        t0 = time.perf_counter()
        s = torch.rand(len(ctx.query_pos), ctx.k, generator=generator(ctx.cfg.seed, 61))
        return MethodResult(s, time.perf_counter() - t0, note="uniform random (seeded)")


class Predict(AttributionMethod, name="predict", label="Predict-based", help="most similar predictions"):
    def score(self, ctx: RunContext) -> MethodResult:
        t0 = time.perf_counter()
        model: nn.Module = ctx.trained_model()
        sm = lambda xb: model(xb).softmax(-1)  # noqa: E731
        p_train = _batched(ctx.bundle.x_train, sm, ctx.device)
        p_query = _batched(ctx.query_x, sm, ctx.device)
        means = cluster_means(p_train, ctx.assignment, ctx.k)
        s = -torch.cdist(p_query.double(), means.double()).float()
        return MethodResult(s, time.perf_counter() - t0, note="-L2 between query softmax and cluster mean softmax")


class Clustering(AttributionMethod, name="clustering", label="Clustering-based",
                 help="nearest cluster centroid of the predicted class"):
    def score(self, ctx: RunContext) -> MethodResult:
        t0 = time.perf_counter()
        model = ctx.trained_model()
        feat = lambda xb: penultimate_features(model, xb)  # noqa: E731
        f_train = _batched(ctx.bundle.x_train, feat, ctx.device)
        f_query = _batched(ctx.query_x, feat, ctx.device)
        pred = _batched(ctx.query_x, lambda xb: model(xb).argmax(-1).float(), ctx.device).long()
        d = torch.cdist(f_query.double(), cluster_means(f_train.double(), ctx.assignment, ctx.k))
        other = (ctx.cluster_class[None, :] != pred[:, None]).double()
        s = -(d + other * (d.max() + 1.0))  # every cluster of the predicted class ranks above the others
        return MethodResult(s.float(), time.perf_counter() - t0,
                            note="-L2 to the cluster centroid in penultimate features; predicted class first")
