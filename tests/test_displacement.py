"""Displacement matching (``--target displacement``): exact targets, what the matching reports, option checks."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ddm_hpc.attribute import check
from ddm_hpc.config import PAIRS_DISTILL, Config, DistillConfig, TrainConfig
from ddm_hpc.distill import Matcher, contribution_per_row, distill_groups, per_group_grads
from ddm_hpc.errors import ConfigError
from ddm_hpc.models import build_model
from ddm_hpc.train import train_trajectory
from ddm_hpc.trajectory import MemoryTrajectory


def _model():
    torch.manual_seed(0)
    return build_model("convnet", 1, 3, (8, 8), width=4, depth=2)


def _data(n=90):
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(n, 1, 8, 8, generator=g), torch.arange(n) % 3
    x[:, :, :3] += y[:, None, None, None].float()
    groups = torch.tensor([0, 1, 2, 3, 4] * (n // 5))  # uneven classes per group
    groups[:7] = 5  # one group of 7 rows
    return x, y, groups


def _trajectory(x, y, tcfg):
    traj = train_trajectory(_model(), x, y, x[:10], y[:10], tcfg, 0, torch.device("cpu"), show_progress=False)
    return MemoryTrajectory(traj.table, traj.params)


@pytest.mark.parametrize("chunks", [(64, 32), (4, 2)])  # (batch_real, group_chunk): one chunk, or many
def test_targets_sum_to_the_training_steps_exactly(chunks):
    """Full-batch SGD without momentum or weight decay: theta_{t+1} = theta_t - lr * mean grad, so the groups'
    targets, times lr, add up to theta_0 - theta_tau (exactly, up to float sums), whatever the chunking."""
    x, y, groups = _data()
    tcfg = TrainConfig(epochs=3, batch_size=len(x), lr=0.05, momentum=0.0, weight_decay=0.0)
    reader = _trajectory(x, y, tcfg)
    b, chunk = chunks
    m = Matcher(_model(), reader, x, y, groups, 6, DistillConfig(batch_real=b, group_chunk=chunk), torch.device("cpu"))
    m.set_displacement_targets(contribution_per_row(tcfg, reader.tau))
    total = torch.cat([v.sum(0).reshape(-1) for v in m.targets]) * tcfg.lr
    want = reader.flat(0) - reader.flat(reader.tau)
    torch.testing.assert_close(total, want, rtol=1e-4, atol=1e-6)
    # and each group's target is its own rows' summed gradient over the steps (reference: autograd per group)
    model = _model()
    for k in (1, 5):
        rows = torch.nonzero(groups == k)[:, 0]
        ref = 0
        for t in range(reader.tau):
            p = {n: v.detach().requires_grad_(True) for n, v in reader.params(t).items()}
            loss = F.cross_entropy(torch.func.functional_call(model, p, (x[rows],)), y[rows], reduction="sum")
            ref = ref + torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(p.values()))])
        got = torch.cat([v[k].reshape(-1) for v in m.targets])
        torch.testing.assert_close(got, ref / len(x), rtol=1e-4, atol=1e-7)


def test_contribution_per_row_follows_the_schedule():
    t = TrainConfig(epochs=12, batch_size=32, momentum=0.9, save_every=3)
    assert contribution_per_row(t, 4) == pytest.approx(3 / (32 * 0.1))


def test_matching_reports_the_relative_error_of_the_synset_gradient():
    """final_loss is |grad L(theta_tau; S_k) + T_k|^2 / |T_k|^2, recomputed here from the returned synset; the
    matching lowers it for every group, and a shard's groups come out the same as in the full run."""
    x, y, groups = _data()
    tcfg = TrainConfig(epochs=3, batch_size=30, lr=0.05)
    reader = _trajectory(x, y, tcfg)
    dcfg = DistillConfig(target="displacement", tensor_weights="none", syn_labels="learn", ipc=3, optimizer="adam",
                         lr_img=0.05, lr_label=0.3, distill_steps=25, batch_real=16, group_chunk=2, layer_rates=False)
    cls = torch.tensor([0, 1, 2, 0, 1, 2])
    per_row = contribution_per_row(tcfg, reader.tau)
    syn = distill_groups(_model(), reader, x, y, groups, cls, dcfg, 0, torch.device("cpu"), show_progress=False,
                         per_row=per_row)
    assert (syn.final_loss < syn.init_loss).all() and syn.final_loss.mean() < 0.9 * syn.init_loss.mean()
    m = Matcher(_model(), reader, x, y, groups, 6, dcfg, torch.device("cpu"))
    m.set_displacement_targets(per_row)
    theta = {k: v.detach() for k, v in reader.params(reader.tau).items()}
    g = per_group_grads(_model(), theta, syn.images, syn.targets, torch.ones(6, 3), "loop")
    err = sum((a + b).reshape(6, -1).pow(2).sum(1) for a, b in zip(g, m.targets)) / m.target_norm2
    np.testing.assert_allclose(err.numpy(), syn.final_loss, rtol=1e-4)
    part = distill_groups(_model(), reader, x, y, groups, cls, dcfg, 0, torch.device("cpu"), show_progress=False,
                          group_ids=torch.tensor([2, 3]), per_row=per_row)
    assert torch.equal(part.images, syn.images[2:4])


