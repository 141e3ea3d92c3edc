"""Influence matching (``--target influence``): the damped Fisher solve, the targets, the ridge, option checks."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_displacement import _data, _model, _trajectory
from torch.func import functional_call

from ddm_hpc import distill
from ddm_hpc.config import Config, DistillConfig, TrainConfig, _key_dict
from ddm_hpc.distill import (Matcher, damped_fisher_solve, distill_groups, influence_damping, influence_rows,
                             low_rank_fisher, low_rank_solve, per_group_grads)
from ddm_hpc.errors import ConfigError
from ddm_hpc.trajectory import MemoryTrajectory


@pytest.mark.parametrize("n, p", [(40, 7), (7, 40)])  # the parameter-space solve, and Woodbury's kernel solve
def test_damped_fisher_solve_is_the_explicit_inverse(n, p):
    g = torch.Generator().manual_seed(1)
    m, b = torch.randn(n, p, generator=g, dtype=torch.float64), torch.randn(3, p, generator=g, dtype=torch.float64)
    for damping in (1e-3, 0.5):
        want = torch.linalg.inv(m.T @ m / n + damping * torch.eye(p, dtype=torch.float64)) @ b.T
        torch.testing.assert_close(damped_fisher_solve(m.float(), b.float(), damping), want.T.float().double(),
                                   rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(damped_fisher_solve(m, b, damping), want.T, rtol=1e-9, atol=1e-11)


def _chunks(m: torch.Tensor, size: int = 5):
    """A ``row_chunks`` of per-row gradients ``m``, counting its passes."""
    passes = []

    def row_chunks(desc):
        passes.append(desc)
        yield from m.split(size)
    return row_chunks, passes


def test_low_rank_fisher_is_the_top_eigenpairs_and_exact_at_full_rank():
    """The range finder's eigenpairs are F's top ones (against ``eigh``, where the spectrum has a gap), it streams
    power + 2 passes, and at a rank that covers every row the solve is the exact one (Woodbury's)."""
    g = torch.Generator().manual_seed(2)
    n, p = 30, 60
    scales = torch.cat([torch.tensor([8.0, 6.0, 4.0, 3.0]), torch.full((n - 4,), 0.05)]).double()
    left = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    right = torch.linalg.qr(torch.randn(p, n, generator=g, dtype=torch.float64)).Q  # [p, n] orthonormal columns
    m = (left * scales) @ right.T  # rows with 4 large singular directions, the rest small
    fisher = m.T @ m / n
    vals, vecs = torch.linalg.eigh(fisher)
    row_chunks, passes = _chunks(m)
    got_vecs, got_vals = low_rank_fisher(row_chunks, n, p, 4, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert len(passes) == distill.FISHER_POWER_ITERS + 2
    torch.testing.assert_close(got_vals, vals[-4:].flip(0), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close((got_vecs.T @ vecs[:, -4:]).abs().max(0).values, torch.ones(4, dtype=torch.float64),
                               rtol=1e-6, atol=1e-6)  # the same directions, up to sign
    b = torch.randn(3, p, generator=g, dtype=torch.float64)
    full = low_rank_fisher(_chunks(m)[0], n, p, n, torch.Generator().manual_seed(0), torch.device("cpu"))
    torch.testing.assert_close(low_rank_solve(*full, b, 0.1), damped_fisher_solve(m, b, 0.1), rtol=1e-7, atol=1e-9)
    # truncated: the top-4 solve is the exact solve of F's rank-4 part, and within the tail's share of the full one
    top = vecs[:, -4:] @ torch.diag(vals[-4:]) @ vecs[:, -4:].T
    want = torch.linalg.solve(top + 0.1 * torch.eye(p, dtype=torch.float64), b.T).T
    torch.testing.assert_close(low_rank_solve(got_vecs, got_vals, b, 0.1), want, rtol=1e-6, atol=1e-8)


def test_damped_fisher_solve_refuses_a_system_too_large(monkeypatch):
    monkeypatch.setattr(distill, "FISHER_SOLVE_BYTES", 8 * 110)
    m = torch.randn(20, 11)
    with pytest.raises(ConfigError, match="20 Fisher rows x 11 parameters and solve a 11 x 11 float64 system, .* "
                                          "pass --fisher-rank .* or --fisher-rows 10 or fewer"):
        damped_fisher_solve(m, torch.randn(2, 11), 0.1)
    assert damped_fisher_solve(m[:10], torch.randn(2, 11), 0.1).shape == (2, 11)  # 10 x 11 rows: fits
    monkeypatch.setattr(distill, "FISHER_SOLVE_BYTES", 8 * 99)
    with pytest.raises(ConfigError, match="pass --fisher-rank .* or --fisher-rows 9 or fewer"):  # 10 x 11 no longer fit
        damped_fisher_solve(m[:10], torch.randn(2, 11), 0.1)
    monkeypatch.setattr(distill, "FISHER_SOLVE_BYTES", 8 * 3 * 11 * (4 + distill.FISHER_OVERSAMPLE))
    distill.check_fisher_size(10**6, 11, rank=4)  # low rank: the rows do not count, P x (rank + oversampling) does
    with pytest.raises(ConfigError, match="--fisher-rank 5 would hold .* pass --fisher-rank 4 or fewer"):
        distill.check_fisher_size(10, 11, rank=5)


def test_the_ridge_is_weight_decay_plus_early_stopping():
    """(1 - momentum) / (lr x optimizer steps): 90 rows in batches of 30 for 4 epochs are 12 steps; 91 rows are 16."""
    t = TrainConfig(epochs=4, batch_size=30, lr=0.05, momentum=0.9, weight_decay=1e-3)
    assert influence_damping(t, 90) == pytest.approx(1e-3 + 0.1 / (0.05 * 12))
    assert influence_damping(t, 91) == pytest.approx(1e-3 + 0.1 / (0.05 * 16))
    assert influence_damping(t, 90, damping=0.2) == pytest.approx(1e-3 + 0.2)


def test_fisher_rows_are_all_or_a_seeded_subset():
    assert torch.equal(influence_rows(50, 0, 0), torch.arange(50))
    assert torch.equal(influence_rows(50, 50, 0), torch.arange(50))
    rows = influence_rows(50, 12, 0)
    assert len(rows) == 12 and len(set(rows.tolist())) == 12 and torch.equal(rows, rows.sort().values)
    assert torch.equal(rows, influence_rows(50, 12, 0)) and not torch.equal(rows, influence_rows(50, 12, 1))


@pytest.mark.parametrize("chunks", [(64, 32), (4, 2)])  # (batch_real, group_chunk): one chunk, or many
@pytest.mark.parametrize("subset", [False, True])
def test_influence_targets_are_the_damped_newton_step_of_removing_each_group(chunks, subset):
    """T_k = (F + lambda I)^-1 (sum_{i in k} grad l_i(theta_tau)) / (N lr), F = (1/n) sum_i grad l_i grad l_i^T over
    the Fisher rows, against per-row gradients by plain autograd and an explicit float64 inverse, whatever the
    chunking; and one step of rate lr along T_k satisfies the Newton equation (F + lambda) N dtheta = group sum."""
    x, y, groups = _data()
    tcfg = TrainConfig(epochs=3, batch_size=30, lr=0.05)
    reader = _trajectory(x, y, tcfg)
    b, chunk = chunks
    rows = influence_rows(len(x), 25 if subset else 0, seed=0)
    lam = influence_damping(tcfg, len(x))
    m = Matcher(_model(), reader, x, y, groups, 6, DistillConfig(batch_real=b, group_chunk=chunk), torch.device("cpu"))
    m.set_influence_targets(tcfg.lr, lam, rows)
    model = _model()
    p = {n: v.detach().requires_grad_(True) for n, v in reader.params(reader.tau).items()}

    def flat_grad(loss):
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(p.values()))]).double()

    per = torch.stack([flat_grad(F.cross_entropy(functional_call(model, p, (x[i:i + 1],)), y[i:i + 1])) for i in rows])
    fisher = per.T @ per / len(rows) + lam * torch.eye(per.shape[1], dtype=torch.float64)
    assert per.shape[1] > len(rows)  # the kernel (Woodbury) form is the one under test here
    got = torch.cat([v.reshape(6, -1) for v in m.targets], 1).double()
    for k in (0, 5):
        sel = groups == k
        summed = flat_grad(F.cross_entropy(functional_call(model, p, (x[sel],)), y[sel], reduction="sum"))
        want = torch.linalg.solve(fisher, summed) / (len(x) * tcfg.lr)
        torch.testing.assert_close(got[k], want, rtol=2e-4, atol=1e-6)
        torch.testing.assert_close(len(x) * fisher @ (tcfg.lr * got[k]), summed, rtol=2e-4, atol=1e-5)
    torch.testing.assert_close(m.target_norm2, got.pow(2).sum(1).float(), rtol=1e-4, atol=1e-8)


