"""Distill stage: matching loss formula, batched per-group gradients, reverse matching works."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kernels import matching_loss, matching_loss_reference
from ddm_hpc.config import PAIRS_DISTILL, DistillConfig
from ddm_hpc.distill import distill_groups, group_members, per_group_grads, sample_real, trajectory_pairs
from ddm_hpc.models import build_model
from ddm_hpc.train import train_trajectory
from ddm_hpc.trajectory import MemoryTrajectory
from ddm_hpc.config import TrainConfig


def direct_formula(real, syn, sign, include_1d, distance):
    """Row-by-row loops in float64: the definition, written as plainly as possible."""
    k = real[0].shape[0]
    out = np.zeros(k)
    for r, s in zip(real, syn):
        for c in range(k):
            rc, sc = r[c].double().numpy(), s[c].double().numpy()
            if rc.ndim == 1:
                if not include_1d:
                    continue
                rows_r, rows_s = [rc], [sc]
            else:
                rows_r = rc.reshape(rc.shape[0], -1)
                rows_s = sc.reshape(sc.shape[0], -1)
            for a, b in zip(rows_r, rows_s):
                a = sign * a
                if distance == "cos":
                    out[c] += 1 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-6)
                else:
                    out[c] += ((b - a) ** 2).sum()
    return out


@pytest.mark.parametrize("sign", [-1.0, 1.0])
@pytest.mark.parametrize("include_1d", [False, True])
@pytest.mark.parametrize("distance", ["cos", "mse"])
def test_matching_loss_equals_direct_formula(sign, include_1d, distance):
    g = torch.Generator().manual_seed(0)
    shapes = [(4, 3, 3, 3), (5, 7), (6,), (2, 5, 5)]
    real = [torch.randn(3, *s, generator=g) for s in shapes]
    syn = [torch.randn(3, *s, generator=g) for s in shapes]
    want = direct_formula(real, syn, sign, include_1d, distance)
    for fn in (matching_loss, matching_loss_reference):
        got = fn(real, syn, sign=sign, include_1d=include_1d, distance=distance)
        assert got.shape == (3,)
        np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5, atol=1e-4)


def test_matching_loss_is_zero_for_exact_reverse_match():
    real = [torch.randn(2, 4, 3)]
    assert matching_loss(real, [-real[0]], sign=-1.0).abs().max() < 1e-5
    assert matching_loss(real, [real[0]], sign=-1.0).min() > 7.9  # 4 rows, each 1 - (-1) = 2


def _tiny_model():
    torch.manual_seed(0)
    return build_model("convnet", 1, 3, (8, 8), width=4, depth=2)


@pytest.mark.parametrize("impl", ["vmap", "loop"])
def test_batched_group_grads_equal_loop(impl):
    model = _tiny_model()
    params = {k: v.detach() for k, v in model.named_parameters()}
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 6, 1, 8, 8, generator=g)
    y = torch.randint(0, 3, (5, 6), generator=g)
    w = torch.ones(5, 6)
    w[1, 4:] = 0  # padding rows must not count
    w[3, 1:] = 0
    batched = per_group_grads(model, params, x, y, w, impl)
    for k in range(5):
        keep = w[k] > 0
        model.zero_grad()
        F.cross_entropy(model(x[k][keep]), y[k][keep]).backward()
        for (name, p), b in zip(model.named_parameters(), batched):
            torch.testing.assert_close(b[k], p.grad, rtol=1e-4, atol=1e-6, msg=f"group {k} {name}")


@pytest.mark.parametrize("impl", ["vmap", "loop"])
def test_double_backward_to_synthetic_images_equals_loop(impl):
    model = _tiny_model()
    params = {k: v.detach() for k, v in model.named_parameters()}
    g = torch.Generator().manual_seed(2)
    syn = torch.randn(4, 2, 1, 8, 8, generator=g, requires_grad=True)
    ys = torch.randint(0, 3, (4, 2), generator=g)
    real = [torch.randn(4, *p.shape, generator=g) for p in params.values()]
    loss = matching_loss(real, per_group_grads(model, params, syn, ys, torch.ones(4, 2), impl)).sum()
    loss.backward()
    batched = syn.grad.clone()
    syn.grad = None
    total = 0
    for k in range(4):
        out = F.cross_entropy(model(syn[k]), ys[k])
        gs = torch.autograd.grad(out, list(model.parameters()), create_graph=True)
        total = total + matching_loss([r[k:k + 1] for r in real], [x[None] for x in gs]).sum()
    total.backward()
    torch.testing.assert_close(batched, syn.grad, rtol=1e-4, atol=1e-6)


def test_group_members_and_sampling():
    groups = torch.tensor([2, 0, 2, 1, 0, 2, 2])
    members, sizes = group_members(groups, 3)
    assert sizes.tolist() == [2, 1, 4]
    for k in range(3):
        assert sorted(members[k, :sizes[k]].tolist()) == torch.nonzero(groups == k)[:, 0].tolist()
    rows, w = sample_real(members, sizes, 3, torch.Generator().manual_seed(0))
    assert rows.shape == (3, 3)
    assert w.sum(1).tolist() == [2, 1, 3]
    for k in range(3):
        picked = rows[k][w[k] > 0].tolist()
        assert len(set(picked)) == len(picked)  # without replacement
        assert all(groups[i] == k for i in picked)


def test_group_members_of_a_shard_hold_only_its_groups():
    """K = 10 000 groups: a shard's table is [shard, width] (width global), equal to the rows of the full table."""
    g = torch.Generator().manual_seed(0)
    groups = torch.cat([torch.arange(10_000), torch.randint(0, 10_000, (40_000,), generator=g)])
    full, sizes = group_members(groups, 10_000)
    ids = torch.arange(4_096, 4_128)
    members, sub = group_members(groups, 10_000, ids)
    assert members.shape == (32, full.shape[1]) and torch.equal(sub, sizes[ids])
    for i, k in enumerate(ids.tolist()):  # the same rows in the same order as the full table's
        assert torch.equal(members[i, :sub[i]], full[k, :sizes[k]])
        assert torch.equal(members[i, :sub[i]], torch.nonzero(groups == k)[:, 0])
    assert (members[:, sub.max():] == 0).all()


