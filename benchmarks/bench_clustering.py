"""Clustering at ImageNet scale: per-class and global FAISS k-means on chunked HDF5 features, vs scikit-learn.

Writes synthetic class-sorted features (each class a mixture of C Gaussian blobs) chunk by
chunk into a feature file, then clusters them the way the cluster stage does
(``cluster_feature_file``: one class read at a time; ``kmeans_global_file``: sampled training,
chunked assignment), reporting throughput (rows x iterations / s), the k-means objective
(sum of squared distances, the same function for every method) and the peak resident memory
above the start of each run as a multiple of the feature file's size. scikit-learn's KMeans
(n_init=1, Lloyd, the same iterations, tol=0) runs on a subset it can handle and FAISS is
re-run on that same subset, so the side-by-side rows compare like with like.

    python benchmarks/bench_clustering.py                # full: 1.28 M x 512, 1000 classes x 10 (GPU)
    python benchmarks/bench_clustering.py --quick        # CPU: 128 k x 128, 100 classes x 10

Needs scikit-learn for the comparison (``pip install -c constraints.txt -e .[bench]``).
"""
from __future__ import annotations

import argparse
import os
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ddm_hpc.cluster import cluster_feature_file, faiss_has_gpu, kmeans_global_file, kmeans_objective
from ddm_hpc.data import class_order
from ddm_hpc.features import FeatureFile, write_feature_file
from ddm_hpc.utils import PeakRSS


def synthetic_chunks(labels: np.ndarray, dim: int, blobs: int, seed: int, rows: int = 65536):
    """Class-sorted (rows, features) chunks: class c is a mixture of ``blobs`` unit Gaussians."""
    rng = np.random.default_rng(seed)
    order = class_order(labels)
    num_classes = int(labels.max()) + 1
    centers = np.random.default_rng(seed + 1).normal(0, 1.5, (num_classes, blobs, dim)).astype(np.float32)
    for a in range(0, len(order), rows):
        r = order[a:a + rows]
        c = labels[r]
        x = centers[c, rng.integers(0, blobs, len(r))] + rng.standard_normal((len(r), dim), dtype=np.float32)
        yield r, x


def sklearn_per_class(ff: FeatureFile, classes: range, k: int, niter: int, seed: int):
    """scikit-learn KMeans per class: (seconds, objective, rows)."""
    from sklearn.cluster import KMeans

    t, obj, n = 0.0, 0.0, 0
    for c in classes:
        x = ff.class_features(c)
        t0 = time.perf_counter()
        km = KMeans(k, init="random", n_init=1, max_iter=niter, tol=0.0, algorithm="lloyd",
                    random_state=seed + c).fit(x)
        t += time.perf_counter() - t0
        obj += kmeans_objective(x, km.labels_.astype(np.int64), km.cluster_centers_.astype(np.float32))
        n += len(x)
    return t, obj, n


def faiss_per_class_subset(ff: FeatureFile, classes: range, k: int, niter: int, seed: int, use_gpu: bool):
    """FAISS per class on the same classes as :func:`sklearn_per_class`."""
    from ddm_hpc.cluster import KMeansRunner

    runner = KMeansRunner(use_gpu)
    t, obj, n = 0.0, 0.0, 0
    for c in classes:
        x = ff.class_features(c)
        t0 = time.perf_counter()
        a, cent = runner.fit(x, k, seed + c, niter)
        t += time.perf_counter() - t0
        obj += kmeans_objective(x, a, cent)
        n += len(x)
    return t, obj, n


def run_one(path: str, mode: str, k: int, niter: int, seed: int, use_gpu: bool) -> dict:
    """One clustering from the file in this (fresh) process: seconds, objective, peak RSS increase."""
    from ddm_hpc.cluster import KMeansRunner

    with FeatureFile(path) as ff:
        KMeansRunner(use_gpu).fit(ff.class_features(0), 4, 0, 2)  # warm BLAS / GPU context before measuring
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            if mode == "class":
                assign, _, cents = cluster_feature_file(ff, k, "kmeans", seed, niter, use_gpu=use_gpu,
                                                        show_progress=False)
            else:
                assign, _, cents = kmeans_global_file(ff, k, seed, niter, use_gpu, show_progress=False)
            t = time.perf_counter() - t0
        return {"seconds": t, "objective": kmeans_objective(ff, assign, cents), "delta": mem.delta,
                "maxrss_delta": mem.maxrss_delta}


