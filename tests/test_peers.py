"""Peer methods (ddm_hpc.methods.tracin, ddm_hpc.methods.trak): TracIn and TRAK against closed forms on softmax regression.

Softmax regression z = W x + b (``build_model("mlp", ..., depth=0)``) has closed-form
per-sample gradients, so both scorers are checked value by value:
  * CE gradient: (p - e_y) x^T and (p - e_y), so TracIn's inner product factorises as
    <p_i - e_yi, p_q - e_yq> * (x_i . x_q + 1).
  * margin gradient (TRAK): g = e_y - softmax over the other classes (zero at y), phi = [g x^T, g].
"""
from __future__ import annotations

import functools
import logging

import pytest
import torch
import torch.nn.functional as F

from ddm_hpc.errors import ConfigError
from ddm_hpc.models import build_model
from ddm_hpc.methods import to_clusters, tracin_scores, trak_scores
from ddm_hpc.storage import ParamTable

IMG = (5, 6)  # D = 30 pixels


def _problem(n: int = 300, q: int = 8, classes: int = 4, seed: int = 0, steps: int = 60):
    """Softmax regression trained by full-batch GD; returns model, table, trajectory, data."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = build_model("mlp", 1, classes, IMG, depth=0)
    d = IMG[0] * IMG[1]
    w_true = torch.randn(classes, d, generator=gen)
    x = torch.randn(n + q, 1, *IMG, generator=gen)
    y = (x.flatten(1) @ w_true.T + 2.0 * torch.randn(n + q, classes, generator=gen)).argmax(1)
    table = ParamTable.from_module(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    traj = [table.flatten(dict(model.named_parameters()))]
    for step in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x[:n]), y[:n]).backward()
        opt.step()
        if (step + 1) % (steps // 3) == 0:
            traj.append(table.flatten(dict(model.named_parameters())))
    return model, table, traj, x[:n], y[:n], x[n:], y[n:]


def _linear(table: ParamTable, flat: torch.Tensor):
    p = {k: v.double() for k, v in table.unflatten(flat).items()}
    (w_name,) = [k for k in p if k.endswith("weight")]
    (b_name,) = [k for k in p if k.endswith("bias")]
    return p[w_name], p[b_name]


def test_tracin_matches_closed_form_of_softmax_regression():
    model, table, traj, x, y, xq, yq = _problem()
    lrs = [0.3, 0.2, 0.1, 0.05][: len(traj)]
    got = tracin_scores(model, table, traj, lrs, x, y, xq, yq, batch=64)
    assert got.shape == (len(xq), len(x)) and got.dtype == torch.float32

    xf, xqf = x.flatten(1).double(), xq.flatten(1).double()
    want = torch.zeros(len(xq), len(x), dtype=torch.float64)
    for flat, lr in zip(traj, lrs):
        w, b = _linear(table, flat)
        r = (xf @ w.T + b).softmax(1) - F.one_hot(y, w.shape[0])
        rq = (xqf @ w.T + b).softmax(1) - F.one_hot(yq, w.shape[0])
        want += lr * (rq @ r.T) * (xqf @ xf.T + 1.0)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def _margin_features(table: ParamTable, flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
    """Closed-form margin gradients phi [n, P] (table order: weight then bias) and p(y|x) [n]."""
    w, b = _linear(table, flat)
    z = x.flatten(1).double() @ w.T + b
    onehot = F.one_hot(y, w.shape[0]).bool()
    g = -z.masked_fill(onehot, float("-inf")).softmax(1)  # minus softmax over the other classes
    g[onehot] = 1.0
    phi = torch.cat([(g[:, :, None] * x.flatten(1).double()[:, None, :]).flatten(1), g], dim=1)
    assert table.names[0].endswith("weight")
    return phi, z.softmax(1)[onehot]


def test_trak_without_projection_matches_closed_form():
    model, table, traj, x, y, xq, yq = _problem()
    got = trak_scores(model, table, traj[-1:], x, y, xq, yq, proj_dim=10**9, batch=64)
    assert got.shape == (len(xq), len(x)) and got.dtype == torch.float32
    phi, p = _margin_features(table, traj[-1], x, y)
    phi_q, _ = _margin_features(table, traj[-1], xq, yq)
    # phi_q (Phi^T Phi)^+ Phi^T = phi_q Phi^+ (Phi^T Phi is singular here: the margin gradient
    # sums to 0 over classes, so rank = (L - 1)(D + 1) < P), re-weighted by Q = 1 - p.
    want = phi_q @ torch.linalg.pinv(phi) * (1.0 - p)[None, :]
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_trak_ensembles_checkpoints_like_traker():
    model, table, traj, x, y, xq, yq = _problem(n=200, q=4)
    ckpts = traj[-2:]
    got = trak_scores(model, table, ckpts, x, y, xq, yq, proj_dim=10**9)
    inner, q_term = 0.0, 0.0
    for flat in ckpts:
        phi, p = _margin_features(table, flat, x, y)
        phi_q, _ = _margin_features(table, flat, xq, yq)
        inner = inner + phi_q @ torch.linalg.pinv(phi) / len(ckpts)
        q_term = q_term + (1.0 - p) / len(ckpts)
    want = inner * q_term[None, :]
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_trak_projection_preserves_scores():
    model, table, traj, x, y, xq, yq = _problem()
    full = trak_scores(model, table, traj[-1:], x, y, xq, yq, proj_dim=10**9)
    rank = (4 - 1) * (IMG[0] * IMG[1] + 1)  # 93 of P = 124
    # k >= rank(Phi): the Gaussian sketch is injective on span(Phi), so TRAK is unchanged.
    exact = trak_scores(model, table, traj[-1:], x, y, xq, yq, proj_dim=rank + 4, seed=1)
    torch.testing.assert_close(exact, full, rtol=1e-3, atol=1e-3 * full.abs().max().item())
    # k = 2/3 rank: an approximation; per-query Pearson r measured 0.77-0.80 over seeds 0-2.
    approx = trak_scores(model, table, traj[-1:], x, y, xq, yq, proj_dim=62, seed=0)
    r = torch.stack([torch.corrcoef(torch.stack([a, b]))[0, 1] for a, b in zip(approx, full)])
    assert r.mean() > 0.6 and r.min() > 0.4, r
    again = trak_scores(model, table, traj[-1:], x, y, xq, yq, proj_dim=62, seed=0)
    torch.testing.assert_close(again, approx)  # seeded


def test_trak_leaves_model_and_logging_alone():
    model, table, traj, x, y, xq, yq = _problem(n=120, q=2)
    before = table.flatten(dict(model.named_parameters()))
    handlers = list(logging.root.handlers)
    trak_scores(model, table, traj[:1], x, y, xq, yq, proj_dim=16)
    assert torch.equal(table.flatten(dict(model.named_parameters())), before)
    assert logging.root.handlers == handlers


def _fit(x: torch.Tensor, y: torch.Tensor, w0: torch.Tensor, steps: int = 300, wd: float = 1e-2) -> torch.Tensor:
    """Binary logistic regression (2-logit softmax) by full-batch GD with L2: a convex problem."""
    w = w0.clone().requires_grad_(True)
    xb = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    for _ in range(steps):
        loss = F.cross_entropy(xb @ w.T, y) + wd * (w ** 2).sum()
        (g,) = torch.autograd.grad(loss, w)
        w = (w - 1.0 * g).detach().requires_grad_(True)
    return w.detach()


def test_top_scored_sample_is_more_harmful_to_remove_than_random():
    gen = torch.Generator().manual_seed(3)
    n, d = 80, 4
    x = torch.randn(n + 6, d, generator=gen, dtype=torch.float64)
    y = ((x[:, 0] + 0.8 * torch.randn(n + 6, generator=gen, dtype=torch.float64)) > 0).long()
    xt, yt, xq, yq = x[:n], y[:n], x[n:], y[n:]
    w_full = _fit(xt, yt, torch.zeros(2, d + 1, dtype=torch.float64), steps=2000)
    model = build_model("mlp", 1, 2, (1, d), depth=0)
    table = ParamTable.from_module(model)
    flat = torch.cat([w_full[:, :d].reshape(-1), w_full[:, d]]).float()
    img, qimg = xt.float().view(n, 1, 1, d), xq.float().view(-1, 1, 1, d)

    @functools.cache
    def drop(i: int, q: int) -> float:  # fall in log p(y_q | x_q) when training sample i is removed
        keep = torch.arange(n) != i
        w = _fit(xt[keep], yt[keep], w_full)
        lp = lambda w_: torch.log_softmax(torch.cat([xq[q], torch.ones(1, dtype=xq.dtype)]) @ w_.T, 0)[yq[q]]
        return float(lp(w_full) - lp(w))

    rand = torch.randint(0, n, (8,), generator=gen).tolist()
    for scores in (tracin_scores(model, table, [flat], [1.0], img, yt, qimg, yq),
                   trak_scores(model, table, [flat], img, yt, qimg, yq, proj_dim=512)):
        top = scores.argmax(1).tolist()
        top_drop = torch.tensor([drop(top[q], q) for q in range(len(xq))])
        rand_drop = torch.tensor([[drop(i, q) for i in rand] for q in range(len(xq))]).mean(1)
        assert (top_drop > rand_drop).all() and (top_drop > 0).all(), (top_drop, rand_drop)


def test_to_clusters_matches_loop():
    gen = torch.Generator().manual_seed(0)
    per = torch.randn(3, 50, generator=gen)
    assign = torch.randint(0, 6, (50,), generator=gen)
    assign[assign == 4] = 5  # cluster 4 empty
    got = to_clusters(per, assign, 7)
    assert got.shape == (3, 7) and got.dtype == per.dtype
    want = torch.zeros(3, 7)
    for i, c in enumerate(assign.tolist()):
        want[:, c] += per[:, i]
    torch.testing.assert_close(got, want)
    assert (got[:, 4] == 0).all() and (got[:, 6] == 0).all()
    want64 = torch.zeros(3, 7, dtype=torch.float64)
    for i, c in enumerate(assign.tolist()):
        want64[:, c] += per[:, i].double()
    torch.testing.assert_close(to_clusters(per.double(), assign.numpy(), 7), want64)


def test_bad_inputs_raise_config_errors():
    model, table, traj, x, y, xq, yq = _problem(n=20, q=2, steps=3)
    with pytest.raises(ConfigError, match="at least one checkpoint"):
        tracin_scores(model, table, [], [], x, y, xq, yq)
    with pytest.raises(ConfigError, match="at least one checkpoint"):
        trak_scores(model, table, [], x, y, xq, yq)
    with pytest.raises(ConfigError, match="learning rates"):
        tracin_scores(model, table, traj, [0.1], x, y, xq, yq)
    with pytest.raises(ConfigError, match="y_train has"):
        trak_scores(model, table, traj, x, y[:-1], xq, yq)
    with pytest.raises(ConfigError, match="y_query has"):
        tracin_scores(model, table, traj, [0.1] * len(traj), x, y, xq[:1], yq)
    with pytest.raises(ConfigError, match="parameter table"):
        trak_scores(model, table, [traj[0][:-1]], x, y, xq, yq)
    with pytest.raises(ConfigError, match="proj_dim"):
        trak_scores(model, table, traj, x, y, xq, yq, proj_dim=0)
    with pytest.raises(ConfigError, match="do not match"):
        tracin_scores(build_model("mlp", 1, 4, IMG, depth=1, hidden=3), table, traj, [0.1] * len(traj), x, y, xq, yq)
    with pytest.raises(ConfigError, match="cluster assignments"):
        to_clusters(torch.zeros(2, 5), torch.zeros(4, dtype=torch.long), 3)
    with pytest.raises(ConfigError, match="k=3"):
        to_clusters(torch.zeros(2, 4), torch.tensor([0, 1, 2, 3]), 3)