@pytest.mark.parametrize("attribute", [{"finetune_scale": "matched"}, {"finetune_steps": 3},
                                       {"finetune_scale": "matched", "finetune_steps": 1},
                                       {"finetune_scale": "uniform", "finetune_steps": 3}])
def test_displacement_synsets_need_one_unweighted_step(attribute):
    cfg = Config.from_dict({"distill": {"target": "displacement", "tensor_weights": "none"}, "attribute": attribute})
    with pytest.raises(ConfigError, match="pass --finetune-scale auto --finetune-steps 0 \\(or uniform and 1\\)"):
        check(cfg)
    for ok in ({}, {"finetune_scale": "uniform", "finetune_steps": 1}, {"finetune_scale": "auto", "finetune_steps": 1},
               {"finetune_scale": "uniform"}):  # auto and 0 resolve to one unweighted step for fixed targets
        check(Config.from_dict({"distill": {"target": "displacement", "tensor_weights": "none"}, "attribute": ok}))


def test_displacement_needs_reverse_matching():
    with pytest.raises(ConfigError, match="--method ddm"):
        DistillConfig(target="displacement", tensor_weights="none", method="ddm-match")


def test_displacement_options_leave_existing_stage_keys_alone():
    from ddm_hpc.config import _key_dict
    pairs = DistillConfig(**PAIRS_DISTILL)  # the former defaults: what runs made before these options had
    assert "target" not in _key_dict(pairs) and "optimizer" not in _key_dict(pairs)
    assert _key_dict(DistillConfig(target="displacement", tensor_weights="none"))["target"] == "displacement"


def test_paper_preset_is_the_papers_method():
    """``--preset paper`` pins Table 5's MNIST row, Algorithm 1's pairing, random |P| = K, uniform weights."""
    from ddm_hpc.config import PRESETS, merge
    cfg = Config.from_dict(merge(Config().to_dict(), PRESETS["paper"]()))
    check(cfg)  # a consistent set of options
    assert (cfg.train.lr, cfg.distill.resolved_pairing(), cfg.distill.step_length) == (0.001, "alg1", 4)
    assert (cfg.attribute.perturbation, cfg.attribute.perturbation_count(100), cfg.attribute.finetune_scale) == (
        "random", 100, "uniform")
    assert (cfg.distill.target, cfg.distill.syn_labels, cfg.distill.ipc) == ("pairs", "hard", 1)


