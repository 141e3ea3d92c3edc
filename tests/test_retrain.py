"""Exact retraining: leave-cluster-out ground truth (bit-identical full reruns, a convex closed form), LDS of it."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ddm_hpc.config import Config, ModelConfig, RuntimeConfig, TrainConfig
from ddm_hpc.data import DatasetBundle
from ddm_hpc.errors import ConfigError
from ddm_hpc.metrics import lds, predicted_subset_effect, random_subset_masks
from ddm_hpc.models import build_target
from ddm_hpc.retrain import ground_truth, query_probs, retrain_without, subset_outputs, write_ground_truth
from ddm_hpc.storage import ParamTable
from ddm_hpc.train import train_trajectory

CPU = torch.device("cpu")


def _bundle(n: int, size: int, seed: int = 0) -> DatasetBundle:
    """Three noisy classes, each shifting a different block of pixels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n + 30, 1, size, size, generator=g)
    y = torch.arange(n + 30) % 3
    for c in range(3):
        x[y == c, :, c, :2] += 1.0
    return DatasetBundle("synthetic", x[:n], y[:n], x[n:], y[n:], torch.arange(n), torch.arange(30), 3,
                         (0.0,), (1.0,))


def _assignment(y: torch.Tensor, per_class: int) -> torch.Tensor:
    """Class-major cluster ids: rows of class c cycle through clusters c*per_class .. +per_class-1."""
    within = torch.zeros_like(y)
    for c in range(3):
        rows = torch.nonzero(y == c)[:, 0]
        within[rows] = torch.arange(len(rows)) % per_class
    return y * per_class + within


# ----------------------------------------------------------------------------- data order (ConvNet)
CONV_CFG = Config(seed=3, model=ModelConfig(model="convnet", width=4, depth=2),
                  train=TrainConfig(epochs=2, batch_size=16, lr=0.05), runtime=RuntimeConfig(progress=False))


def test_retrain_without_nothing_is_the_full_run_bit_for_bit():
    bundle = _bundle(96, 8)
    assign = _assignment(bundle.y_train, 2)
    model = build_target(CONV_CFG, bundle)
    full = train_trajectory(model, bundle.x_train, bundle.y_train, bundle.x_test, bundle.y_test, CONV_CFG.train,
                            CONV_CFG.seed, CPU, show_progress=False)
    same = retrain_without(CONV_CFG, bundle, assign, [])
    assert torch.equal(same, full.params[-1])
    # removing one cluster (16 of 96 rows) changes the result; the other seed is another run
    assert not torch.equal(retrain_without(CONV_CFG, bundle, assign, [1]), same)
    other = retrain_without(CONV_CFG, bundle, assign, [], seed_offset=1)
    assert not torch.equal(other, same)
    model1 = build_target(CONV_CFG, bundle, seed=CONV_CFG.seed + 1)
    full1 = train_trajectory(model1, bundle.x_train, bundle.y_train, bundle.x_test, bundle.y_test, CONV_CFG.train,
                             CONV_CFG.seed + 1, CPU, show_progress=False)
    assert torch.equal(other, full1.params[-1])


def test_retrain_without_union_of_clusters_equals_keep_mask_run():
    bundle = _bundle(96, 8)
    assign = _assignment(bundle.y_train, 2)
    keep = ~torch.isin(assign, torch.tensor([0, 5]))
    model = build_target(CONV_CFG, bundle)
    ref = train_trajectory(model, bundle.x_train, bundle.y_train, bundle.x_test, bundle.y_test, CONV_CFG.train,
                           CONV_CFG.seed, CPU, keep=keep, show_progress=False)
    assert torch.equal(retrain_without(CONV_CFG, bundle, assign.numpy(), torch.tensor([5, 0])), ref.params[-1])
    with pytest.raises(ConfigError, match="no training rows"):
        retrain_without(CONV_CFG, bundle, assign, [99])


