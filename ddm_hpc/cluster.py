"""Stage ``cluster``: split each class's training data into C groups (K = L x C in all).

Features come from the trained target's penultimate layer (default), raw pixels, or a user
module. They are written batch by batch, in class order, to a scratch feature file
(``ddm_hpc.features``) and k-means reads them back one class at a time, so the stage never
holds all N x D features. k-means runs per class with FAISS (on GPU when faiss has GPU support
and CUDA is present, one ``StandardGpuResources`` for all classes), seeded. Cluster ids are
class-major: clusters of class l are contiguous. ``--cluster-method global`` is one k-means over all
classes (:func:`kmeans_global_file`, K = L x C) instead: a cluster may then mix classes; it belongs to
its majority class (the label of its synthetic images and the class the hierarchical search files it
under), empty clusters are dropped and the rest renumbered class-major (:func:`class_major`).

Artifact ``clusters.h5``:
  clusters/assignment int64 [N_train]  cluster id of each training row
  clusters/class      int64 [K]        class of each cluster
  clusters/size       int64 [K]
  clusters/centroids  float32 [K, D]   (in the feature space; zeros for 'sequential')
  attrs: clusters_per_class (requested), K, feature_dim + provenance

Room: a stage (imports ``config``, ``context``, ``data``, ``features``, ``models``, ``storage``). faiss is
imported where k-means runs (deferred: a heavy native library that logs every CPU feature it probes).
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ddm_hpc.config import Config
from ddm_hpc.context import RunContext
from ddm_hpc.data import DatasetBundle, TensorStream
from ddm_hpc.errors import ConfigError
from ddm_hpc.features import FeatureFile, extract_features
from ddm_hpc.models import penultimate_features
from ddm_hpc.storage import artifact_path, atomic_h5, create_dataset, open_read, read_attrs, write_provenance
from ddm_hpc.utils import import_object, progress

log = logging.getLogger(__name__)


def load_feature_module(spec: str) -> nn.Module:
    """'package.module:function' -> the nn.Module the function returns."""
    if ":" not in spec:
        raise ConfigError(f"--features {spec!r}: use penultimate, pixels, or module:function returning an nn.Module")
    module = import_object(spec, "--features")()
    if not isinstance(module, nn.Module):
        raise ConfigError(f"--features {spec!r} returned {type(module).__name__}, not an nn.Module")
    return module


@torch.no_grad()
def embed(x: torch.Tensor, extractor: nn.Module | None, device: torch.device, batch: int = 1024,
          penultimate: bool = True) -> np.ndarray:
    """Features float32 [N, D]: penultimate layer of ``extractor``, its output, or pixels if None."""
    if extractor is None:
        return x.reshape(len(x), -1).numpy().astype(np.float32)
    extractor.to(device).eval()
    out = []
    for i in range(0, len(x), batch):
        xb = x[i:i + batch].to(device)
        f = penultimate_features(extractor, xb) if penultimate else extractor(xb)
        out.append(f.reshape(len(xb), -1).float().cpu())
    return torch.cat(out).numpy()


class KMeansRunner:
    """FAISS k-means, seeded, with one ``StandardGpuResources`` reused for every call on GPU.

    ``faiss.Kmeans(gpu=True)`` allocates fresh GPU resources (cuBLAS handle, scratch memory) on
    each ``train``; for 1000 per-class k-means that set-up dominates, so the index is built here
    on one shared resource object. On CPU this is the same computation as ``faiss.Kmeans``.
    """

    def __init__(self, use_gpu: bool = False, temp_memory_bytes: int | None = None) -> None:
        try:
            import faiss  # deferred: see the module docstring
        except ImportError:
            raise ConfigError("k-means needs FAISS, which is not installed: pip install -c constraints.txt -e .[cpu] "
                              "(or .[gpu] on a CUDA node)") from None

        self.faiss = faiss
        self.res = None
        if use_gpu:
            self.res = faiss.StandardGpuResources()
            if temp_memory_bytes is not None:
                self.res.setTempMemory(temp_memory_bytes)

    @property
    def gpu(self) -> bool:
        return self.res is not None

    def index(self, d: int):
        """An empty flat L2 index (on the shared GPU resources when on GPU)."""
        if self.res is not None:
            return self.faiss.GpuIndexFlatL2(self.res, d)
        return self.faiss.IndexFlatL2(d)

    def train(self, feats: np.ndarray, k: int, seed: int, niter: int, max_points_per_centroid: int = 1 << 30):
        """Run Lloyd iterations; returns (centroids float32 [k, D], index holding them)."""
        faiss = self.faiss
        cp = faiss.ClusteringParameters()
        cp.niter, cp.seed, cp.verbose = niter, seed, False
        cp.min_points_per_centroid, cp.max_points_per_centroid = 1, max_points_per_centroid
        clus = faiss.Clustering(feats.shape[1], k, cp)
        index = self.index(feats.shape[1])
        clus.train(feats, index)  # leaves the final centroids in the index
        return faiss.vector_float_to_array(clus.centroids).reshape(k, feats.shape[1]).copy(), index

    def fit(self, features: np.ndarray, k: int, seed: int, niter: int) -> tuple[np.ndarray, np.ndarray]:
        """(assignment int64 [n], centroids float32 [k, D]); no cluster left empty."""
        feats = np.ascontiguousarray(features, dtype=np.float32)
        n = len(feats)
        if k == 1:
            return np.zeros(n, dtype=np.int64), feats.mean(0, keepdims=True)
        centroids, index = self.train(feats, k, seed, niter)
        _, assign = index.search(feats, 1)
        return fill_empty(feats, assign[:, 0].astype(np.int64), centroids, k), centroids


def kmeans(features: np.ndarray, k: int, seed: int, niter: int, use_gpu: bool,
           runner: KMeansRunner | None = None) -> tuple[np.ndarray, np.ndarray]:
    """FAISS k-means: (assignment int64 [n], centroids float32 [k, D]); no cluster left empty."""
    return (runner or KMeansRunner(use_gpu)).fit(features, k, seed, niter)


def fill_empty(feats: np.ndarray, assign: np.ndarray, centroids: np.ndarray, k: int) -> np.ndarray:
    """Give each empty cluster the point nearest its centroid taken from a cluster with > 1 member."""
    assign = assign.copy()
    for c in range(k):
        if (assign == c).any():
            continue
        sizes = np.bincount(assign, minlength=k)
        donors = np.flatnonzero(sizes[assign] > 1)
        dist = ((feats[donors] - centroids[c]) ** 2).sum(1)
        assign[donors[int(dist.argmin())]] = c
    return assign


def sequential(n: int, k: int) -> np.ndarray:
    """Split n rows (in index order) into k contiguous, nearly equal groups ('DDM w/o cluster')."""
    return (np.arange(n) * k // max(n, 1)).astype(np.int64)


def cluster_per_class(features: np.ndarray, labels: np.ndarray, num_classes: int, per_class: int, method: str,
                      seed: int, niter: int, small_class: str, use_gpu: bool = False,
                      show_progress: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cluster each class separately, all features in memory (the reference for :func:`cluster_feature_file`).

    Returns:
        assignment int64 [N] (global cluster ids, class-major), cluster_class int64 [K],
        centroids float32 [K, D].
    """
    def get(c: int) -> tuple[np.ndarray, np.ndarray]:
        rows = np.flatnonzero(labels == c)
        return rows, features[rows]

    return _cluster_classes(get, len(labels), features.shape[1], num_classes, per_class, method, seed, niter,
                            small_class, use_gpu, show_progress)