def test_group_with_no_rows_is_an_error():
    with pytest.raises(ValueError, match="no training rows"):
        group_members(torch.tensor([0, 0, 2]), 3)


@pytest.mark.parametrize("pairing", ["reverse", "alg1", "same"])
def test_trajectory_pairs(pairing):
    pairs = trajectory_pairs(pairing, 10, 4, torch.Generator().manual_seed(0), 200)
    for t, s in pairs:
        assert 0 <= t <= 10 and 0 <= s <= 10
        assert s == {"reverse": 10 - t, "alg1": t + 4, "same": t}[pairing]
    if pairing == "alg1":
        assert max(s for _, s in pairs) < 10  # t + s < tau (Algorithm 1)


@pytest.mark.parametrize("method", ["ddm", "ddm-match"])
def test_matching_loss_decreases_on_tiny_problem(method):
    g = torch.Generator().manual_seed(3)
    n = 120
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = torch.arange(n) % 3
    x[:, :, :3] += y[:, None, None, None].float()  # learnable signal
    model = _tiny_model()
    traj = train_trajectory(model, x, y, x[:30], y[:30], TrainConfig(epochs=4, batch_size=32, lr=0.05), 0,
                            torch.device("cpu"), show_progress=False)
    groups = torch.arange(n) % 6  # 6 groups, 2 per class
    dcfg = DistillConfig(**{**PAIRS_DISTILL, "distill_steps": 40, "lr_img": 1.0}, method=method, batch_real=20)
    syn = distill_groups(_tiny_model(), MemoryTrajectory(traj.table, traj.params), x, y, groups, torch.tensor([0, 1, 2] * 2),
                         dcfg, 0, torch.device("cpu"), show_progress=False)
    assert syn.images.shape == (6, 1, 1, 8, 8)
    assert syn.labels[:, 0].tolist() == [0, 1, 2, 0, 1, 2]
    assert np.isfinite(syn.loss_history).all()
    # every group improves on its fixed evaluation pairs, and the mean drops clearly
    assert (syn.final_loss < syn.init_loss).all(), (syn.init_loss, syn.final_loss)
    assert syn.final_loss.mean() < 0.9 * syn.init_loss.mean()