def test_paper_row_is_the_papers_method_whatever_the_run():
    """``ddm-paper`` (a default evaluate row) distils and attributes as ``--preset paper`` does, on this run's
    trajectory, even when the run itself uses displacement matching, learned labels and other fine-tune options."""
    from ddm_hpc.config import DEFAULT_METHODS, PRESETS, merge
    from ddm_hpc.methods import REGISTRY
    from ddm_hpc.variants import paper_method
    run = Config.from_dict(merge(Config().to_dict(), {
        "train": {"epochs": 7, "lr": 0.05},
        "distill": {"target": "displacement", "tensor_weights": "none", "syn_labels": "learn", "ipc": 10,
                    "optimizer": "adam", "distill_steps": 3, "pairing": "reverse"},
        "attribute": {"finetune_scale": "uniform", "finetune_steps": 1, "n_queries": 7, "beta": "uniform"},
        "runtime": {"out": "/tmp/somewhere"}}))
    assert {"ddm-paper", "ddm-disp"} <= set(DEFAULT_METHODS.split(",")) and "ddm-paper" in REGISTRY
    v = paper_method().config(run)
    paper = Config.from_dict(merge(Config().to_dict(), PRESETS["paper"]()))
    check(v)
    assert (v.distill.method, v.distill.target, v.distill.syn_labels, v.distill.ipc, v.distill.optimizer) == (
        "ddm", "pairs", "hard", 1, "sgd")
    assert (v.distill.resolved_pairing(), v.distill.step_length, v.distill.distill_steps, v.distill.lr_img) == (
        "alg1", 4, paper.distill.distill_steps, paper.distill.lr_img)
    a = v.attribute
    assert (a.perturbation, a.perturbation_count(50), a.finetune_scale, a.finetune_steps, a.beta) == (
        "random", 50, "uniform", 0, paper.attribute.beta)
    assert (v.train, a.n_queries, v.distill.levels, a.search) == (run.train, 7, "cluster", "flat")  # this run's
    assert v.runtime.out == "/tmp/somewhere/variants/ddm-paper"


def _rated_synsets(layer_rates: bool = True):
    x, y, groups = _data()
    tcfg = TrainConfig(epochs=3, batch_size=30, lr=0.05)
    reader = _trajectory(x, y, tcfg)
    dcfg = DistillConfig(target="displacement", tensor_weights="none", syn_labels="learn", ipc=3, optimizer="adam",
                         lr_img=0.05, lr_label=0.3, distill_steps=10, batch_real=16, group_chunk=2,
                         layer_rates=layer_rates)
    per_row = contribution_per_row(tcfg, reader.tau)
    syn = distill_groups(_model(), reader, x, y, groups, torch.tensor([0, 1, 2, 0, 1, 2]), dcfg, 0,
                         torch.device("cpu"), show_progress=False, per_row=per_row)
    m = Matcher(_model(), reader, x, y, groups, 6, dcfg, torch.device("cpu"))
    m.set_displacement_targets(per_row)
    theta = {k: v.detach() for k, v in reader.params(reader.tau).items()}
    g = per_group_grads(_model(), theta, syn.images, syn.targets, torch.ones(6, 3), "loop")
    return syn, m, theta, g, tcfg


