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


def test_class_major_renumbers_drops_empty_and_requires_every_class():
    from ddm_hpc.cluster import class_major

    assignment = np.array([3, 0, 3, 2, 0, 4, 4])  # cluster 1 is empty
    cluster_class = np.array([1, 1, 0, 1, 0])  # majority classes of clusters 0..4
    cents = np.arange(10, dtype=np.float32).reshape(5, 2)
    a, cls, c = class_major(assignment, cluster_class, cents, 2)
    # kept clusters in (class, old id) order: 2 (class 0), 4 (0), 0 (1), 3 (1); cluster 1 dropped
    assert cls.tolist() == [0, 0, 1, 1]
    assert a.tolist() == [3, 2, 3, 0, 2, 1, 1]
    np.testing.assert_array_equal(c, cents[[2, 4, 0, 3]])
    with pytest.raises(ConfigError, match="class\\(es\\) \\[2\\]"):
        class_major(np.array([0, 1]), np.array([0, 1]), cents[:2], 3)


def test_global_clusters_through_the_pipeline(tmp_path, mnist_root):
    """--cluster-method global: one k-means over all classes; clusters.h5 stays class-major by majority class
    and the later stages run on it."""
    import h5py

    from ddm_hpc.cli import main

    out = tmp_path / "g"
    assert main(["run", "--preset", "smoke", "--cluster-method", "global", "--distill-steps", "2",
                 "--data-root", str(mnist_root), "--out", str(out), "--no-progress"]) == 0
    with h5py.File(out / "clusters.h5") as f, h5py.File(out / "train.h5") as t:
        a, cls, size = f["clusters/assignment"][()], f["clusters/class"][()], f["clusters/size"][()]
        y = t["data/train_label"][()]
    assert (np.diff(cls) >= 0).all() and set(cls.tolist()) == set(range(10))  # class-major, every class
    assert (size > 0).all() and size.sum() == len(y) and np.array_equal(np.bincount(a, minlength=len(cls)), size)
    for k in range(len(cls)):  # each cluster filed under its majority class
        assert np.bincount(y[a == k], minlength=10).argmax() == cls[k]
    assert any(len(set(y[a == k].tolist())) > 1 for k in range(len(cls)))  # global clusters may mix classes
    with h5py.File(out / "attribution.h5") as f:
        assert f["scores"].shape[1] == len(cls)


def test_missing_faiss_names_the_extra(monkeypatch):
    """FAISS comes from setup.py's cpu or gpu extra: without it, k-means fails with the install line."""
    import sys

    from ddm_hpc.cluster import KMeansRunner

    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss -> ImportError
    with pytest.raises(ConfigError, match=r"pip install -c constraints.txt -e \.\[cpu\].*\.\[gpu\]"):
        KMeansRunner()