def test_shown_progress_bar_gives_the_same_synsets(monkeypatch):
    """The loss on the bar is read every POSTFIX_EVERY steps (a device sync); the synsets do not depend on it."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(60, 1, 8, 8, generator=g), torch.arange(60) % 3
    traj = train_trajectory(_tiny_model(), x, y, x[:10], y[:10], TrainConfig(epochs=2, batch_size=20, lr=0.05), 0,
                            torch.device("cpu"), show_progress=False)
    dcfg = DistillConfig(**{**PAIRS_DISTILL, "distill_steps": 12, "lr_img": 0.5}, batch_real=8)

    def run(show):
        return distill_groups(_tiny_model(), MemoryTrajectory(traj.table, traj.params), x, y, torch.arange(60) % 6,
                              torch.tensor([0, 1, 2] * 2), dcfg, 0, torch.device("cpu"), show_progress=show)

    quiet = run(False)
    monkeypatch.setenv("DDM_PROGRESS", "1")
    shown = run(True)
    assert torch.equal(quiet.images, shown.images)
    np.testing.assert_array_equal(quiet.group_history, shown.group_history)


def test_trajectory_reader_caches_every_row_that_fits(tmp_path, monkeypatch):
    """The distill stage draws pairs from all tau + 1 rows: a reader caches them all when they fit (each row read
    from HDF5 once), else SMALL_CACHE rows; an explicit size is kept."""
    import h5py

    from ddm_hpc import trajectory
    from ddm_hpc.trajectory import TrajectoryReader, write_trajectory

    traj = train_trajectory(_tiny_model(), torch.randn(40, 1, 8, 8), torch.arange(40) % 3, torch.randn(5, 1, 8, 8),
                            torch.arange(5) % 3, TrainConfig(epochs=12, batch_size=20), 0, torch.device("cpu"),
                            show_progress=False)
    path = tmp_path / "train.h5"
    with h5py.File(path, "w") as f:
        write_trajectory(f, traj)
        f.attrs["complete"] = True  # what atomic_h5 marks a finished artifact with
    reader = TrajectoryReader(path)
    assert len(reader) == 13 and reader._max == 13
    opened = []
    real_file = h5py.File
    monkeypatch.setattr(trajectory.h5py, "File", lambda *a, **k: opened.append(a) or real_file(*a, **k))
    for i in list(range(13)) * 2:
        assert torch.equal(reader.flat(i), traj.params[i])
    assert len(opened) == 13  # each row read once
    assert TrajectoryReader(path, cache=3)._max == 3
    monkeypatch.setattr(trajectory, "memory_budget_bytes", lambda device, fraction: 0)
    assert TrajectoryReader(path)._max == TrajectoryReader.SMALL_CACHE


def test_kernel_triton_without_cuda_fails_before_anything_runs(tmp_path, monkeypatch):
    """--kernel triton on a CPU: one line naming the cause and the fix, from the option checks (no training first)."""
    from ddm_hpc.cli import main

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    code = main(["distill", "--device", "cpu", "--kernel", "triton", "--out", str(tmp_path / "r")])
    assert code == 2 and not (tmp_path / "r").exists()


def test_kernel_option_reaches_the_matching_loss(monkeypatch):
    """distill_groups(kernel=...) hands --kernel to every matching_loss call."""
    import ddm_hpc.distill as distill

    seen = []
    real_fn = distill.matching_loss
    monkeypatch.setattr(distill, "matching_loss", lambda *a, **k: seen.append(k["backend"]) or real_fn(*a, **k))
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(30, 1, 8, 8, generator=g), torch.arange(30) % 3
    traj = train_trajectory(_tiny_model(), x, y, x[:10], y[:10], TrainConfig(epochs=1, batch_size=10), 0,
                            torch.device("cpu"), show_progress=False)
    distill_groups(_tiny_model(), MemoryTrajectory(traj.table, traj.params), x, y, y.clone(), torch.arange(3),
                   DistillConfig(**{**PAIRS_DISTILL, "distill_steps": 2}, batch_real=4), 0, torch.device("cpu"),
                   show_progress=False, kernel="reference")
    assert seen and set(seen) == {"reference"}