def test_layer_rates_are_the_best_rate_of_each_tensor():
    """``--layer-rates``: the images are those of the plain displacement matching (same steps, same loss); each
    tensor's stored rate minimises |a_l g_l + T_l|^2 (checked against rates moved either way), and the reported
    final loss is the relative L2 left at those rates, recomputed here, below the rate-1 loss."""
    syn, m, theta, g, _ = _rated_synsets()
    plain = _rated_synsets(layer_rates=False)[0]
    assert torch.equal(plain.images, syn.images) and plain.layer_rates is None
    rates = torch.from_numpy(syn.layer_rates).double()
    assert rates.shape == (6, len(theta)) and (rates >= 0).all()

    def rel_l2(r):
        return sum((r[:, i].reshape(-1, *[1] * (a.dim() - 1)) * a.double() + t.double()).reshape(6, -1).pow(2).sum(1)
                   for i, (a, t) in enumerate(zip(g, m.targets))) / m.target_norm2.double()

    best = rel_l2(rates)
    np.testing.assert_allclose(best.numpy(), syn.final_loss, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(rel_l2(torch.ones_like(rates)).numpy(), plain.final_loss, rtol=1e-4, atol=1e-6)
    assert (torch.from_numpy(syn.final_loss) < torch.from_numpy(plain.final_loss)).all()
    for i in range(rates.shape[1]):
        for d in (0.9, 1.1):
            moved = rates.clone()
            moved[:, i] *= d
            assert (rel_l2(moved) >= best - 1e-12).all()


def test_one_step_with_layer_rates_is_the_scaled_sum_of_the_synset_steps():
    """The online step of ``--layer-rates`` synsets: at rates 1 it is one step of ``finetune_many``; at the
    stored rates, theta_tau - lr sum_k w_mk a_kl grad_l L(theta_tau; S_k), recomputed from the synsets' gradients,
    for one removed group per model (loo) and for several."""
    from torch.func import functional_call
    from ddm_hpc.unlearn import finetune_many, removal_spec, step_with_rates
    syn, _, theta, g, tcfg = _rated_synsets()
    model, names = _model(), tuple(theta)
    eval_x = _data()[0][:11]
    pert = torch.ones(8, 6)
    pert[torch.arange(6), torch.arange(6)] = 0  # loo
    pert[6, :3] = 0
    pert[7] = 0  # everything removed
    removed = (pert == 0).float() * 2.0
    ones = torch.ones(6, len(names))
    got = step_with_rates(model, theta, syn.images, syn.targets, removed, ones, names, tcfg.lr, 1.0, eval_x, 3,
                          torch.device("cpu"), show_progress=False)
    spec = removal_spec(pert, 3, torch.full((6,), 2.0))
    want = finetune_many(model, theta, syn.images.reshape(-1, 1, 8, 8), syn.targets.reshape(18, -1), spec, 1,
                         tcfg.lr, 1.0, eval_x, 4, torch.device("cpu"), show_progress=False)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    rates = torch.from_numpy(syn.layer_rates)
    got = step_with_rates(model, theta, syn.images, syn.targets, removed, rates[:, [1, 0, *range(2, len(names))]],
                          (names[1], names[0], *names[2:]), tcfg.lr, 1.0, eval_x, 5, torch.device("cpu"),
                          show_progress=False)  # columns in another order than the model's: read by name
    for m in range(8):
        p = {n: theta[n] - tcfg.lr * sum(removed[m, k] * rates[k, i] * g[i][k] for k in range(6))
             for i, n in enumerate(names)}
        torch.testing.assert_close(got[m], functional_call(model, p, (eval_x,)).softmax(-1), rtol=1e-4, atol=1e-6)


def test_layer_rates_need_the_displacement_target():
    with pytest.raises(ConfigError, match="--layer-rates .* --target displacement or influence, or --no-layer-rates"):
        DistillConfig(target="pairs", layer_rates=True)
    from ddm_hpc.config import _key_dict
    assert "layer_rates" not in _key_dict(DistillConfig(target="displacement", tensor_weights="none", layer_rates=False))
    assert _key_dict(DistillConfig(target="displacement", tensor_weights="none"))["layer_rates"] is True  # default


def test_rated_synsets_refuse_more_than_one_step():
    """The rates make one step reproduce the target; several steps at them mean nothing, so the unlearner refuses."""
    from ddm_hpc.synsets import SynsetLevel
    from ddm_hpc.unlearn import Unlearner
    syn, _, theta, _, tcfg = _rated_synsets()
    level = SynsetLevel(syn.images, syn.labels, syn.group_class, torch.ones(6), torch.ones(6),
                        torch.from_numpy(syn.size), 1.0, syn.targets, torch.from_numpy(syn.layer_rates), tuple(theta))
    u = Unlearner(_model(), theta, 2, tcfg.lr, "uniform", tcfg, 0, torch.device("cpu"), show_progress=False)
    with pytest.raises(ConfigError, match="one fine-tune step, not 2: pass --finetune-steps 1"):
        u.unlearn(level, torch.ones(1, 6), _data()[0][:4])
    one = dataclasses.replace(u, steps=1).unlearn(level, 1 - torch.eye(6)[:2], _data()[0][:4])  # loo of groups 0, 1
    assert one.shape == (2, 4, 3)


def test_contraction_factor_is_each_tensors_least_squares_scale():
    """``fit_contraction``: per tensor, the scale c minimising sum_j |dtheta_j - c P_j|^2 with P_j the removed
    clusters' summed steps (checked against a least-squares solve and against c moved either way), clipped to
    [0, 1] (a tensor pointing against its changes gets 0, one the training amplifies gets 1)."""
    from ddm_hpc.distill import contraction_subsets, fit_contraction
    g = torch.Generator().manual_seed(3)
    k, m = 6, 3
    steps = [torch.randn(k, 4, 2, generator=g), torch.randn(k, 5, generator=g), torch.randn(k, 3, generator=g),
             torch.randn(k, 2, generator=g)]
    kept = contraction_subsets(k, m, seed=0)
    assert kept.shape == (m, k) and kept.any(1).all() and (~kept).any(1).all()
    assert torch.equal(kept, contraction_subsets(k, m, seed=0)) and not torch.equal(kept, contraction_subsets(k, m, 1))
    assert torch.equal(contraction_subsets(k, 2, seed=0), kept[:2])  # subset j is its own stream
    true = [0.3, 0.05, -0.4, 2.0]
    removed = (~kept).double()
    moves = torch.cat([c * (removed @ s.reshape(k, -1).double()) + 0.01 * torch.randn(m, s[0].numel(), generator=g,
                                                                                     dtype=torch.float64)
                       for c, s in zip(true, steps)], 1)
    got = fit_contraction(steps, moves, kept).double()
    p0 = 0
    for i, s in enumerate(steps):
        pred = (removed @ s.reshape(k, -1).double()).reshape(-1, 1)
        real = moves[:, p0:p0 + s[0].numel()].reshape(-1, 1)
        p0 += s[0].numel()
        want = float(torch.linalg.lstsq(pred, real).solution)
        assert float(got[i]) == pytest.approx(min(1.0, max(0.0, want)), rel=1e-5, abs=1e-7)
        if 0 < want < 1:
            def cost(c, real=real, pred=pred):
                return float(((real - c * pred) ** 2).sum())
            assert cost(float(got[i])) < min(cost(float(got[i]) * 0.95), cost(float(got[i]) * 1.05))
    assert got[0] == pytest.approx(0.3, abs=0.02) and got[2] == 0.0 and got[3] == 1.0
    with pytest.raises(ValueError, match="parameters"):
        fit_contraction(steps, moves[:, :-1], kept)


def test_contraction_needs_layer_rates_and_the_cluster_level():
    with pytest.raises(ConfigError, match="--contraction .* --layer-rates"):
        DistillConfig(target="displacement", tensor_weights="none", layer_rates=False, contraction=1)
    with pytest.raises(ConfigError, match="--contraction is fitted on the cluster synsets"):
        DistillConfig(target="displacement", tensor_weights="none", layer_rates=True, contraction=1, levels="class")
    with pytest.raises(ConfigError, match="number of retrainings"):
        DistillConfig(target="displacement", tensor_weights="none", layer_rates=True, contraction=-1)
    from ddm_hpc.config import _key_dict
    assert "contraction" not in _key_dict(DistillConfig(target="displacement", tensor_weights="none", layer_rates=True))


def _distil_rated(**opts):
    x, y, groups = _data()
    tcfg = TrainConfig(epochs=3, batch_size=30, lr=0.05)
    reader = _trajectory(x, y, tcfg)
    dcfg = DistillConfig(**{"target": "displacement", "tensor_weights": "none", "syn_labels": "learn", "ipc": 3,
                            "optimizer": "adam", "lr_img": 0.05, "lr_label": 0.3, "distill_steps": 10, "batch_real": 16,
                            "group_chunk": 2, **opts})
    per_row = contribution_per_row(tcfg, reader.tau)
    syn = distill_groups(_model(), reader, x, y, groups, torch.tensor([0, 1, 2, 0, 1, 2]), dcfg, 0,
                         torch.device("cpu"), show_progress=False, per_row=per_row)
    m = Matcher(_model(), reader, x, y, groups, 6, dcfg, torch.device("cpu"))
    m.set_displacement_targets(per_row)
    return syn, m, reader


def test_signed_explained_counts_a_tensor_that_points_away_against_the_match():
    """``explained(signed=True)``: sum_l <-g_l, T_l> |<-g_l, T_l>| / |g_l|^2, recomputed here per tensor; equal to
    the clamped form where every dot is >= 0; a tensor pointing away counts negatively and still has a gradient
    (finite differences), where the clamped form's is 0."""
    from ddm_hpc.distill import explained
    g = torch.Generator().manual_seed(3)
    target = [torch.randn(2, 4, 3, generator=g, dtype=torch.float64), torch.randn(2, 5, generator=g, dtype=torch.float64)]
    syn = [-(t + 0.3 * torch.randn(t.shape, generator=g, dtype=torch.float64)) for t in target]  # pointing at it
    torch.testing.assert_close(explained(syn, target, signed=True), explained(syn, target))
    syn[1] = -syn[1]  # the second tensor points away from its target now
    d = -(syn[1] * target[1]).sum(1)
    assert (d < 0).all()
    want = explained([syn[0]], [target[0]]) - d.square() / syn[1].pow(2).sum(1)
    torch.testing.assert_close(explained(syn, target, signed=True), want)
    torch.testing.assert_close(explained(syn, target), explained([syn[0]], [target[0]]))  # clamped: counts 0
    s1 = syn[1].clone().requires_grad_(True)
    explained([syn[0], s1], target, signed=True).sum().backward()
    assert s1.grad.abs().max() > 0
    e, eps = torch.zeros_like(s1), 1e-6
    e[0, 2] = eps
    fd = (explained([syn[0], syn[1] + e], target, signed=True) - explained([syn[0], syn[1] - e], target, signed=True)
          ).sum() / (2 * eps)
    torch.testing.assert_close(s1.grad[0, 2], fd, rtol=1e-6, atol=1e-9)


def test_rated_matching_trains_on_the_residual_left_at_the_fitted_rates():
    """``--rated-matching``: each step's training loss is 1 - explained(signed) / |T_k|^2 (the first one recomputed
    here from the initial images, the rows' own init), not the rate-1 relative L2; the synsets' reported final
    loss is still the residual at the stored rates; and the images differ from the rate-1 matching's."""
    from ddm_hpc.distill import explained, init_images
    from ddm_hpc.utils import generator
    syn, m, reader = _distil_rated(rated_matching=True)
    plain = _distil_rated()[0]
    assert not torch.equal(syn.images, plain.images)
    x, _, _ = _data()
    init = torch.stack(init_images(x, m.members, m.sizes, 3, "real", [generator(0, 21, k) for k in range(6)]))
    theta = {k: v.detach() for k, v in reader.params(reader.tau).items()}
    # labels at the first step: the learned logits' init, q(class) = 0.9
    q = torch.full((6, 3, 3), 0.05)
    q[torch.arange(6)[:, None], torch.arange(3)[None, :], torch.tensor([0, 1, 2, 0, 1, 2])[:, None]] = 0.9
    g0 = per_group_grads(_model(), theta, init, q, torch.ones(6, 3), "loop")
    first = 1 - explained(g0, m.targets, signed=True) / m.target_norm2
    np.testing.assert_allclose(syn.group_history[:, 0], first.numpy(), rtol=1e-4, atol=1e-6)
    g = per_group_grads(_model(), theta, syn.images, syn.targets, torch.ones(6, 3), "loop")
    np.testing.assert_allclose(syn.final_loss, (1 - explained(g, m.targets) / m.target_norm2).numpy(), rtol=1e-4,
                               atol=1e-6)


def test_cosine_schedule_decays_the_synset_rates_to_zero(monkeypatch):
    """``--lr-schedule cosine``: step t of N updates at lr_0 (1 + cos(pi t / N)) / 2, for the images and the label
    logits alike (rates recorded at each optimizer step); constant keeps lr_0; one cosine step is the constant
    run's, bit for bit."""
    import math
    seen = []
    step = torch.optim.Adam.step

    def record(self, *a, **k):
        seen.append([grp["lr"] for grp in self.param_groups])
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", record)
    cos = _distil_rated(lr_schedule="cosine")[0]
    want = [[lr * (1 + math.cos(math.pi * t / 10)) / 2 for lr in (0.05, 0.3)] for t in range(10)]
    np.testing.assert_allclose(np.array(seen), np.array(want), rtol=1e-12)
    seen.clear()
    const = _distil_rated()[0]
    assert seen == [[0.05, 0.3]] * 10 and not torch.equal(cos.images, const.images)
    assert torch.equal(_distil_rated(lr_schedule="cosine", distill_steps=1)[0].images,
                       _distil_rated(distill_steps=1)[0].images)


def test_rated_matching_and_schedule_options_are_checked_and_stay_out_of_existing_keys():
    from ddm_hpc.config import _key_dict
    with pytest.raises(ConfigError, match="--rated-matching .* pass --layer-rates"):
        DistillConfig(target="influence", layer_rates=False, rated_matching=True)
    with pytest.raises(ConfigError, match="--lr-schedule must be one of constant, cosine"):
        DistillConfig(lr_schedule="linear")
    key = _key_dict(DistillConfig())
    assert "rated_matching" not in key and "lr_schedule" not in key
    assert _key_dict(DistillConfig(rated_matching=True, lr_schedule="cosine"))["lr_schedule"] == "cosine"