def _cluster_classes(get, n: int, dim: int, num_classes: int, per_class: int, method: str, seed: int, niter: int,
                     small_class: str, use_gpu: bool, show_progress: bool
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class clustering over ``get(c) -> (source rows int64 [n_c], features float32 [n_c, D])``."""
    assignment = np.full(n, -1, dtype=np.int64)
    runner = KMeansRunner(use_gpu) if method == "kmeans" else None
    cls_of, cents = [], []
    for c in progress(range(num_classes), "cluster", show_progress):
        rows, feats = get(c)
        k = per_class
        if len(rows) < per_class:
            if small_class == "error" or len(rows) == 0:
                raise ConfigError(
                    f"class {c} has {len(rows)} training images, fewer than --clusters-per-class {per_class}: "
                    "lower --clusters-per-class, raise --n-train, or pass --small-class reduce")
            k = len(rows)
            log.warning("cluster: class %d has only %d images; using %d clusters instead of %d", c, len(rows), k,
                        per_class)
        if method == "kmeans":
            local, cent = runner.fit(feats, k, seed + c, niter)
        else:
            local, cent = sequential(len(rows), k), np.zeros((k, dim), dtype=np.float32)
        assignment[rows] = local + len(cls_of)
        cls_of += [c] * k
        cents.append(cent)
    return assignment, np.array(cls_of, dtype=np.int64), np.concatenate(cents).astype(np.float32)


def cluster_feature_file(ff: FeatureFile, per_class: int, method: str = "kmeans", seed: int = 0, niter: int = 25,
                         small_class: str = "error", use_gpu: bool = False, show_progress: bool = True
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`cluster_per_class` reading one class at a time from a feature file.

    Gives exactly the in-memory result for the same features (same per-class arrays, seeds and
    order); host memory holds one class's features, the assignment (8 bytes a row) and the
    centroids. On GPU all classes share one ``StandardGpuResources``.
    """
    def get(c: int) -> tuple[np.ndarray, np.ndarray]:
        sl = ff.class_slice(c)
        return ff.rows[sl], ff.class_features(c)

    return _cluster_classes(get, ff.n, ff.dim, ff.num_classes, per_class, method, seed, niter, small_class, use_gpu,
                            show_progress)


def kmeans_global_file(ff: FeatureFile, k: int, seed: int = 0, niter: int = 25, use_gpu: bool = False,
                       max_points_per_centroid: int = 256, show_progress: bool = True
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One k-means over all classes, trained on a seeded sample and assigned chunk by chunk.

    FAISS trains on at most ``max_points_per_centroid * k`` points anyway (its own default is
    256); the sample is drawn here, read from the file chunk by chunk, so host memory holds the
    sample (at most all N rows, i.e. 1x the feature file) and one chunk, never two copies.

    Returns:
        assignment int64 [N] by source row, cluster_class int64 [K] (the majority class of each
        cluster: clusters may mix classes), centroids float32 [K, D]. Clusters can end empty
        after the full assignment (FAISS only re-splits empties on the training sample).
    """
    if not 1 <= k <= ff.n:
        raise ConfigError(f"global k-means with k={k} needs 1 <= k <= {ff.n} (the number of feature rows)")
    m = min(ff.n, max_points_per_centroid * k)
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(ff.n, size=m, replace=False)) if m < ff.n else np.arange(ff.n)
    runner = KMeansRunner(use_gpu)
    train = ff.take(sample)
    centroids, index = runner.train(train, k, seed, niter, max_points_per_centroid=max(ff.n, 1))
    del train
    assignment = np.empty(ff.n, dtype=np.int64)
    for a, feats in progress(ff.chunks(), "assign", show_progress, total=-(-ff.n // ff.read_rows)):
        _, idx = index.search(np.ascontiguousarray(feats), 1)
        assignment[ff.rows[a:a + len(feats)]] = idx[:, 0]
    counts = np.zeros((k, ff.num_classes), dtype=np.int64)
    np.add.at(counts, (assignment[ff.rows], ff.labels), 1)
    return assignment, counts.argmax(1).astype(np.int64), centroids


def class_major(assignment: np.ndarray, cluster_class: np.ndarray, centroids: np.ndarray, num_classes: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Renumber global clusters class-major (by majority class, then old id) and drop empty ones.

    Returns (assignment int64 [N], cluster_class int64 [K'], centroids float32 [K', D]) with K' <= K.

    Raises:
        ConfigError: a class is the majority of no cluster (the hierarchical search needs one per class).
    """
    sizes = np.bincount(assignment, minlength=len(cluster_class))
    kept = np.flatnonzero(sizes > 0)
    kept = kept[np.lexsort((kept, cluster_class[kept]))]
    new_id = np.full(len(cluster_class), -1, dtype=np.int64)
    new_id[kept] = np.arange(len(kept))
    cls = cluster_class[kept].astype(np.int64)
    missing = sorted(set(range(num_classes)) - set(cls.tolist()))
    if missing:
        raise ConfigError(f"global k-means left class(es) {missing} without a cluster of their own majority: raise "
                          "--clusters-per-class or use --cluster-method kmeans (per class)")
    return new_id[assignment], cls, centroids[kept]


def kmeans_objective(ff_or_features: FeatureFile | np.ndarray, assignment: np.ndarray, centroids: np.ndarray,
                     rows: np.ndarray | None = None) -> float:
    """Sum of squared distances of each row to its assigned centroid, accumulated in float64 per chunk.

    Args:
        ff_or_features: a :class:`FeatureFile` (assignment is by its source rows) or float32 [N, D].
        assignment: int64 [N] cluster id per source row; centroids: float32 [K, D].
    """
    total = 0.0
    if isinstance(ff_or_features, FeatureFile):
        for a, feats in ff_or_features.chunks():
            c = centroids[assignment[ff_or_features.rows[a:a + len(feats)]]]
            total += float(((feats.astype(np.float64) - c) ** 2).sum())
        return total
    feats = ff_or_features
    for a in range(0, len(feats), 65536):
        f = feats[a:a + 65536].astype(np.float64)
        total += float(((f - centroids[assignment[a:a + 65536]]) ** 2).sum())
    return total


def faiss_has_gpu() -> bool:
    """Whether faiss was built with GPU support and sees a GPU."""
    try:
        import faiss  # deferred: see the module docstring

        return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    except Exception:  # faiss missing or built without GPU
        return False


def run(cfg: Config, bundle: DatasetBundle | None = None) -> Path:
    """Run the stage and write ``clusters.h5``; returns its path."""
    t0 = time.perf_counter()
    ctx = RunContext(cfg, bundle)
    bundle, device = ctx.bundle, ctx.device
    cc = cfg.cluster
    penultimate = True
    if cc.features == "pixels" or cc.cluster_method == "sequential":
        extractor = None
    elif cc.features == "penultimate":
        extractor = ctx.trained_model()
    else:
        extractor, penultimate = load_feature_module(cc.features), False
    use_gpu = device.type == "cuda" and faiss_has_gpu()
    # Features go to disk batch by batch (class-sorted) and come back one class at a time, so
    # the stage never holds all N x D features; the file is scratch, removed afterwards.
    feature_path = Path(cfg.runtime.out) / f".features.{os.getpid()}.h5"
    try:
        extract_features(TensorStream(bundle.x_train, bundle.y_train, bundle.num_classes), extractor, feature_path, device,
                         batch_size=1024, penultimate=penultimate, show_progress=cfg.runtime.progress)
        with FeatureFile(feature_path) as ff:
            feature_dim = ff.dim
            if cc.cluster_method == "global":  # one k-means over all classes: K = L x C clusters may mix classes
                assignment, cls_of, cents = class_major(*kmeans_global_file(
                    ff, cc.clusters_per_class * ff.num_classes, cfg.seed, cc.kmeans_iters, use_gpu,
                    show_progress=cfg.runtime.progress), ff.num_classes)
            else:
                assignment, cls_of, cents = cluster_feature_file(
                    ff, cc.clusters_per_class, cc.cluster_method, cfg.seed, cc.kmeans_iters, cc.small_class, use_gpu,
                    cfg.runtime.progress)
    finally:
        feature_path.unlink(missing_ok=True)
    sizes = np.bincount(assignment, minlength=len(cls_of))
    path = artifact_path(cfg.runtime.out, "cluster")
    with atomic_h5(path) as f:
        g = f.create_group("clusters")
        create_dataset(g, "assignment", data=assignment)
        create_dataset(g, "class", data=cls_of)
        create_dataset(g, "size", data=sizes.astype(np.int64))
        create_dataset(g, "centroids", data=cents)
        f.attrs["clusters_per_class"] = cc.clusters_per_class
        f.attrs["K"] = len(cls_of)
        f.attrs["feature_dim"] = feature_dim
        f.attrs["faiss_gpu"] = use_gpu
        write_provenance(f, cfg, "cluster", time.perf_counter() - t0)
    log.info("cluster: K=%d clusters (sizes %d..%d) in %.1f s -> %s", len(cls_of), sizes.min(), sizes.max(),
             time.perf_counter() - t0, path)
    return path


def read_clusters(run_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(assignment int64 [N], cluster_class int64 [K]) from ``clusters.h5``."""
    with open_read(artifact_path(run_dir, "cluster")) as f:
        return f["clusters/assignment"][()], f["clusters/class"][()]


def summary(run_dir: str | Path, n_show: int = 10) -> list[str]:
    """The ``ddm-hpc show`` line of ``clusters.h5``."""
    a = read_attrs(artifact_path(run_dir, "cluster"))
    if not a:
        return []
    with open_read(artifact_path(run_dir, "cluster")) as f:
        sizes = f["clusters/size"][()]
    return [f"  cluster    {a['seconds']:7.1f} s  K = {len(sizes)} clusters, {sizes.min()}..{sizes.max()} images each"]
