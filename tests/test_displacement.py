"""Displacement matching (``--target displacement``): exact targets, what the matching reports, option checks."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ddm_hpc.attribute import check
from ddm_hpc.config import Config, DistillConfig, TrainConfig
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
    dcfg = DistillConfig(target="displacement", syn_labels="learn", ipc=3, optimizer="adam", lr_img=0.05,
                         lr_label=0.3, distill_steps=25, batch_real=16, group_chunk=2)
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


@pytest.mark.parametrize("attribute", [{}, {"finetune_steps": 1}, {"finetune_scale": "uniform"},
                                       {"finetune_scale": "uniform", "finetune_steps": 3}])
def test_displacement_synsets_need_one_unweighted_step(attribute):
    cfg = Config.from_dict({"distill": {"target": "displacement"}, "attribute": attribute})
    with pytest.raises(ConfigError, match="--finetune-scale uniform --finetune-steps 1"):
        check(cfg)
    check(Config.from_dict({"distill": {"target": "displacement"},
                            "attribute": {"finetune_scale": "uniform", "finetune_steps": 1}}))


def test_displacement_needs_reverse_matching():
    with pytest.raises(ConfigError, match="--method ddm"):
        DistillConfig(target="displacement", method="ddm-match")


def test_displacement_options_leave_existing_stage_keys_alone():
    from ddm_hpc.config import _key_dict
    assert "target" not in _key_dict(DistillConfig()) and "optimizer" not in _key_dict(DistillConfig())
    assert _key_dict(DistillConfig(target="displacement"))["target"] == "displacement"


def test_paper_preset_is_the_papers_method():
    """``--preset paper`` pins Table 5's MNIST row, Algorithm 1's pairing, random |P| = K, uniform weights."""
    from ddm_hpc.config import PRESETS, merge
    cfg = Config.from_dict(merge(Config().to_dict(), PRESETS["paper"]()))
    check(cfg)  # a consistent set of options
    assert (cfg.train.lr, cfg.distill.resolved_pairing(), cfg.distill.step_length) == (0.001, "alg1", 4)
    assert (cfg.attribute.perturbation, cfg.attribute.perturbation_count(100), cfg.attribute.finetune_scale) == (
        "random", 100, "uniform")
    assert (cfg.distill.target, cfg.distill.syn_labels, cfg.distill.ipc) == ("pairs", "hard", 1)
