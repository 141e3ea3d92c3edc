"""Cluster stage: per-class clusters that cover every sample; small classes."""
from __future__ import annotations

import numpy as np
import pytest

from ddm_hpc.cluster import cluster_per_class, fill_empty, sequential
from ddm_hpc.errors import ConfigError


def _features(seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(4), 30)
    rng.shuffle(labels)
    feats = rng.normal(size=(len(labels), 6)).astype(np.float32)
    feats[:, 0] += 5 * labels  # classes far apart; clustering must still stay within a class
    return feats, labels


@pytest.mark.parametrize("method", ["kmeans", "sequential"])
def test_clusters_are_per_class_and_cover_every_sample(method):
    feats, labels = _features()
    assign, cls_of, cents = cluster_per_class(feats, labels, 4, 5, method, 0, 10, "error", show_progress=False)
    assert assign.shape == labels.shape and (assign >= 0).all()
    assert cls_of.tolist() == [c for c in range(4) for _ in range(5)]  # class-major ids, K = L x C
    assert cents.shape == (20, 6)
    sizes = np.bincount(assign, minlength=20)
    assert (sizes > 0).all() and sizes.sum() == len(labels)
    assert (cls_of[assign] == labels).all()  # each sample's cluster belongs to its class


def test_kmeans_is_seeded_and_groups_nearby_points():
    feats, labels = _features()
    a1, _, _ = cluster_per_class(feats, labels, 4, 3, "kmeans", 7, 10, "error", show_progress=False)
    a2, _, _ = cluster_per_class(feats, labels, 4, 3, "kmeans", 7, 10, "error", show_progress=False)
    assert (a1 == a2).all()
    # two well-separated blobs inside one class land in two different clusters
    rng = np.random.default_rng(0)
    blob = np.concatenate([rng.normal(0, 0.1, (20, 2)), rng.normal(10, 0.1, (20, 2))]).astype(np.float32)
    a, _, _ = cluster_per_class(blob, np.zeros(40, dtype=np.int64), 1, 2, "kmeans", 0, 10, "error",
                                show_progress=False)
    assert len(set(a[:20])) == 1 and len(set(a[20:])) == 1 and a[0] != a[20]


def test_small_class_error_and_reduce():
    feats, labels = _features()
    labels = labels.copy()
    labels[labels == 3] = 2
    labels[:2] = 3  # class 3 has 2 images
    with pytest.raises(ConfigError, match="class 3 has 2 training images.*--small-class reduce"):
        cluster_per_class(feats, labels, 4, 5, "kmeans", 0, 10, "error", show_progress=False)
    assign, cls_of, _ = cluster_per_class(feats, labels, 4, 5, "kmeans", 0, 10, "reduce", show_progress=False)
    assert (cls_of == 3).sum() == 2 and len(cls_of) == 17
    assert (np.bincount(assign, minlength=17) > 0).all()


def test_sequential_and_fill_empty():
    assert sequential(10, 3).tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    feats = np.array([[0.0], [0.1], [0.2], [5.0]], dtype=np.float32)
    assign = np.array([0, 0, 0, 0])
    fixed = fill_empty(feats, assign, np.array([[0.0], [5.0]], dtype=np.float32), 2)
    assert fixed.tolist() == [0, 0, 0, 1]