def test_low_rank_influence_targets_equal_the_exact_ones_at_full_rank():
    """``--fisher-rank`` >= the Fisher's rows: the streamed low-rank targets are the exact ones."""
    x, y, groups = _data()
    tcfg = TrainConfig(epochs=3, batch_size=30, lr=0.05)
    reader = _trajectory(x, y, tcfg)
    lam, rows = influence_damping(tcfg, len(x)), influence_rows(len(x), 20, 0)
    targets = []
    for rank in (0, 20):
        m = Matcher(_model(), reader, x, y, groups, 6, DistillConfig(batch_real=8), torch.device("cpu"))
        m.set_influence_targets(tcfg.lr, lam, rows, rank=rank, seed=3)
        targets.append(torch.cat([v.reshape(6, -1) for v in m.targets], 1))
    torch.testing.assert_close(targets[1], targets[0], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("rank", [0, 5])
def test_a_shared_fisher_cache_gives_the_same_bits_and_skips_the_second_factorisation(monkeypatch, rank):
    """The levels of one shard share the factored Fisher (``cache``): the second level's targets are bit for bit those
    of a fresh Matcher, and its Fisher is not recomputed; another ridge is not served from the cache."""
    x, y, groups = _data()
    tcfg = TrainConfig(epochs=3, batch_size=30, lr=0.05)
    reader = _trajectory(x, y, tcfg)
    lam, rows = influence_damping(tcfg, len(x)), influence_rows(len(x), 0, 0)
    built = []
    real = Matcher._fisher_solver
    monkeypatch.setattr(Matcher, "_fisher_solver", lambda self, *a: built.append(a[4]) or real(self, *a))

    def targets(grp, n, cache, damping=lam):
        m = Matcher(_model(), reader, x, y, grp, n, DistillConfig(batch_real=8, tensor_weights="none"),
                    torch.device("cpu"))
        m.set_influence_targets(tcfg.lr, damping, rows, rank=rank, seed=3, cache=cache)
        return torch.cat([v.reshape(n, -1) for v in m.targets], 1), m.target_norm2

    cache: dict = {}
    targets(groups, 6, cache)
    shared = targets(y, 3, cache)  # the second level: the 3 classes
    assert built == [lam]
    fresh = targets(y, 3, None)
    for a, b in zip(shared, fresh):
        assert torch.equal(a, b)
    targets(y, 3, cache, 2 * lam)
    assert built == [lam, lam, 2 * lam] and len(cache) == 2


def test_fisher_rank_0_falls_back_to_the_low_rank_fisher_where_the_exact_one_does_not_fit(monkeypatch, caplog):
    """``--fisher-rank 0`` (the default) is the exact Fisher while it fits ``FISHER_SOLVE_BYTES``, else the
    ``AUTO_FISHER_RANK`` range finder (logged), never a refusal; a given rank is kept."""
    assert distill.fisher_rank_for(20, 11, 0) == 0 and distill.fisher_rank_for(20, 11, 7) == 7
    monkeypatch.setattr(distill, "FISHER_SOLVE_BYTES", 8 * 110)
    assert distill.fisher_rank_for(10, 11, 0) == 0  # 10 x 11 rows, a 10 x 10 kernel: fits
    with caplog.at_level("INFO", logger="ddm_hpc.distill"):
        assert distill.fisher_rank_for(20, 11, 0) == distill.AUTO_FISHER_RANK
    assert "exceeds" in caplog.text and "--fisher-rank" in caplog.text
    # the pipeline takes that rank: the targets are those of an explicit --fisher-rank AUTO_FISHER_RANK (here 4,
    # and a budget between the range finder's 3 x P x (4 + 16) and the exact 90 x P float64)
    monkeypatch.setattr(distill, "AUTO_FISHER_RANK", 4)
    x, y, groups = _data()
    p = sum(v.numel() for v in _model().parameters())
    tcfg = TrainConfig(epochs=3, batch_size=30, lr=0.05)
    reader = _trajectory(x, y, tcfg)
    lam, rows = influence_damping(tcfg, len(x)), influence_rows(len(x), 0, 0)
    targets = []
    for budget, rank in ((1 << 40, 4), (8 * 75 * p, 0)):
        monkeypatch.setattr(distill, "FISHER_SOLVE_BYTES", budget)
        m = Matcher(_model(), reader, x, y, groups, 6, DistillConfig(batch_real=8), torch.device("cpu"))
        m.set_influence_targets(tcfg.lr, lam, rows, rank=rank, seed=3)
        targets.append(torch.cat([v.reshape(6, -1) for v in m.targets], 1))
    torch.testing.assert_close(targets[1], targets[0], rtol=0, atol=0)


def test_influence_matching_lowers_the_relative_error_to_its_targets():
    """The matching (same relative L2 as displacement, at theta_tau) lowers every group's error to the influence
    targets; final_loss is recomputed from the returned synsets."""
    x, y, groups = _data()
    tcfg = TrainConfig(epochs=3, batch_size=30, lr=0.05)
    reader = _trajectory(x, y, tcfg)
    dcfg = DistillConfig(target="influence", syn_labels="learn", ipc=3, optimizer="adam", lr_img=0.05,
                         lr_label=0.3, distill_steps=25, batch_real=16, group_chunk=2, layer_rates=False)
    lam, rows = influence_damping(tcfg, len(x)), influence_rows(len(x), 0, 0)
    syn = distill_groups(_model(), reader, x, y, groups, torch.tensor([0, 1, 2, 0, 1, 2]), dcfg, 0,
                         torch.device("cpu"), show_progress=False, influence=(tcfg.lr, lam, rows, 0, 0))
    assert (syn.final_loss < syn.init_loss).all()
    m = Matcher(_model(), reader, x, y, groups, 6, dcfg, torch.device("cpu"))
    m.set_influence_targets(tcfg.lr, lam, rows)
    theta = {k: v.detach() for k, v in reader.params(reader.tau).items()}
    g = per_group_grads(_model(), theta, syn.images, syn.targets, torch.ones(6, 3), "loop")
    err = sum((a + b).reshape(6, -1).pow(2).sum(1) for a, b in zip(g, m.targets)) / m.target_norm2
    torch.testing.assert_close(err, torch.from_numpy(syn.final_loss), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="needs .lr, damping, rows, rank, seed"):
        distill_groups(_model(), reader, x, y, groups, torch.tensor([0, 1, 2, 0, 1, 2]), dcfg, 0,
                       torch.device("cpu"), show_progress=False)


def test_influence_options_are_checked_and_stay_out_of_existing_stage_keys():
    with pytest.raises(ConfigError, match="--target influence reverses .* --method ddm"):
        DistillConfig(target="influence", method="ddm-match")
    for option in ({"damping": 0.1}, {"fisher_rows": 100}, {"fisher_rank": 8}):
        with pytest.raises(ConfigError, match="--damping, --fisher-rows and --fisher-rank .* --target influence"):
            DistillConfig(target="displacement", **option)
    with pytest.raises(ConfigError, match="--fisher-rank is a number"):
        DistillConfig(target="influence", fisher_rank=-1)
    with pytest.raises(ConfigError, match="--damping is a ridge"):
        DistillConfig(target="influence", damping=-1.0)
    with pytest.raises(ConfigError, match="--fisher-rows is a number"):
        DistillConfig(target="influence", fisher_rows=-3)
    with pytest.raises(ConfigError, match="--augment .* --target influence has none"):
        DistillConfig(target="influence", augment="dsa")
    DistillConfig(target="influence", layer_rates=True, contraction=1)  # rates and contraction apply as well
    key = _key_dict(DistillConfig(target="influence"))
    assert key["target"] == "influence" and not {"damping", "fisher_rows", "fisher_rank"} & set(key)
    assert "damping" not in _key_dict(DistillConfig()) and "fisher_rows" not in _key_dict(DistillConfig())
    assert _key_dict(DistillConfig(target="influence", damping=0.5, fisher_rows=9))["fisher_rows"] == 9
    from ddm_hpc.attribute import check
    with pytest.raises(ConfigError, match="--target influence synsets .* --finetune-steps 0"):
        check(Config.from_dict({"distill": {"target": "influence"}, "attribute": {"finetune_scale": "matched"}}))
    check(Config())  # the default: influence synsets, removed by one unweighted step
    assert math.isfinite(influence_damping(TrainConfig(), 10))


@pytest.mark.gpu
def test_influence_targets_on_cuda_match_the_cpu():
    """The per-row gradients, group sums and float64 solve on the GPU give the CPU's targets (float32 gradients:
    a relative 1e-3)."""
    x, y, groups = _data()
    tcfg = TrainConfig(epochs=3, batch_size=30, lr=0.05)
    reader = _trajectory(x, y, tcfg)
    lam, rows = influence_damping(tcfg, len(x)), influence_rows(len(x), 0, 0)
    out = {}
    for dev in ("cpu", "cuda"):
        on = MemoryTrajectory(reader.table, reader.rows, dev)  # the checkpoints on the device, as distill reads them
        m = Matcher(_model().to(dev), on, x, y, groups, 6, DistillConfig(), torch.device(dev))
        m.set_influence_targets(tcfg.lr, lam, rows)
        out[dev] = torch.cat([v.reshape(6, -1).cpu() for v in m.targets], 1)
    torch.testing.assert_close(out["cuda"], out["cpu"], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("subset, mode", [(False, "fisher"), (True, "fisher"), (False, "fisher-sqrt")])
def test_fisher_tensor_weights_are_each_tensors_mean_fisher_diagonal(subset, mode):
    """``--tensor-weights fisher``: w_l = sum_{i in rows} |grad_l l_i(theta_tau)|^2 / (n n_l), against per-row gradients
    by plain autograd (``fisher-sqrt``: its square root); the class level reuses the cluster level's weights from the
    shared cache (same bits)."""
    x, y, groups = _data()
    tcfg = TrainConfig(epochs=3, batch_size=30, lr=0.05)
    reader = _trajectory(x, y, tcfg)
    rows = influence_rows(len(x), 25 if subset else 0, seed=0)
    lam = influence_damping(tcfg, len(x))
    dcfg = DistillConfig(batch_real=8, tensor_weights=mode)
    cache: dict = {}
    m = Matcher(_model(), reader, x, y, groups, 6, dcfg, torch.device("cpu"))
    m.set_influence_targets(tcfg.lr, lam, rows, cache=cache)
    model = _model()
    p = {n: v.detach().requires_grad_(True) for n, v in reader.params(reader.tau).items()}
    want = torch.zeros(len(p), dtype=torch.float64)
    for i in rows:
        g = torch.autograd.grad(F.cross_entropy(functional_call(model, p, (x[i:i + 1],)), y[i:i + 1]), list(p.values()))
        want += torch.stack([v.double().pow(2).sum() for v in g])
    want /= len(rows) * torch.tensor([v.numel() for v in p.values()], dtype=torch.float64)
    want = want.sqrt() if mode == "fisher-sqrt" else want
    torch.testing.assert_close(m.tensor_weights, want, rtol=1e-4, atol=1e-12)
    spread = 3 if mode == "fisher" else 3 ** 0.5  # the square roots of weights spread by more than 3
    assert m.tensor_weights.max() > spread * m.tensor_weights[m.tensor_weights > 0].min()  # not uniform: a real test
    wn = sum(m.tensor_weights[i].float() * v.reshape(6, -1).pow(2).sum(1) for i, v in enumerate(m.targets))
    torch.testing.assert_close(m.target_wnorm2, wn, rtol=1e-4, atol=1e-12)
    calls = []
    real = Matcher._fisher_tensor_weights
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Matcher, "_fisher_tensor_weights", lambda self, *a: calls.append(1) or real(self, *a))
        c = Matcher(_model(), reader, x, y, y, 3, dcfg, torch.device("cpu"))
        c.set_influence_targets(tcfg.lr, lam, rows, cache=cache)
    assert calls == [] and torch.equal(c.tensor_weights, m.tensor_weights)
    plain = Matcher(_model(), reader, x, y, groups, 6, DistillConfig(batch_real=8, tensor_weights="none"),
                    torch.device("cpu"))
    plain.set_influence_targets(tcfg.lr, lam, rows)
    assert plain.tensor_weights is None and torch.equal(plain.target_wnorm2, plain.target_norm2)
    for a, b in zip(plain.targets, m.targets):  # the weights change the matching, not the targets
        assert torch.equal(a, b)


def test_tensor_weights_weigh_the_training_loss_and_not_the_reported_one():
    """With ``--tensor-weights fisher`` the first training step's loss is sum_l w_l |g_l + T_l|^2 / sum_l w_l |T_l|^2
    at the initial images and labels (recomputed here), the reported final loss the unweighted relative L2 at the
    stored rates; the option is refused without --target influence and stays out of existing stage keys."""
    from ddm_hpc.config import _key_dict
    from ddm_hpc.distill import explained, init_images
    from ddm_hpc.errors import ConfigError
    from ddm_hpc.utils import generator
    x, y, groups = _data()
    tcfg = TrainConfig(epochs=3, batch_size=30, lr=0.05)
    reader = _trajectory(x, y, tcfg)
    dcfg = DistillConfig(target="influence", ipc=3, lr_img=0.05, distill_steps=5, batch_real=16, group_chunk=2,
                         tensor_weights="fisher")
    lam, rows = influence_damping(tcfg, len(x)), influence_rows(len(x), 0, 0)
    cls = torch.tensor([0, 1, 2, 0, 1, 2])
    syn = distill_groups(_model(), reader, x, y, groups, cls, dcfg, 0, torch.device("cpu"), show_progress=False,
                         influence=(tcfg.lr, lam, rows, 0, 0))
    m = Matcher(_model(), reader, x, y, groups, 6, dcfg, torch.device("cpu"))
    m.set_influence_targets(tcfg.lr, lam, rows)
    theta = {k: v.detach() for k, v in reader.params(reader.tau).items()}
    init = torch.stack(init_images(x, m.members, m.sizes, 3, "real", [generator(0, 21, k) for k in range(6)]))
    q = torch.full((6, 3, 3), 0.05)
    q[torch.arange(6)[:, None], torch.arange(3)[None, :], cls[:, None]] = 0.9  # the learned labels' init
    g0 = per_group_grads(_model(), theta, init, q, torch.ones(6, 3), "loop")
    w = m.tensor_weights.float()
    first = sum(w[i] * (a + t).reshape(6, -1).pow(2).sum(1) for i, (a, t) in enumerate(zip(g0, m.targets)))
    first = first / sum(w[i] * t.reshape(6, -1).pow(2).sum(1) for i, t in enumerate(m.targets))
    np.testing.assert_allclose(syn.group_history[:, 0], first.numpy(), rtol=1e-4, atol=1e-6)
    g = per_group_grads(_model(), theta, syn.images, syn.targets, torch.ones(6, 3), "loop")
    np.testing.assert_allclose(syn.final_loss, (1 - explained(g, m.targets) / m.target_norm2).numpy(), rtol=1e-4,
                               atol=1e-6)
    with pytest.raises(ConfigError, match="--tensor-weights fisher reads the Fisher .* pass --target influence"):
        DistillConfig(target="displacement", tensor_weights="fisher")
    assert "tensor_weights" not in _key_dict(DistillConfig(tensor_weights="none"))  # runs made before it weighed none
    assert _key_dict(DistillConfig())["tensor_weights"] == "fisher-sqrt"  # the default since issue 18's seeds 7-9
    assert _key_dict(DistillConfig(tensor_weights="fisher"))["tensor_weights"] == "fisher"


def test_unlearning_distances_are_zero_at_the_exact_step_and_the_removal_effect_at_none():
    """``benchmarks/influence_targets.py --unlearning``: exact outputs made by stepping theta_tau by D_k give distance 0
    at scale 1 and, at scale 0, the mean L2 of theta_tau's softmax from them, with the leave-one-out rows in the
    view's (unsorted) order of removed clusters."""
    import sys
    from pathlib import Path
    from types import SimpleNamespace
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from influence_targets import UNLEARN_SCALES, unlearning_distances
    x, y, _ = _data()
    reader = _trajectory(x, y, TrainConfig(epochs=2, batch_size=30, lr=0.05))
    model, table = _model().eval(), reader.table
    theta = {k: v.detach() for k, v in reader.params(reader.tau).items()}
    D = 0.3 * torch.randn(4, table.total, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    removed, q = torch.tensor([3, 0, 2]), x[:12]
    flat0 = table.flatten(theta).double()
    with torch.no_grad():
        exact = torch.stack([functional_call(model, table.unflatten((flat0 + D[k]).float()), (q,)).softmax(-1)
                             for k in removed.tolist()])
        p_tau = functional_call(model, theta, (q,)).softmax(-1)
    view = SimpleNamespace(removed=removed, gt=SimpleNamespace(outputs=exact))
    dist = unlearning_distances(model, table, theta, D, q, {"drop": view})["drop"]
    assert set(dist) == set(UNLEARN_SCALES) and 0.0 in dist and 1.0 in dist
    assert dist[1.0] < 1e-6
    expected = float((p_tau[None] - exact).norm(dim=-1).mean())
    assert expected > 1e-3  # the steps move the outputs, so the test can tell the scales apart
    np.testing.assert_allclose(dist[0.0], expected, rtol=1e-5)
    assert 0 < dist[0.5] < dist[0.0]  # halfway there is closer than nothing (smooth softmax, small steps)
