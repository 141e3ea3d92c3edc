"""Metrics against exact retraining: the objectives, LDS and the paper's Eq. 10, on hand-computed cases."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ddm_hpc.errors import ConfigError
from ddm_hpc.metrics import (average_ranks, lds, located_clusters, located_metrics, objective_values, oracle_metrics,
                             predicted_subset_effect, random_subset_masks)


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


def test_random_subset_masks_keep_exactly_round_alpha_k():
    for k, alpha, n_keep in [(10, 0.5, 5), (7, 0.3, 2), (5, 0.5, 2), (9, 0.8, 7)]:
        m = random_subset_masks(k, 50, alpha, torch.Generator().manual_seed(1))
        assert m.dtype == torch.bool and m.shape == (50, k)
        assert (m.sum(1) == n_keep).all()
        assert (m.any(0)).all()  # every cluster is kept somewhere
    a = random_subset_masks(10, 20, gen=torch.Generator().manual_seed(4))
    assert torch.equal(a, random_subset_masks(10, 20, gen=torch.Generator().manual_seed(4)))
    assert not torch.equal(a, random_subset_masks(10, 20, gen=torch.Generator().manual_seed(5)))
    with pytest.raises(ConfigError, match="alpha"):
        random_subset_masks(4, 3, alpha=1.0)


def test_predicted_subset_effect_sums_kept_scores():
    scores = torch.tensor([[1.0, 2.0, 4.0], [-1.0, 0.5, 3.0]])
    masks = torch.tensor([[True, False, True], [False, True, False]])
    expected = torch.tensor([[5.0, 2.0], [2.0, 0.5]], dtype=torch.float64)
    torch.testing.assert_close(predicted_subset_effect(scores, masks), expected)


def test_lds_perfect_monotone_negated_and_random():
    g = torch.Generator().manual_seed(0)
    actual = torch.randn(200, 40, generator=g)
    assert lds(actual, actual) == pytest.approx(1.0)
    assert lds(torch.exp(3 * actual) + 7, actual) == pytest.approx(1.0)  # ranks only
    assert lds(-actual, actual) == pytest.approx(-1.0)
    noise = torch.randn(200, 40, generator=g)
    assert abs(lds(noise, actual)) < 0.15


def test_lds_ties_and_constant_columns():
    assert average_ranks(torch.tensor([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    pred = torch.tensor([[1.0, 0.0], [2.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    actual = torch.tensor([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0], [4.0, 5.0]])  # column 2 constant: skipped
    r = np.array([1.0, 2.5, 2.5, 4.0])
    assert lds(pred, actual) == pytest.approx(np.corrcoef(r, [1, 2, 3, 4])[0, 1])
    assert math.isnan(lds(pred[:, 1:], actual[:, 1:]))


# ----------------------------------------------------------------------------- Eq. 10 metrics
def _hand_example():
    """2 queries, 3 retrained clusters (ids 0, 2, 3 of K = 4; cluster 1 has no ground truth)."""
    base = torch.tensor([[0.5, 0.5], [0.2, 0.8]])
    labels = torch.tensor([0, 1])
    outputs = torch.tensor([
        [[0.5, 0.5], [0.2, 0.8]],  # without cluster 0: no change
        [[0.8, 0.2], [0.6, 0.4]],  # without cluster 2: L2 0.3*sqrt2, 0.4*sqrt2
        [[0.1, 0.9], [0.5, 0.5]],  # without cluster 3: L2 0.4*sqrt2, 0.3*sqrt2
    ])
    return base, labels, outputs, [0, 2, 3]


def test_located_metrics_match_a_hand_computation():
    base, labels, outputs, removed = _hand_example()
    # query 0 locates cluster 2, query 1 cluster 3; cluster 1's huge score is ignored (no ground truth)
    scores = torch.tensor([[0.0, 9.0, 1.0, 0.5], [0.0, 9.0, 0.2, 0.7]])
    assert located_clusters(scores, removed).tolist() == [1, 2]
    m = located_metrics(scores, outputs, removed, base, labels)
    s2 = math.sqrt(2)
    assert m["dist1"] == pytest.approx(100 * 0.3 * s2)
    assert m["dist2"] == pytest.approx((-math.log(0.8) - math.log(0.5)) / 2)
    assert m["dist3"] == pytest.approx(1 / (1 + 0.3 * s2))
    o = oracle_metrics(outputs, removed, base, labels)
    assert o["dist1"] == pytest.approx(100 * 0.4 * s2)
    assert o["dist2"] == pytest.approx((-math.log(0.1) - math.log(0.4)) / 2)
    assert o["dist3"] == pytest.approx(1.0)  # the unchanged model (cluster 0) for both queries


def test_located_metric_equals_oracle_when_scores_are_the_truth():
    g = torch.Generator().manual_seed(2)
    q, k, n_cls = 12, 10, 4
    removed = [1, 2, 4, 6, 7, 9]
    base = torch.randn(q, n_cls, generator=g).softmax(-1)
    outputs = torch.randn(len(removed), q, n_cls, generator=g).softmax(-1)
    labels = torch.randint(n_cls, (q,), generator=g)
    truth = (outputs - base).norm(dim=-1)  # [n_removed, Q] Dist1
    scores = torch.full((q, k), -1.0)
    scores[:, removed] = truth.T
    located = located_metrics(scores, outputs, removed, base, labels)
    oracle = oracle_metrics(outputs, removed, base, labels)
    assert located["dist1"] == pytest.approx(oracle["dist1"])
    # a wrong ranking (lowest Dist1 first) falls short of the oracle
    assert located_metrics(-scores, outputs, removed, base, labels)["dist1"] < oracle["dist1"] - 1.0
    with pytest.raises(ConfigError, match="no left-out"):
        located_metrics(scores, outputs[:0], [], base, labels)