def in_fresh_process(path: Path, mode: str, k: int, args: argparse.Namespace, use_gpu: bool) -> dict:
    """:func:`run_one` in a new interpreter, so memory freed by earlier work cannot hide allocations."""
    cmd = [sys.executable, __file__, "--run-one", mode, str(path), str(k), str(args.niter), str(args.seed),
           "1" if use_gpu else "0"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"{mode} clustering failed: {out.stderr.strip().splitlines()[-1]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--run-one":
        mode, path, k, niter, seed, gpu = sys.argv[2:8]
        print(json.dumps(run_one(path, mode, int(k), int(niter), int(seed), gpu == "1")))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CPU size: 100 classes x 1280 rows x 128 dims")
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--per-class-rows", type=int, default=1280)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--clusters-per-class", type=int, default=10)
    ap.add_argument("--global-k", type=int, default=10000, help="k of the global k-means (0 = skip)")
    ap.add_argument("--niter", type=int, default=20)
    ap.add_argument("--sklearn-classes", type=int, default=20, help="classes clustered by both for the comparison")
    ap.add_argument("--sklearn-global-rows", type=int, default=20000)
    ap.add_argument("--sklearn-global-k", type=int, default=100)
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--workdir", default=None, help="where the feature file goes (default: a temp dir)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if os.environ.get("DDM_ARGCHECK"):  # benchmarks/gpu_suite.sh --check: the suite's flags parse; nothing runs
        print(f"{Path(__file__).name}: arguments ok")
        return
    if args.quick:
        args.classes, args.dim, args.global_k = 100, 128, 100
    use_gpu = args.device != "cpu" and faiss_has_gpu()
    if args.device == "cuda" and not use_gpu:
        raise SystemExit("--device cuda: faiss has no GPU support here (faiss-cpu, or no GPU); use --device cpu")
    try:
        import sklearn
    except ImportError:
        raise SystemExit("scikit-learn is missing: pip install -c constraints.txt scikit-learn") from None
    import faiss

    dev = torch.cuda.get_device_name(0) if use_gpu else f"CPU {platform.processor() or platform.machine()}"
    print(f"device: {dev}; faiss {faiss.__version__} ({'GPU' if use_gpu else 'CPU'}, {faiss.omp_get_max_threads()} "
          f"threads); scikit-learn {sklearn.__version__}; torch {torch.__version__}")
    labels = np.repeat(np.arange(args.classes), args.per_class_rows)
    n, d, k = len(labels), args.dim, args.clusters_per_class
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        path = Path(tmp) / "features.h5"
        t0 = time.perf_counter()
        write_feature_file(path, labels, d, synthetic_chunks(labels, d, k, args.seed), args.classes)
        t_write = time.perf_counter() - t0
        size = path.stat().st_size
        print(f"features: {n} x {d} float32, {args.classes} classes, file {size / 2**20:.0f} MiB written in "
              f"{t_write:.1f} s ({size / 2**20 / t_write:.0f} MiB/s)")
        with FeatureFile(path) as ff:
            print(f"\nper-class k-means, K = {args.classes} x {k}, {args.niter} iterations, from the file "
                  "(fresh process):")
            r = in_fresh_process(path, "class", k, args, use_gpu)
            print(f"  faiss   {r['seconds']:8.2f} s  {n * args.niter / r['seconds'] / 1e6:8.2f} M row-iter/s  "
                  f"objective/row {r['objective'] / n:.4f}  peak RSS +{r['delta'] / 2**20:.0f} MiB = "
                  f"{r['delta'] / size:.3f} x file")
            sub = range(min(args.sklearn_classes, args.classes))
            tf, of, nf = faiss_per_class_subset(ff, sub, k, args.niter, args.seed, use_gpu)
            ts, os_, ns = sklearn_per_class(ff, sub, k, args.niter, args.seed)
            print(f"  same {len(sub)} classes ({nf} rows), in memory:")
            print(f"    faiss   {tf:8.2f} s  {nf * args.niter / tf / 1e6:8.2f} M row-iter/s  objective/row {of / nf:.4f}")
            print(f"    sklearn {ts:8.2f} s  {ns * args.niter / ts / 1e6:8.2f} M row-iter/s  objective/row {os_ / ns:.4f}"
                  f"   faiss/sklearn speed {ts / tf:.2f}x, objective ratio {of / os_:.4f}")
            if args.global_k:
                gk = args.global_k
                m = min(n, 256 * gk)
                print(f"\nglobal k-means, k = {gk}, {args.niter} iterations on a {m}-row sample, all {n} rows "
                      "assigned, from the file (fresh process):")
                r = in_fresh_process(path, "global", gk, args, use_gpu)
                print(f"  faiss   {r['seconds']:8.2f} s  {m * args.niter / r['seconds'] / 1e6:8.2f} M row-iter/s "
                      f"(train rows)  objective/row {r['objective'] / n:.4f}  peak RSS +{r['delta'] / 2**20:.0f} MiB "
                      f"= {r['delta'] / size:.3f} x file")
                from sklearn.cluster import KMeans

                from ddm_hpc.cluster import KMeansRunner

                rows = np.sort(np.random.default_rng(args.seed).choice(n, min(n, args.sklearn_global_rows), replace=False))
                x = ff.take(rows)
                sk = args.sklearn_global_k
                t0 = time.perf_counter()
                fa, fc = KMeansRunner(use_gpu).fit(x, sk, args.seed, args.niter)
                tf = time.perf_counter() - t0
                t0 = time.perf_counter()
                km = KMeans(sk, init="random", n_init=1, max_iter=args.niter, tol=0.0, algorithm="lloyd",
                            random_state=args.seed).fit(x)
                ts = time.perf_counter() - t0
                of = kmeans_objective(x, fa, fc)
                os_ = kmeans_objective(x, km.labels_.astype(np.int64), km.cluster_centers_.astype(np.float32))
                print(f"  same {len(x)} rows, k = {sk}, in memory:")
                print(f"    faiss   {tf:8.2f} s  {len(x) * args.niter / tf / 1e6:8.2f} M row-iter/s  objective/row "
                      f"{of / len(x):.4f}")
                print(f"    sklearn {ts:8.2f} s  {len(x) * args.niter / ts / 1e6:8.2f} M row-iter/s  objective/row "
                      f"{os_ / len(x):.4f}   faiss/sklearn speed {ts / tf:.2f}x, objective ratio {of / os_:.4f}")


if __name__ == "__main__":
    main()
