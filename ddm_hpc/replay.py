"""Exact metagradients through the replayed training: d f(theta_tau) / d w_k for per-cluster loss weights.

The train stage's recipe is deterministic (theta_0, schedule and per-epoch data order are fixed
and recorded), so the whole training is a differentiable function of the loss weights ``w`` of
the training rows (loss ``(1/B) sum_i w_i l_i`` per minibatch of B slots; ``w = 1`` is the full
run, ``w_k = 0`` the ``zero-weight`` removal of cluster k). PyTorch's SGD with momentum mu,
weight decay lambda and rate eta is, per step t,

    d_t = grad L_t(theta_t; w) + lambda theta_t,   b_t = mu b_{t-1} + d_t  (b_0 = d_0),
    theta_{t+1} = theta_t - eta b_t.

For M objectives f_m(theta_tau) at once, reverse mode (the REPLAY algorithm, arXiv 2503.13751, as
used by MAGIC, arXiv 2504.16430) carries the adjoints theta_bar [M, P] and b_bar [M, P] back
through the steps:

    b_bar_t     = mu b_bar_{t+1} - eta theta_bar_{t+1}
    theta_bar_t = theta_bar_{t+1} + H_t b_bar_t + lambda b_bar_t         (H_t: Hessian of L_t)
    w_bar_i    += (1/B) <grad l_i(theta_t), b_bar_t>                     (each row i of batch t)

and ``w_bar`` summed per cluster is df_m/dw_k: removing cluster k changes f_m by about ``-w_bar[m, k]``
(first order). One backward sweep serves every cluster; its cost grows with M, not with K.

Memory: the forward replay keeps (theta, momentum) at the start of every epoch; the backward sweep
replays one epoch forward again from its checkpoint, keeping that epoch's per-step parameters, and
then goes back through it. Peak: 2 x epochs + steps-per-epoch parameter vectors, plus 2 M adjoints.
Cost: two forward replays (~2 trainings) and, per step, one gradient graph and M double-backward
products (about 1.7 fwd+bwd each on CPU).

On CPU the replayed forward uses the same operations in the same order as ``train.train_trajectory``
and so reproduces theta_tau bit for bit (checked, and logged as ``drift``).

Room: imports ``config``, ``data``, ``storage``, ``train`` and ``utils``; the ``replay`` method
(``methods/replay.py``) calls it.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp

from ddm_hpc.config import TrainConfig
from ddm_hpc.data import MappedImages, MinibatchReader
from ddm_hpc.errors import ConfigError
from ddm_hpc.storage import ParamTable
from ddm_hpc.train import epoch_order
from ddm_hpc.utils import as_long, progress

log = logging.getLogger(__name__)

Params = dict[str, torch.Tensor]


@dataclass
class Metagradient:
    """Result of :func:`replay_metagradients`.

    Attributes:
        grads: float64 [M, K] d f_m(theta_tau) / d w_k at w = 1.
        theta_tau: [P] the replayed final parameters (flat, ``ParamTable`` order, the model's dtype), on CPU.
        steps: SGD steps replayed.
        seconds: wall time of both replays and the backward sweep.
    """

    grads: torch.Tensor
    theta_tau: torch.Tensor
    steps: int
    seconds: float


def _batches(n: int, tcfg: TrainConfig, seed: int, epoch: int) -> list[torch.Tensor]:
    """The minibatch rows of ``epoch``, exactly as the train stage draws them (every slot kept)."""
    return list(epoch_order(n, seed, epoch).split(tcfg.batch_size))


def _batch_grad(model: nn.Module, theta: Params, xb: torch.Tensor, yb: torch.Tensor, wb: torch.Tensor,
                create_graph: bool) -> tuple[torch.Tensor, ...]:
    """grad_theta of the batch loss ``(1/B) sum_i w_i l_i`` (the train stage's loss at w = 1)."""
    out = functional_call(model, theta, (xb,))
    loss = (F.cross_entropy(out, yb, reduction="none") * wb).sum() / len(yb)
    return torch.autograd.grad(loss, list(theta.values()), create_graph=create_graph)


def _sgd_step(theta: Params, buf: Params | None, grads: tuple[torch.Tensor, ...], tcfg: TrainConfig
              ) -> tuple[Params, Params]:
    """One step of torch.optim.SGD (single-tensor path, dampening 0, no Nesterov), out of place."""
    new_theta, new_buf = {}, {}
    for (name, p), g in zip(theta.items(), grads):
        d = g.add(p, alpha=tcfg.weight_decay) if tcfg.weight_decay else g
        b = d.clone() if buf is None else buf[name].mul(tcfg.momentum).add_(d)
        new_buf[name] = b
        new_theta[name] = p.add(b, alpha=-tcfg.lr)
    return new_theta, new_buf


def _require_buffer_free(model: nn.Module) -> None:
    """Replay differentiates through training, where BatchNorm's statistics change at every step: refuse buffers."""
    if list(model.buffers()):
        raise ConfigError("replay needs a buffer-free model (GroupNorm, not BatchNorm): use another --model")


def replay_metagradients(model: nn.Module, x: torch.Tensor | MappedImages, y: torch.Tensor, tcfg: TrainConfig,
                         seed: int, groups: torch.Tensor, n_groups: int,
                         objectives: Callable[[Params], torch.Tensor], device: torch.device | str = "cpu",
                         show_progress: bool = False, batched: bool | None = None) -> Metagradient:
    """Reverse-mode metagradients of ``objectives(theta_tau)`` with respect to per-group loss weights.

    Args:
        model: the architecture, buffer-free, its parameters theta_0 (not modified); its dtype is the replay's.
        x, y: the training set exactly as the train stage saw it (float images [N, C, H, W], int64 [N]).
        tcfg: the training recipe (epochs, batch size, lr, momentum, weight decay).
        seed: the data-order seed of the run (``epoch_order``).
        groups: int64 [N] group (cluster) id of each row, in ``0..n_groups-1``.
        n_groups: K.
        objectives: theta (a name -> tensor dict, differentiable) -> [M] objective values at theta_tau.
        device: where to replay.
        show_progress: a bar over the backward sweep's steps.
        batched: one vectorised double-backward for all M objectives per step (``is_grads_batched``) instead of a
            loop over them; same numbers. None = batched on CUDA, looped on CPU (where the vectorised product was
            measured 1.7x slower: M = 20, ConvNet width 16, one thread).

    Returns:
        :class:`Metagradient` with grads [M, K] = d f_m / d w_k.

    Raises:
        ConfigError: a model with buffers, or group ids that do not match the rows.
    """
    _require_buffer_free(model)
    groups = as_long(groups).cpu()
    if len(groups) != len(y) or (len(groups) and (int(groups.min()) < 0 or int(groups.max()) >= n_groups)):
        raise ConfigError(f"replay: {len(groups)} group ids in 0..{n_groups - 1} are needed for {len(y)} rows")
    t0 = time.perf_counter()
    device = torch.device(device)
    model = model.to(device).train()
    dtype = next(model.parameters()).dtype
    table = ParamTable.from_module(model)
    reader = MinibatchReader(x, y, device)
    n = len(y)
    ones = torch.ones(tcfg.batch_size, device=device, dtype=dtype)

    def cast(xb: torch.Tensor) -> torch.Tensor:
        return xb if xb.dtype == dtype else xb.to(dtype)

    # forward replay: keep (theta, momentum) at the start of every epoch
    theta: Params = {k: v.detach().clone() for k, v in model.named_parameters()}
    buf: Params | None = None
    starts: list[tuple[Params, Params | None]] = []
    steps = 0
    for epoch in range(1, tcfg.epochs + 1):
        starts.append((theta, buf))
        batches = _batches(n, tcfg, seed, epoch)
        for xb, yb in reader(batches):
            theta = {k: v.requires_grad_(True) for k, v in theta.items()}
            grads = _batch_grad(model, theta, cast(xb), yb, ones[:len(yb)], create_graph=False)
            with torch.no_grad():
                theta, buf = _sgd_step({k: v.detach() for k, v in theta.items()}, buf, grads, tcfg)
            steps += 1
    theta_tau = torch.cat([theta[name].detach().reshape(-1) for name in table.names]).cpu()  # the model's dtype

    # seeds: d f_m / d theta_tau
    leaf = {k: v.detach().requires_grad_(True) for k, v in theta.items()}
    f = objectives(leaf)
    m_obj = len(f)
    theta_bar = [torch.stack(g) for g in zip(*[torch.autograd.grad(f[m], list(leaf.values()), retain_graph=True)
                                                for m in range(m_obj)])] if m_obj else []
    b_bar = [torch.zeros_like(t) for t in theta_bar]
    w_bar = torch.zeros(m_obj, n_groups, dtype=torch.float64, device=device)
    groups_dev = groups.to(device)
    if batched is None:
        batched = device.type == "cuda"

    bar = progress(range(steps), "replay", show_progress)
    it = iter(bar)
    for epoch in range(tcfg.epochs, 0, -1):
        batches = _batches(n, tcfg, seed, epoch)
        theta, buf = starts[epoch - 1]
        path = []  # the epoch's per-step parameters, replayed forward from its checkpoint
        for xb, yb in reader(batches):
            path.append(theta)
            th = {k: v.detach().requires_grad_(True) for k, v in theta.items()}
            grads = _batch_grad(model, th, cast(xb), yb, ones[:len(yb)], create_graph=False)
            with torch.no_grad():
                theta, buf = _sgd_step(path[-1], buf, grads, tcfg)
        for rows, (xb, yb), th_t in reversed(list(zip(batches, reader(batches), path))):
            next(it, None)
            th = {k: v.detach().requires_grad_(True) for k, v in th_t.items()}
            wb = ones[:len(yb)].clone().requires_grad_(True)
            g = _batch_grad(model, th, cast(xb), yb, wb, create_graph=True)
            inputs = [*th.values(), wb]
            for i in range(len(b_bar)):
                b_bar[i] = b_bar[i].mul(tcfg.momentum).sub_(theta_bar[i], alpha=tcfg.lr)
            rows_group = groups_dev[rows.to(device)]
            if batched and m_obj:
                *h, hw = torch.autograd.grad(g, inputs, grad_outputs=b_bar, is_grads_batched=True)
                for i, hi in enumerate(h):
                    theta_bar[i] += hi
                    if tcfg.weight_decay:
                        theta_bar[i].add_(b_bar[i], alpha=tcfg.weight_decay)
                w_bar.index_add_(1, rows_group, hw.detach().double())
                continue
            for m in range(m_obj):
                s = sum((gi * bb[m]).sum() for gi, bb in zip(g, b_bar))
                *h, hw = torch.autograd.grad(s, inputs, retain_graph=m < m_obj - 1)
                for i, hi in enumerate(h):
                    theta_bar[i][m] += hi
                    if tcfg.weight_decay:
                        theta_bar[i][m].add_(b_bar[i][m], alpha=tcfg.weight_decay)
                w_bar[m].index_add_(0, rows_group, hw.detach().double())
    return Metagradient(w_bar.cpu(), theta_tau, steps, time.perf_counter() - t0)


def replay_tangents(model: nn.Module, x: torch.Tensor | MappedImages, y: torch.Tensor, tcfg: TrainConfig, seed: int,
                    groups: torch.Tensor, n_groups: int, device: torch.device | str = "cpu",
                    show_progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward mode through the replayed training: d theta_tau / d w_k for every group, query-independent.

    The counterpart of :func:`replay_metagradients`: instead of carrying M objectives' adjoints back, it carries
    K tangents (theta_dot, b_dot) forward through every step,

        d_dot = H_t theta_dot + d(grad L_t)/d w_k + lambda theta_dot,   b_dot = mu b_dot + d_dot,
        theta_dot <- theta_dot - eta b_dot,

    one ``jvp`` of the batch gradient per group and step (the Hessian-vector product and group k's own rows,
    together). ``grad f(theta_tau) . theta_dot_k`` is then replay's ``d f / d w_k`` for any f, and
    ``-theta_dot_k`` is the first-order zero-weight removal displacement of group k (the exact target a
    displacement synset would aim at). Cost: K jvps per step (about 4 gradients each), so K x ~4 trainings:
    GPU-sized beyond toy problems.

    Returns:
        (tangents [K, P] in the model's dtype, replayed theta_tau [P]), flat in ``ParamTable`` order, on CPU.
    """
    _require_buffer_free(model)
    device = torch.device(device)
    model = model.to(device).train()
    dtype = next(model.parameters()).dtype
    table = ParamTable.from_module(model)
    reader = MinibatchReader(x, y, device)
    groups_dev = as_long(groups).to(device)
    theta: Params = {k: v.detach().clone() for k, v in model.named_parameters()}
    tan: Params = {k: torch.zeros(n_groups, *v.shape, dtype=dtype, device=device) for k, v in theta.items()}
    buf: Params | None = None
    tbuf: Params | None = None
    n = len(y)
    lr, mu, wd = tcfg.lr, tcfg.momentum, tcfg.weight_decay
    bar = progress(range(tcfg.epochs * -(-n // tcfg.batch_size)), "replay tangents", show_progress)
    it = iter(bar)
    for epoch in range(1, tcfg.epochs + 1):
        batches = _batches(n, tcfg, seed, epoch)
        for rows, (xb, yb) in zip(batches, reader(batches)):
            next(it, None)
            xb = xb if xb.dtype == dtype else xb.to(dtype)

            def batch_grad(th: Params, w: torch.Tensor, xb: torch.Tensor = xb, yb: torch.Tensor = yb) -> Params:
                def loss(p: Params) -> torch.Tensor:
                    return (F.cross_entropy(functional_call(model, p, (xb,)), yb, reduction="none") * w).sum() / len(yb)
                return grad(loss)(th)

            ones = torch.ones(len(yb), dtype=dtype, device=device)
            rows_group = groups_dev[rows.to(device)]
            dot = {k: torch.empty_like(v) for k, v in tan.items()}
            g = None  # the batch gradient itself: every jvp's primal output, kept from the first
            for c in range(n_groups):
                primal, d = jvp(batch_grad, (theta, ones), ({k: v[c] for k, v in tan.items()},
                                                            (rows_group == c).to(dtype)))
                g = primal if g is None else g
                for k in dot:
                    dot[k][c] = d[k] + wd * tan[k][c] if wd else d[k]
            with torch.no_grad():
                tbuf = dot if tbuf is None else {k: tbuf[k].mul(mu).add_(dot[k]) for k in dot}
                tan = {k: tan[k] - lr * tbuf[k] for k in tan}
                theta, buf = _sgd_step(theta, buf, tuple(g[k] for k in theta), tcfg)
    flat = torch.cat([tan[name].reshape(n_groups, -1) for name in table.names], 1).cpu()
    return flat, torch.cat([theta[name].reshape(-1) for name in table.names]).cpu()

