"""Stage ``cluster``: split each class's training data into C groups (K = L x C in all).

Features come from the trained target's penultimate layer (default), raw pixels, or a user
module. k-means runs per class with FAISS (on GPU when faiss has GPU support and CUDA is
present), seeded. Cluster ids are class-major: clusters of class l are contiguous.

Artifact ``clusters.h5``:
  clusters/assignment int64 [N_train]  cluster id of each training row
  clusters/class      int64 [K]        class of each cluster
  clusters/size       int64 [K]
  clusters/centroids  float32 [K, D]   (in the feature space; zeros for 'sequential')
  attrs: clusters_per_class (requested), K, feature_dim + provenance
"""
from __future__ import annotations

import importlib
import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ddm_hpc.config import Config
from ddm_hpc.data import DatasetBundle
from ddm_hpc.errors import ConfigError
from ddm_hpc.models import penultimate_features
from ddm_hpc.storage import artifact_path, atomic_h5, open_read, write_provenance
from ddm_hpc.train import TrajectoryReader, build_target, load_data, load_into
from ddm_hpc.utils import progress, resolve_device

log = logging.getLogger(__name__)


def load_feature_module(spec: str) -> nn.Module:
    """'package.module:function' -> the nn.Module the function returns."""
    if ":" not in spec:
        raise ConfigError(f"--features {spec!r}: use penultimate, pixels, or module:function returning an nn.Module")
    mod_name, fn_name = spec.split(":", 1)
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"--features {spec!r} cannot be loaded ({e}): check the module path and function name") from None
    module = fn()
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


def kmeans(features: np.ndarray, k: int, seed: int, niter: int, use_gpu: bool) -> tuple[np.ndarray, np.ndarray]:
    """FAISS k-means: (assignment int64 [n], centroids float32 [k, D]); no cluster left empty."""
    import faiss

    feats = np.ascontiguousarray(features, dtype=np.float32)
    n, d = feats.shape
    if k == 1:
        return np.zeros(n, dtype=np.int64), feats.mean(0, keepdims=True)
    km = faiss.Kmeans(d, k, niter=niter, seed=seed, gpu=use_gpu, verbose=False,
                      min_points_per_centroid=1, max_points_per_centroid=1 << 30)
    km.train(feats)
    _, assign = km.index.search(feats, 1)
    assign = assign[:, 0].astype(np.int64)
    return fill_empty(feats, assign, km.centroids.copy(), k), km.centroids.copy()


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
    """Cluster each class separately.

    Returns:
        assignment int64 [N] (global cluster ids, class-major), cluster_class int64 [K],
        centroids float32 [K, D].
    """
    assignment = np.full(len(labels), -1, dtype=np.int64)
    cls_of, cents = [], []
    for c in progress(range(num_classes), "cluster", show_progress):
        rows = np.flatnonzero(labels == c)
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
            local, cent = kmeans(features[rows], k, seed + c, niter, use_gpu)
        else:
            local, cent = sequential(len(rows), k), np.zeros((k, features.shape[1]), dtype=np.float32)
        assignment[rows] = local + len(cls_of)
        cls_of += [c] * k
        cents.append(cent)
    return assignment, np.array(cls_of, dtype=np.int64), np.concatenate(cents).astype(np.float32)


def faiss_has_gpu() -> bool:
    try:
        import faiss

        return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    except Exception:  # faiss missing or built without GPU
        return False


def run_cluster(cfg: Config, bundle: DatasetBundle | None = None) -> Path:
    """Run the stage and write ``clusters.h5``; returns its path."""
    t0 = time.perf_counter()
    device = resolve_device(cfg.runtime.device)
    bundle = bundle or load_data(cfg)
    cc = cfg.cluster
    penultimate = True
    if cc.features == "pixels" or cc.cluster_method == "sequential":
        extractor = None
    elif cc.features == "penultimate":
        reader = TrajectoryReader(artifact_path(cfg.runtime.out, "train"))
        extractor = load_into(build_target(cfg, bundle), reader.table, reader.flat(reader.tau))
    else:
        extractor, penultimate = load_feature_module(cc.features), False
    feats = embed(bundle.x_train, extractor, device, penultimate=penultimate)
    use_gpu = device.type == "cuda" and faiss_has_gpu()
    assignment, cls_of, cents = cluster_per_class(
        feats, bundle.y_train.numpy(), bundle.num_classes, cc.clusters_per_class, cc.cluster_method, cfg.seed,
        cc.kmeans_iters, cc.small_class, use_gpu, cfg.runtime.progress)
    sizes = np.bincount(assignment, minlength=len(cls_of))
    path = artifact_path(cfg.runtime.out, "cluster")
    with atomic_h5(path) as f:
        g = f.create_group("clusters")
        g.create_dataset("assignment", data=assignment)
        g.create_dataset("class", data=cls_of)
        g.create_dataset("size", data=sizes.astype(np.int64))
        g.create_dataset("centroids", data=cents)
        f.attrs["clusters_per_class"] = cc.clusters_per_class
        f.attrs["K"] = len(cls_of)
        f.attrs["feature_dim"] = feats.shape[1]
        f.attrs["faiss_gpu"] = use_gpu
        write_provenance(f, cfg, "cluster", time.perf_counter() - t0)
    log.info("cluster: K=%d clusters (sizes %d..%d) in %.1f s -> %s", len(cls_of), sizes.min(), sizes.max(),
             time.perf_counter() - t0, path)
    return path


def read_clusters(run_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(assignment int64 [N], cluster_class int64 [K]) from ``clusters.h5``."""
    with open_read(artifact_path(run_dir, "cluster")) as f:
        return f["clusters/assignment"][()], f["clusters/class"][()]
