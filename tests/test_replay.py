"""The replay metagradient (``ddm_hpc.replay``) against exact retraining and a closed form.

* Non-convex tiny model in float64: d f / d w_k matches finite differences of exact zero-weight
  retraining (``train_trajectory(weights=...)`` with w_k = 1 - eps) for two eps; the error must
  shrink with eps (first-order truncation), and stay below a stated tolerance.
* Convex model (multinomial logistic regression with weight decay, full-batch SGD with momentum
  run to convergence): d f / d w_k matches the implicit-function closed form
  ``-grad f^T H^{-1} d(grad L)/d w_k`` at the optimum.
* Float32 CPU: the replayed forward reproduces the train stage's theta_tau bit for bit.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ddm_hpc.config import TrainConfig
from ddm_hpc.models import convnet
from ddm_hpc.replay import replay_metagradients, replay_tangents
from ddm_hpc.storage import ParamTable
from ddm_hpc.train import train_trajectory


def _data(n: int, d: int, n_cls: int, k: int, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 1, d, generator=g, dtype=dtype)
    y = torch.randint(0, n_cls, (n,), generator=g)
    groups = torch.arange(n) % k
    return x, y, groups


def _objective(model: nn.Module, xq: torch.Tensor, yq: torch.Tensor):
    def f(theta):
        return F.cross_entropy(functional_call(model, theta, (xq,)), yq, reduction="none")
    return f


def _retrained_f(model_fn, x, y, tcfg, weights, xq, yq):
    """The objective after exact retraining with loss weights ``weights`` (the model itself: the recorded
    trajectory rows are float32)."""
    model = model_fn()
    train_trajectory(model, x, y, x[:0], y[:0], tcfg, 3, torch.device("cpu"), show_progress=False, weights=weights)
    with torch.no_grad():
        return F.cross_entropy(model(xq), yq, reduction="none")


def test_metagradient_matches_finite_differences_of_zero_weight_retraining():
    torch.manual_seed(0)
    n, d, n_cls, k = 24, 6, 3, 4
    x, y, groups = _data(n, d, n_cls, k)
    xq, yq = torch.randn(3, 1, 1, d, dtype=torch.float64), torch.tensor([0, 1, 2])

    def model_fn():
        torch.manual_seed(5)
        return nn.Sequential(nn.Flatten(), nn.Linear(d, 8), nn.Tanh(), nn.Linear(8, n_cls)).double()

    # batch 10 of 24 rows: the last batch of each epoch is short, as in real runs
    tcfg = TrainConfig(epochs=3, batch_size=10, lr=0.2, momentum=0.9, weight_decay=5e-3)
    model = model_fn()
    meta = replay_metagradients(model, x, y, tcfg, 3, groups, k, _objective(model, xq, yq))
    assert meta.grads.shape == (3, k) and meta.steps == 9
    base = _retrained_f(model_fn, x, y, tcfg, None, xq, yq)
    errs = []
    for eps in (1e-3, 1e-4):
        fd = torch.zeros(3, k, dtype=torch.float64)
        for c in range(k):
            w = torch.ones(n, dtype=torch.float64)
            w[groups == c] = 1 - eps
            fd[:, c] = (base - _retrained_f(model_fn, x, y, tcfg, w, xq, yq)) / eps
        errs.append(float((fd - meta.grads).abs().max() / meta.grads.abs().max()))
    assert errs[1] < 1e-4, errs  # relative to the largest metagradient; truncation O(eps)
    assert errs[1] < errs[0] / 5, errs  # the difference quotient converges to the metagradient


def test_metagradient_matches_the_closed_form_on_a_convex_model():
    n, d, n_cls, k = 30, 4, 3, 5
    x, y, groups = _data(n, d, n_cls, k, seed=1)
    xq, yq = torch.randn(2, 1, 1, d, dtype=torch.float64), torch.tensor([1, 2])
    lam = 0.05

    def model_fn():
        torch.manual_seed(2)
        return nn.Sequential(nn.Flatten(), nn.Linear(d, n_cls)).double()

    tcfg = TrainConfig(epochs=400, batch_size=n, lr=0.5, momentum=0.5, weight_decay=lam)  # full batch: GD
    model = model_fn()
    meta = replay_metagradients(model, x, y, tcfg, 0, groups, k, _objective(model, xq, yq))

    # closed form at the optimum theta*(w) of L(theta; w) + lam/2 |theta|^2 (what SGD's weight decay minimises)
    table = ParamTable.from_module(model)
    theta = meta.theta_tau.clone()

    def loss(flat, w):
        out = functional_call(model, table.unflatten(flat), (x,))
        return (F.cross_entropy(out, y, reduction="none") * w).sum() / n + 0.5 * lam * flat.square().sum()

    w1 = torch.ones(n, dtype=torch.float64)
    g = torch.autograd.functional.jacobian(lambda t: torch.autograd.grad(loss(t, w1), t, create_graph=True)[0], theta)
    assert torch.autograd.grad(loss(theta.requires_grad_(True), w1), theta)[0].abs().max() < 1e-10  # converged
    theta = theta.detach()
    mixed = torch.autograd.functional.jacobian(
        lambda w: torch.autograd.grad(loss(theta.requires_grad_(True), w), theta, create_graph=True)[0], w1)  # [P, N]
    per_group = torch.stack([mixed[:, groups == c].sum(1) for c in range(k)], 1)  # d grad / d w_k
    df = torch.autograd.functional.jacobian(
        lambda t: F.cross_entropy(functional_call(model, table.unflatten(t), (xq,)), yq, reduction="none"), theta)
    closed = -df @ torch.linalg.solve(g, per_group)  # [2, K]
    torch.testing.assert_close(meta.grads, closed, rtol=1e-6, atol=1e-9)


def test_replayed_forward_reproduces_the_training_bit_for_bit():
    torch.manual_seed(0)
    x, y = torch.randn(70, 1, 12, 12), torch.randint(0, 3, (70,))
    tcfg = TrainConfig(epochs=2, batch_size=32, lr=0.05, momentum=0.9, weight_decay=5e-4)

    def model_fn():
        torch.manual_seed(4)
        return convnet(1, 3, (12, 12), width=4, depth=2)

    traj = train_trajectory(model_fn(), x, y, x[:0], y[:0], tcfg, 9, torch.device("cpu"), show_progress=False)
    model = model_fn()
    xq, yq = x[:2], y[:2]
    meta = replay_metagradients(model, x, y, tcfg, 9, torch.arange(70) % 5, 5, _objective(model, xq, yq))
    assert torch.equal(meta.theta_tau, traj.params[-1])
    assert torch.isfinite(meta.grads).all() and meta.grads.abs().sum() > 0


def _tanh_case():
    """The two-epoch tanh-MLP case the batched and CUDA tests share (float64, a short last batch)."""
    n, d, n_cls, k = 24, 6, 3, 4
    x, y, groups = _data(n, d, n_cls, k)
    xq, yq = torch.randn(3, 1, 1, d, dtype=torch.float64), torch.tensor([0, 1, 2])

    def model_fn():
        torch.manual_seed(5)
        return nn.Sequential(nn.Flatten(), nn.Linear(d, 8), nn.Tanh(), nn.Linear(8, n_cls)).double()

    return x, y, groups, xq, yq, model_fn, TrainConfig(epochs=2, batch_size=10, lr=0.2, momentum=0.9,
                                                       weight_decay=5e-3), k


def test_batched_adjoints_give_the_looped_numbers():
    """The vectorised double-backward (the CUDA default) and the per-objective loop (the CPU default) agree."""
    x, y, groups, xq, yq, model_fn, tcfg, k = _tanh_case()
    runs = []
    for batched in (False, True):
        model = model_fn()
        runs.append(replay_metagradients(model, x, y, tcfg, 3, groups, k, _objective(model, xq, yq), batched=batched))
    torch.testing.assert_close(runs[1].grads, runs[0].grads, rtol=1e-12, atol=1e-15)


def test_forward_tangents_give_the_reverse_metagradients():
    """Forward mode (K tangents carried through the steps) and reverse mode (M adjoints carried back) are two
    orders of the same chain rule: grad f(theta_tau) . d theta_tau / d w_k equals replay's d f / d w_k."""
    x, y, groups, xq, yq, model_fn, tcfg, k = _tanh_case()
    model = model_fn()
    rev = replay_metagradients(model, x, y, tcfg, 3, groups, k, _objective(model, xq, yq))
    tangents, theta_tau = replay_tangents(model_fn(), x, y, tcfg, 3, groups, k)
    torch.testing.assert_close(theta_tau, rev.theta_tau, rtol=0, atol=1e-13)
    table = ParamTable.from_module(model)
    theta = {n: t.reshape(s).requires_grad_(True)
             for n, t, s in zip(table.names, torch.split(theta_tau, table.numels), table.shapes)}
    f = _objective(model, xq, yq)(theta)
    grads = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(f[m], list(theta.values()),
                                                                               retain_graph=True)])
                         for m in range(len(f))])
    fwd = grads @ tangents.T
    torch.testing.assert_close(fwd, rev.grads.to(fwd.dtype), rtol=1e-9, atol=1e-12)
    assert fwd.abs().max() > 1e-3  # not a vacuous zero


@pytest.mark.gpu
def test_replay_on_cuda_matches_cpu():
    """The CUDA replay (batched adjoints) gives the CPU float64 metagradient to float64 round-off."""
    x, y, groups, xq, yq, model_fn, tcfg, k = _tanh_case()
    cpu_model, gpu_model = model_fn(), model_fn().cuda()
    want = replay_metagradients(cpu_model, x, y, tcfg, 3, groups, k, _objective(cpu_model, xq, yq))
    got = replay_metagradients(gpu_model, x.cuda(), y.cuda(), tcfg, 3, groups, k,
                               _objective(gpu_model, xq.cuda(), yq.cuda()), device="cuda")
    torch.testing.assert_close(got.grads, want.grads, rtol=1e-9, atol=1e-12)
