"""A toy attribution method in one file, registered by importing it (``--plugins tests/plugins/toy_method.py``).

Scores each cluster by the negative L2 distance between the query's pixels and the cluster's mean image:
a nearest-centroid baseline in pixel space. Nothing else in the toolkit knows it exists.
"""
from __future__ import annotations

import time

import torch

from ddm_hpc.context import RunContext
from ddm_hpc.data import dense
from ddm_hpc.methods import AttributionMethod, MethodResult, cluster_means


class Toy(AttributionMethod, name="toy", label="Toy (nearest mean image)", help="pixel-space nearest centroid",
          scatter=True):
    def score(self, ctx: RunContext) -> MethodResult:
        t0 = time.perf_counter()
        x = dense(ctx.bundle.x_train).flatten(1).double()
        means = cluster_means(x, ctx.assignment, ctx.k)
        s = -torch.cdist(ctx.query_x.flatten(1).double(), means).float()
        return MethodResult(s, time.perf_counter() - t0, note="-L2 between the query's pixels and each cluster's mean")