def test_zero_weight_removal_keeps_every_minibatch_and_zeroes_the_removed_loss():
    """zero-weight: an independent SGD loop over the full run's minibatches (removed rows in their slots, loss
    (1/B) sum of the kept rows' losses) gives the retrained parameters; it differs from drop (re-batched),
    and with nothing removed it is the full run bit for bit."""
    from ddm_hpc.train import epoch_order

    bundle = _bundle(96, 8)
    assign = _assignment(bundle.y_train, 2)
    removed = torch.tensor([1, 4])
    got = retrain_without(CONV_CFG, bundle, assign, removed, removal="zero-weight")
    keep = ~torch.isin(assign, removed)
    model = build_target(CONV_CFG, bundle)
    tc = CONV_CFG.train
    opt = torch.optim.SGD(model.parameters(), lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay)
    for epoch in range(1, tc.epochs + 1):
        for rows in epoch_order(96, CONV_CFG.seed, epoch).split(tc.batch_size):
            per = F.cross_entropy(model(bundle.x_train[rows]), bundle.y_train[rows], reduction="none")
            loss = per[keep[rows]].sum() / len(rows)
            opt.zero_grad()
            loss.backward()
            opt.step()
    want = ParamTable.from_module(model).flatten(dict(model.named_parameters()))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)  # summation order of the masked sum differs
    assert (got - retrain_without(CONV_CFG, bundle, assign, removed)).abs().max() > 1e-4  # drop re-batches
    assert torch.equal(retrain_without(CONV_CFG, bundle, assign, [], removal="zero-weight"),
                       retrain_without(CONV_CFG, bundle, assign, []))
    with pytest.raises(ConfigError, match="--gt-removal"):
        retrain_without(CONV_CFG, bundle, assign, removed, removal="reshuffle")


def test_query_probs_are_softmax_of_the_loaded_parameters():
    bundle = _bundle(96, 8)
    model = build_target(CONV_CFG, bundle)
    table = ParamTable.from_module(model)
    flat = torch.randn(table.total, generator=torch.Generator().manual_seed(0)) * 0.1
    p = query_probs(model, table, flat, bundle.x_test[:5])
    assert p.shape == (5, 3) and p.dtype == torch.float32
    torch.testing.assert_close(p.sum(1), torch.ones(5))
    other = build_target(CONV_CFG, bundle)
    with torch.no_grad():
        for name, t in table.unflatten(flat).items():
            dict(other.named_parameters())[name].copy_(t)
    torch.testing.assert_close(p, other.eval()(bundle.x_test[:5]).softmax(-1))


# ----------------------------------------------------------------------------- convex ground truth
# Multinomial logistic regression (mlp with depth 0; ModelConfig passes depth only when truthy, so it
# goes through model_args). Full batch (batch > N) + weight decay: the objective is strongly convex,
# and 300 heavy-ball epochs in float32 reach L-BFGS's float64 optimum to ~2e-7 in probability
# (measured), so ATOL = 1e-5 is a float32 margin while each cluster's data effect is > 0.2.
WD = 0.05
ATOL = 1e-5
LOGREG_CFG = Config(seed=0, model=ModelConfig(model="mlp", width=0, model_args='{"depth": 0}'),
                    train=TrainConfig(epochs=300, batch_size=1000, lr=0.5, momentum=0.9, weight_decay=WD),
                    runtime=RuntimeConfig(progress=False))


def _lbfgs_probs(x: torch.Tensor, y: torch.Tensor, query_x: torch.Tensor) -> torch.Tensor:
    """Softmax of the exact minimiser of mean CE + WD/2 |theta|^2 (what SGD's weight_decay optimises)."""
    xf, qf = x.reshape(len(x), -1).double(), query_x.reshape(len(query_x), -1).double()
    w = torch.zeros(3, xf.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xf @ w.T + b, y) + WD / 2 * (w.square().sum() + b.square().sum())
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (qf @ w.T + b).softmax(-1).float()


@pytest.fixture(scope="module")
def logreg():
    bundle = _bundle(60, 4, seed=1)
    assign = _assignment(bundle.y_train, 2)  # K = 6 clusters of 10 rows
    query_x = bundle.x_test[:8]
    gt = ground_truth(LOGREG_CFG, bundle, assign, [0, 3, 5], query_x, n_noise_seeds=2)
    return bundle, assign, query_x, gt


