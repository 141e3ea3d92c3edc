"""What the peer methods (TracIn, TRAK) share: input checks, per-sample gradients, checkpoints, per-cluster sums.

Both score every (query, training sample) pair on the same model and trajectory as DDM, and
:func:`to_clusters` sums a method's per-sample scores over each cluster's members so the
methods share one table. Sign convention: **a higher score means the training sample is more
responsible for the query's prediction** (removing it would lower the model's probability of the
query's label). The methods themselves: ``methods.tracin``, ``methods.trak``.

Room: imports ``context``, ``models`` and ``storage``.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, vmap

from ddm_hpc.context import RunContext
from ddm_hpc.errors import ConfigError
from ddm_hpc.models import forward_with
from ddm_hpc.storage import ParamTable
from ddm_hpc.utils import memory_budget_bytes

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- input checks
def check_inputs(model: nn.Module, table: ParamTable, checkpoints: Sequence[torch.Tensor],
                  x_train: torch.Tensor, y_train: torch.Tensor, x_query: torch.Tensor, y_query: torch.Tensor,
                  batch: int, method: str) -> None:
    """Raise a one-line ConfigError for inputs a peer method cannot score."""
    if len(checkpoints) == 0:
        raise ConfigError(f"{method} needs at least one checkpoint; pass rows of train.h5's trajectory/params")
    for i, c in enumerate(checkpoints):
        if c.numel() != table.total:
            raise ConfigError(f"{method}: checkpoint {i} has {c.numel()} values but the parameter table has "
                              f"{table.total}: use the table and trajectory of the same train.h5")
    names = [n for n, _ in model.named_parameters()]
    if sorted(names) != sorted(table.names):
        raise ConfigError(f"{method}: the model's parameters ({len(names)}) do not match the table's "
                          f"({len(table.names)}): build the model the trajectory was trained with")
    for what, x, y in (("train", x_train, y_train), ("query", x_query, y_query)):
        if len(x) != len(y):
            raise ConfigError(f"{method}: x_{what} has {len(x)} rows but y_{what} has {len(y)}; pass aligned arrays")
        if len(x) == 0:
            raise ConfigError(f"{method}: no {what} samples; pass at least one")
        if y.dtype.is_floating_point or y.dim() != 1 or (y < 0).any():
            raise ConfigError(f"{method}: y_{what} must be 1-D non-negative integer labels, got {y.dtype} {tuple(y.shape)}")
    if not isinstance(batch, int) or batch < 1:
        raise ConfigError(f"{method}: batch must be a positive integer, got {batch!r}")


def batch_for(batch: int, n_params: int, device: torch.device) -> int:
    """``batch`` capped so a [batch, P] float32 per-sample gradient block (x4 for vmap temporaries) fits."""
    cap = max(1, memory_budget_bytes(device) // max(1, 16 * n_params))
    if cap < batch:
        log.info("peers: batch %d capped to %d to fit per-sample gradients of %d parameters", batch, cap, n_params)
    return min(batch, cap)


def batch_ranges(n: int, batch: int) -> list[tuple[int, int]]:
    return [(i, min(i + batch, n)) for i in range(0, n, batch)]


def per_sample_loss_grads(model: nn.Module, table: ParamTable, params: dict[str, torch.Tensor], x: torch.Tensor,
                          y: torch.Tensor, buffers: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Flat per-sample gradients of the cross-entropy.

    Args:
        model: architecture (its own parameters are ignored; ``params`` are used).
        table: parameter order of the flat output.
        params: name -> tensor on the compute device.
        x: float32 [B, ...] inputs on the device; y: int64 [B] labels.
        buffers: the checkpoint's buffers (BatchNorm statistics; eval mode), or None.

    Returns:
        float32 [B, P]: row b = grad_theta CE(model(x_b; theta), y_b), in ``table`` order.
    """
    def loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(forward_with(model, p, xi.unsqueeze(0), buffers), yi.unsqueeze(0))

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([g[n].reshape(len(x), -1) for n in table.names], dim=1)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def checkpoints(ctx: RunContext) -> tuple[nn.Module, ParamTable, list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """The target on the device, the parameter table, ``--peer-checkpoints`` evenly spaced trajectory rows
    (theta_tau last) that TracIn and TRAK score with, and their buffers ({} each for a buffer-free model)."""
    reader = ctx.trajectory()
    n = ctx.cfg.evaluate.peer_checkpoints
    rows = np.unique(np.linspace(reader.tau, 1, min(n, reader.tau)).round().astype(int))[::-1]
    ckpts = [reader.flat(int(r)) for r in sorted(rows)]
    return ctx.build_model().to(ctx.device), reader.table, ckpts, [reader.buffers(int(r)) for r in sorted(rows)]


def to_clusters(per_sample: torch.Tensor, assignment: torch.Tensor, k: int) -> torch.Tensor:
    """Sum per-sample scores over each cluster's members.

    Args:
        per_sample: float [Q, N] scores (e.g. from :func:`tracin_scores` / :func:`trak_scores`).
        assignment: int [N] cluster id in 0..k-1 of each training sample (clusters.h5's).
        k: number of clusters K (empty clusters get 0).

    Returns:
        [Q, K] in ``per_sample``'s dtype: ``out[q, c] = sum_{i: assignment[i] == c} per_sample[q, i]``.

    Raises:
        ConfigError: ``per_sample`` is not 2-D, the lengths differ, or an id is outside 0..k-1.
    """
    if not isinstance(assignment, torch.Tensor):
        assignment = torch.as_tensor(np.asarray(assignment))
    assignment = assignment.reshape(-1)
    if per_sample.dim() != 2:
        raise ConfigError(f"to_clusters: per-sample scores must be [Q, N], got shape {tuple(per_sample.shape)}")
    if assignment.dtype.is_floating_point:
        raise ConfigError(f"to_clusters: the assignment must hold integer cluster ids, got {assignment.dtype}")
    if len(assignment) != per_sample.shape[1]:
        raise ConfigError(f"to_clusters: {per_sample.shape[1]} scored samples but {len(assignment)} cluster "
                          "assignments; score the training set the clusters were made on")
    if not isinstance(k, int) or k < 1:
        raise ConfigError(f"to_clusters: k must be a positive integer, got {k!r}")
    if len(assignment) and (int(assignment.min()) < 0 or int(assignment.max()) >= k):
        raise ConfigError(f"to_clusters: cluster ids span {int(assignment.min())}..{int(assignment.max())} "
                          f"but k={k}; pass the K of clusters.h5")
    out = torch.zeros(per_sample.shape[0], k, dtype=per_sample.dtype, device=per_sample.device)
    return out.index_add_(1, assignment.to(per_sample.device).long(), per_sample)
