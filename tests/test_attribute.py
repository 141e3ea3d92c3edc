"""Attribute stage: WLS recovers planted effects, batched fine-tuning equals a loop, objectives."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ddm_hpc.attribute import (FinetuneSpec, beta_weights, finetune_many, fit_wls, loo_perturbations,
                               group_weights, objective_values, random_perturbations, removal_spec)
from ddm_hpc.models import build_model


def test_wls_recovers_planted_effects_from_random_masks():
    g = torch.Generator().manual_seed(0)
    k, q = 12, 3
    a_true = torch.randn(q, k, generator=g, dtype=torch.float64)
    b_true = torch.randn(q, generator=g, dtype=torch.float64)
    p = random_perturbations(k, 60, 0.5, g)
    outcomes = b_true + (1 - p.double()) @ a_true.T
    beta = beta_weights(p, "inverse")
    a, b = fit_wls(p, outcomes, beta)
    torch.testing.assert_close(a, a_true, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(b, b_true, rtol=1e-8, atol=1e-8)


def test_wls_with_noise_is_close_and_weights_matter():
    g = torch.Generator().manual_seed(1)
    k = 8
    a_true = torch.randn(1, k, generator=g, dtype=torch.float64)
    p = random_perturbations(k, 400, 0.3, g)
    outcomes = 0.5 + (1 - p.double()) @ a_true.T + 0.01 * torch.randn(400, 1, generator=g, dtype=torch.float64)
    a, _ = fit_wls(p, outcomes, beta_weights(p, "uniform"))
    assert (a - a_true).abs().max() < 0.01
    # a weighted fit must differ from the unweighted one on noisy data (beta is really applied)
    a_w, _ = fit_wls(p, outcomes, beta_weights(p, "inverse"))
    assert not torch.allclose(a, a_w)


def test_loo_with_base_row_gives_direct_removal_effects():
    k = 5
    p = loo_perturbations(k)
    assert p.shape == (k, k) and (p.sum(1) == k - 1).all()
    outcomes = torch.tensor([[0.3], [0.1], [0.7], [0.2], [0.05]], dtype=torch.float64)
    base = torch.tensor([0.02], dtype=torch.float64)
    a, b = fit_wls(p, outcomes, beta_weights(p, "inverse"), base)
    torch.testing.assert_close(a[0], outcomes[:, 0] - base[0])
    torch.testing.assert_close(b, base)


def test_beta_weights():
    p = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0]], dtype=torch.uint8)
    torch.testing.assert_close(beta_weights(p, "inverse"), torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64))
    torch.testing.assert_close(beta_weights(p, "uniform"), torch.ones(3, dtype=torch.float64))
    shap = beta_weights(p, "shap")
    # Shapley kernel (K-1)/(C(K,z) z (K-z)), K=4: z=1 -> 3/12, z=2 -> 3/24; z=K gets the max finite weight
    torch.testing.assert_close(shap, torch.tensor([1.0, 0.5, 1.0], dtype=torch.float64))


def test_random_perturbations_remove_at_least_one():
    p = random_perturbations(6, 200, 0.05, torch.Generator().manual_seed(0))
    assert ((p == 0).sum(1) >= 1).all()
    assert set(p.unique().tolist()) <= {0, 1}


def test_removal_spec():
    p = torch.tensor([[1, 0, 1, 0], [0, 1, 1, 1]], dtype=torch.uint8)
    spec = removal_spec(p, ipc=2, group_weight=torch.tensor([4.0, 1.0, 1.0, 2.0]))
    assert spec.rows.shape == (2, 4)
    # each removed group adds weight * mean over its ipc images
    assert spec.rows[0].tolist() == [2, 3, 6, 7] and spec.weights[0].tolist() == [0.5, 0.5, 1.0, 1.0]
    assert spec.rows[1, :2].tolist() == [0, 1] and spec.weights[1].tolist() == [2.0, 2.0, 0, 0]


def test_matched_group_weights_follow_eq2():
    from ddm_hpc.distill import SynsetLevel

    level = SynsetLevel(torch.zeros(2, 1, 1, 2, 2), torch.zeros(2, 1, dtype=torch.long), torch.zeros(2),
                        torch.tensor([2.0, 1.0]), torch.tensor([4.0, 4.0]), torch.tensor([32, 64]), 1.0)
    w = group_weights(level, "matched", train_lr=0.01, momentum=0.9, batch_size=64, finetune_lr=0.01)
    # (0.01 / 0.1) / 0.01 * n/B * |real|/|syn| = 10 * [0.5, 1] * [0.5, 0.25]
    torch.testing.assert_close(w, torch.tensor([2.5, 2.5]))
    assert group_weights(level, "uniform", 0.01, 0.9, 64, 0.01).tolist() == [1.0, 1.0]


@pytest.mark.parametrize("direction", [1.0, -1.0])
def test_batched_finetune_equals_loop(direction):
    torch.manual_seed(0)
    model = build_model("convnet", 1, 3, (8, 8), width=4, depth=2)
    theta = {k: v.detach().clone() for k, v in model.named_parameters()}
    g = torch.Generator().manual_seed(1)
    syn_x = torch.randn(6, 1, 8, 8, generator=g)
    syn_y = torch.randint(0, 3, (6,), generator=g)
    eval_x = torch.randn(5, 1, 8, 8, generator=g)
    spec = FinetuneSpec(torch.tensor([[0, 3, 0], [1, 2, 5]]), torch.tensor([[0.5, 2.0, 0.0], [1.0, 0.3, 1.0]]))
    steps, lr = 3, 0.1
    got = finetune_many(model, theta, syn_x, syn_y, spec, steps, lr, direction, eval_x, chunk=1,
                        device=torch.device("cpu"), show_progress=False)
    for m in range(2):
        ref = build_model("convnet", 1, 3, (8, 8), width=4, depth=2)
        ref.load_state_dict(theta)
        opt = torch.optim.SGD(ref.parameters(), lr=lr)
        keep = spec.weights[m] > 0
        xb, yb, wb = syn_x[spec.rows[m][keep]], syn_y[spec.rows[m][keep]], spec.weights[m][keep]
        for _ in range(steps):
            opt.zero_grad()
            (direction * (F.cross_entropy(ref(xb), yb, reduction="none") * wb).sum()).backward()
            opt.step()
        with torch.no_grad():
            want = ref(eval_x).softmax(-1)
        torch.testing.assert_close(got[m], want, rtol=1e-4, atol=1e-5)
    # the models really moved, and the chunk size does not change the answer
    assert not torch.allclose(got[0], got[1])
    again = finetune_many(model, theta, syn_x, syn_y, spec, steps, lr, direction, eval_x, chunk=2,
                          device=torch.device("cpu"), show_progress=False)
    torch.testing.assert_close(again, got, rtol=1e-5, atol=1e-6)


def test_objective_values_match_definitions():
    probs = torch.tensor([[[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]])  # one model, two queries
    base = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    labels = torch.tensor([0, 1])
    o = objective_values(probs, base, labels, "single")
    d1 = [math.sqrt(0.01 + 0.01), math.sqrt(0.01 + 0.01 + 0.04)]
    torch.testing.assert_close(o["dist1"][0], torch.tensor(d1))
    torch.testing.assert_close(o["dist2"][0], torch.tensor([-math.log(0.7), -math.log(0.1)]))
    torch.testing.assert_close(o["dist3"][0], 1 / (1 + torch.tensor(d1)))
    ob = objective_values(probs, base, labels, "batch")
    torch.testing.assert_close(ob["dist1"], torch.tensor([[sum(d1) / 2]]))