def test_convex_ground_truth_is_the_exact_leave_out_optimum(logreg):
    bundle, assign, query_x, gt = logreg
    assert gt.base.shape == (8, 3) and gt.outputs.shape == (3, 8, 3) and gt.noise.shape == (2, 8, 3)
    assert gt.seconds > 0
    torch.testing.assert_close(gt.base, _lbfgs_probs(bundle.x_train, bundle.y_train, query_x), atol=ATOL, rtol=0)
    for r, c in enumerate([0, 3, 5]):
        keep = assign != c
        ref = _lbfgs_probs(bundle.x_train[keep], bundle.y_train[keep], query_x)
        torch.testing.assert_close(gt.outputs[r], ref, atol=ATOL, rtol=0)
        assert (gt.outputs[r] - gt.base).abs().max() > 1e-2  # the data effect is far above the tolerance
    # convex + converged: another init and data order reach the same optimum (noise floor ~ 0)
    torch.testing.assert_close(gt.noise, gt.base.expand(2, -1, -1), atol=ATOL, rtol=0)


def test_ground_truth_is_deterministic_and_averages_seeds(logreg):
    bundle, assign, query_x, gt = logreg
    again = ground_truth(LOGREG_CFG, bundle, assign, [0, 3, 5], query_x, n_noise_seeds=0, n_gt_seeds=2)
    assert again.noise.shape == (0, 8, 3)
    assert torch.equal(again.base, gt.base)
    model = build_target(LOGREG_CFG, bundle)
    table = ParamTable.from_module(model)
    seeds = [query_probs(model, table, retrain_without(LOGREG_CFG, bundle, assign, [3], s), query_x) for s in (0, 1)]
    assert torch.equal(seeds[0], gt.outputs[1])  # seed offset 0 alone is the one-seed ground truth
    assert torch.equal(again.outputs[1], (seeds[0] + seeds[1]) / 2)


def test_subset_ground_truth_and_lds_of_additive_leave_one_out(logreg):
    bundle, assign, query_x, _ = logreg
    k = 6
    masks = random_subset_masks(k, 24, 0.5, torch.Generator().manual_seed(0))
    probs = subset_outputs(LOGREG_CFG, bundle, assign, masks, query_x)
    assert probs.shape == (24, 8, 3)
    model = build_target(LOGREG_CFG, bundle)
    table = ParamTable.from_module(model)
    removed = torch.nonzero(~masks[2])[:, 0].tolist()
    assert torch.equal(probs[2], query_probs(model, table, retrain_without(LOGREG_CFG, bundle, assign, removed),
                                             query_x))
    # leave-one-out effects of every cluster, summed over the removed ones, rank the subsets well
    loo = ground_truth(LOGREG_CFG, bundle, assign, list(range(k)), query_x, n_noise_seeds=0)
    labels = bundle.y_test[:8]
    q = torch.arange(8)
    effect = (loo.outputs[:, q, labels] - loo.base[q, labels]).T  # [Q, K]: change of p(label) on removal
    actual = probs[:, q, labels]  # [n_masks, Q]
    # p(S) ~ base + sum_{removed} effect = const - sum_{kept} effect
    score = lds(predicted_subset_effect(-effect, masks), actual)
    assert score > 0.7
    assert lds(predicted_subset_effect(effect, masks), actual) == pytest.approx(-score)


def test_write_ground_truth(tmp_path, logreg):
    _, _, _, gt = logreg
    path = write_ground_truth(tmp_path / "evaluation.h5", gt, [0, 3, 5], torch.arange(10, 18), torch.arange(8) % 3,
                              cfg=LOGREG_CFG)
    with h5py.File(path, "r") as f:
        assert f["gt/base"].dtype == np.float32 and f["gt/base"].shape == (8, 3)
        assert f["gt/removed"].dtype == np.int64 and f["gt/removed"][()].tolist() == [0, 3, 5]
        assert f["gt/outputs"].dtype == np.float32 and f["gt/outputs"].shape == (3, 8, 3)
        assert f["gt/noise"].shape == (2, 8, 3)
        np.testing.assert_array_equal(f["gt/outputs"][()], gt.outputs.numpy())
        assert f["query_index"][()].tolist() == list(range(10, 18))
        assert f["query_label"].dtype == np.int64
        assert json.loads(f.attrs["config"])["train"]["epochs"] == 300
        assert f.attrs["seconds"] == pytest.approx(gt.seconds) and f.attrs["complete"]
    with pytest.raises(ValueError, match="removed ids"):
        write_ground_truth(tmp_path / "bad.h5", gt, [0, 3], torch.arange(8), torch.arange(8))
    assert not (tmp_path / "bad.h5").exists()


# ----------------------------------------------------------------------------- masks and LDS
