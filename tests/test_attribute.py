"""Attribute stage: WLS recovers planted effects, perturbations and their weights."""
from __future__ import annotations

import torch

from ddm_hpc.attribute import beta_weights, fit_wls, loo_perturbations, random_perturbations


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
