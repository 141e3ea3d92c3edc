"""TracIn (Pruthi et al. 2020, TracInCP) as an attribution method: per-sample scores summed per cluster.

``sum_t lr_t <grad_theta l(theta_t, z_train), grad_theta l(theta_t, z_query)>`` with ``l`` the
cross-entropy. A positive value is a *proponent* (a descent step on the training sample lowers the
query's loss), so the raw value already follows the toolkit's sign convention. Own implementation
(``torch.func`` per-sample gradients), checked against the closed form of softmax regression in
tests/test_peers.py.

Room: a method file (imports ``context``, ``methods.base``, ``methods.peers``, ``storage``).
"""
from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import nn

from ddm_hpc.context import RunContext
from ddm_hpc.errors import ConfigError
from ddm_hpc.methods.base import AttributionMethod, MethodResult
from ddm_hpc.methods.peers import (batch_for, batch_ranges, check_inputs, checkpoints, eval_mode, per_sample_loss_grads,
                                   to_clusters)
from ddm_hpc.storage import ParamTable
from ddm_hpc.utils import progress


def tracin_scores(model: nn.Module, table: ParamTable, checkpoints: Sequence[torch.Tensor], lrs: Sequence[float],
                  x_train: torch.Tensor, y_train: torch.Tensor, x_query: torch.Tensor, y_query: torch.Tensor,
                  device: torch.device | str = "cpu", batch: int = 256, show_progress: bool = False,
                  buffers: Sequence[dict[str, torch.Tensor]] | None = None) -> torch.Tensor:
    """TracInCP scores of every training sample for every query.

    ``score[q, i] = sum_t lr_t * <grad l(theta_t, z_i), grad l(theta_t, z_q)>`` with ``l`` the
    cross-entropy at the true labels. Higher = more responsible: a positive score marks a
    proponent, whose descent step lowers the query's loss, so removing it is expected to
    lower the query's probability of ``y_query``.

    Args:
        model: the architecture; its parameters are not touched (evaluated in eval mode).
        table: names/shapes of the flat checkpoints (``ParamTable.from_module(model)`` or train.h5's).
        checkpoints: T flat float32 [P] parameter vectors theta_t.
        lrs: T learning rates lr_t, one per checkpoint.
        x_train: float32 [N, C, H, W]; y_train: int64 [N].
        x_query: float32 [Q, C, H, W]; y_query: int64 [Q] (true labels).
        device: where gradients are computed.
        batch: training samples per per-sample-gradient call (capped to the free memory).
        show_progress: tqdm over checkpoints x batches.
        buffers: per checkpoint, its buffers (BatchNorm statistics), or None for a buffer-free model.

    Returns:
        float32 [Q, N] on CPU.

    Raises:
        ConfigError: no checkpoints, len(lrs) != len(checkpoints), mismatched x/y lengths,
            or a checkpoint that does not match the table.
    """
    check_inputs(model, table, checkpoints, x_train, y_train, x_query, y_query, batch, "TracIn")
    if len(lrs) != len(checkpoints):
        raise ConfigError(f"TracIn: {len(lrs)} learning rates for {len(checkpoints)} checkpoints; pass one per checkpoint")
    device = torch.device(device)
    y_train, y_query = y_train.long(), y_query.long()
    batch = batch_for(batch, table.total, device)
    ranges = batch_ranges(len(x_train), batch)
    scores = torch.zeros(len(x_query), len(x_train), dtype=torch.float64, device=device)
    jobs = [(t, r) for t in range(len(checkpoints)) for r in ranges]
    q_grads: torch.Tensor | None = None
    current = -1
    with eval_mode(model), torch.no_grad():
        for t, (a, b) in progress(jobs, "TracIn", show_progress):
            params = table.unflatten(checkpoints[t].to(device=device, dtype=torch.float32))
            bufs = {k: v.to(device) for k, v in buffers[t].items()} if buffers else None
            if t != current:  # query gradients once per checkpoint, scaled by lr_t
                q_grads = torch.cat([per_sample_loss_grads(model, table, params, x_query[i:j].to(device),
                                                           y_query[i:j].to(device), bufs)
                                     for i, j in batch_ranges(len(x_query), batch)]) * float(lrs[t])
                current = t
            g = per_sample_loss_grads(model, table, params, x_train[a:b].to(device), y_train[a:b].to(device), bufs)
            scores[:, a:b] += (q_grads @ g.T).double()
    return scores.float().cpu()


class TracIn(AttributionMethod, name="tracin", label="TracInCP (peer)", help="TracInCP, own implementation",
             scatter=True):
    def score(self, ctx: RunContext) -> MethodResult:
        t0 = time.perf_counter()
        model, table, ckpts, bufs = checkpoints(ctx)
        lr = ctx.cfg.train.lr
        per = tracin_scores(model, table, ckpts, [lr] * len(ckpts), ctx.bundle.x_train, ctx.bundle.y_train,
                            ctx.query_x, ctx.query_y, device=ctx.device, show_progress=ctx.show_progress, buffers=bufs)
        s = to_clusters(per, ctx.assignment, ctx.k)
        return MethodResult(s, time.perf_counter() - t0, note=f"TracInCP, {len(ckpts)} checkpoints, summed per cluster")
