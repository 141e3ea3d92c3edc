"""Speedup of DDM attribution over exact leave-cluster-out retraining, measured in one run.

On one machine and in one process: train the target, cluster, distill (offline), attribute
(online: K leave-one-out fine-tunings), then retrain the target exactly without each of the K
clusters (the ground truth DDM approximates). Prints the wall times, the ratios

    exact K retrainings / DDM online          (a user who has the synsets already)
    exact K retrainings / DDM offline + online (a user starting from the trained model)

and what the speed buys: the exact Dist1 (x100) of the cluster DDM locates per query against the
oracle and the mean over clusters, and the per-query Spearman correlation between DDM's Dist1
scores and the exact Dist1 of each removal.

    python benchmarks/speedup_vs_retraining.py --quick          # ~5 min on 2 CPU cores
    python benchmarks/speedup_vs_retraining.py --size eval --method ddm-disp   # displacement matching, ~6 min on 2 CPU cores
    python benchmarks/speedup_vs_retraining.py --size eval --method ddm-inf    # unweighted influence matching, ~6 min on 2 CPU cores
    python benchmarks/speedup_vs_retraining.py --size gpu       # one H100/H200 in ~2 min: 8000 images, width 64, K = 50
    python benchmarks/speedup_vs_retraining.py                  # full size (GPU): MNIST 17k, width 128, K = 100
    python benchmarks/speedup_vs_retraining.py --run-dir RUN    # ratios from an evaluated run (evaluation.h5)
"""
from __future__ import annotations

import argparse
import os
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

import h5py
import torch

from ddm_hpc.config import Config, merge
from ddm_hpc.context import load_data
from ddm_hpc.metrics import spearman
from ddm_hpc.methods.ddm import dist1_rule
from ddm_hpc.models import build_target
from ddm_hpc.pipeline import run_stages
from ddm_hpc.retrain import query_probs, retrain_without
from ddm_hpc.storage import ParamTable, artifact_path
from ddm_hpc.utils import progress, resolve_device
from ddm_hpc.variants import displacement_matching, influence_matching

QUICK = {"data": {"n_train": 1000, "n_test": 500}, "model": {"width": 8}, "train": {"epochs": 5},
         "cluster": {"clusters_per_class": 3}, "distill": {"distill_steps": 30, "levels": "cluster"},
         "attribute": {"n_queries": 10, "search": "flat"}}
GPU = {"data": {"n_train": 8000, "n_test": 1000}, "model": {"width": 64}, "train": {"epochs": 15},
       "cluster": {"clusters_per_class": 5}, "distill": {"distill_steps": 50, "levels": "cluster"},
       "attribute": {"n_queries": 20, "search": "flat"}}
EVAL = {"model": {"width": 16}, "train": {"epochs": 15}, "cluster": {"clusters_per_class": 5},
        "distill": {"levels": "cluster"}, "attribute": {"n_queries": 20, "search": "flat"}}  # --preset eval's sizes
FULL = {"data": {"n_train": 0, "n_test": 0}, "model": {"width": 0}, "train": {"epochs": 30},
        "cluster": {"clusters_per_class": 10}, "distill": {"distill_steps": 50, "levels": "cluster"},
        "attribute": {"n_queries": 20, "search": "flat"}}


def from_run(run_dir: Path) -> None:
    """Ratios from an evaluated run: its retrainings, distillation and attribution were all timed."""
    with h5py.File(run_dir / "evaluation.h5", "r", locking=False) as f:
        per_retrain = float(f["gt"].attrs["seconds_per_retrain"])
        k = len(f["methods/ddm/scores"][0])
        online = float(f["methods/ddm/seconds"][()])
        offline = float(f["methods/ddm/offline_seconds"][()])
        d1 = f["methods/ddm"].attrs["dist1"]
        oracle = f["reference"].attrs["oracle/dist1"]
    exact = per_retrain * k
    print(f"run {run_dir}: K = {k}, one exact retraining {per_retrain:.2f} s (mean of the run's retrainings)")
    print(f"exact leave-one-out over K clusters: {exact:.1f} s; DDM online {online:.1f} s, offline {offline:.1f} s")
    print(f"speedup online: {exact / online:.1f}x; offline + online: {exact / (offline + online):.2f}x")
    print(f"located Dist1 x100: DDM {d1:.2f}, oracle {oracle:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CPU size: 1000 MNIST images, width 8, 5 epochs, K = 30")
    ap.add_argument("--size", choices=("quick", "eval", "gpu", "full"), default=None,
                    help="quick (= --quick), eval (--preset eval: 2000 images, width 16, 15 epochs, K = 50; ~6 min "
                         "on 2 CPU cores), gpu (8000 images, width 64, 15 epochs, K = 50: minutes on one GPU), "
                         "full (the default: all 17k images, width 128, 30 epochs, K = 100)")
    ap.add_argument("--method", choices=("ddm", "ddm-disp", "ddm-inf"), default="ddm",
                    help="ddm: the default distill and attribute options at that size (influence matching with "
                         "sqrt-Fisher tensor weights, both levels); ddm-disp / ddm-inf: displacement / unweighted "
                         "influence matching as those rows of evaluate run it (cluster level only); displacement "
                         "synsets locate Dist1 by their CE scores")
    ap.add_argument("--run-dir", type=Path, help="report the ratios of an evaluated run instead of measuring")
    ap.add_argument("--data-root", default="../shared/data")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, help="run directory (default: a temporary one)")
    args = ap.parse_args()
    if os.environ.get("DDM_ARGCHECK"):  # benchmarks/gpu_suite.sh --check: the suite's flags parse; nothing runs
        print(f"{Path(__file__).name}: arguments ok")
        return
    if args.run_dir:
        from_run(args.run_dir)
        return
    logging.basicConfig(level=logging.WARNING)
    out = args.out or Path(tempfile.mkdtemp(prefix="ddm_speedup_"))
    size = args.size or ("quick" if args.quick else "full")
    d = merge(Config().to_dict(), {"quick": QUICK, "eval": EVAL, "gpu": GPU, "full": FULL}[size])
    fixed = {"ddm-disp": displacement_matching, "ddm-inf": influence_matching}.get(args.method)
    if fixed:
        d = merge(d, fixed().overrides)
    d["data"]["data_root"] = args.data_root
    d["runtime"].update(out=str(out), device=args.device, progress=False, overwrite=True)
    cfg = Config.from_dict(d)
    device = resolve_device(args.device)
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    timings = run_stages(cfg)
    with h5py.File(artifact_path(out, "cluster"), "r") as f:
        assignment = f["clusters/assignment"][()]
        k = len(f["clusters/class"])
    with h5py.File(artifact_path(out, "attribute"), "r") as f:
        online = float(f.attrs["seconds_flat"])
        locate_by = dist1_rule(cfg)  # as evaluate locates each method's Dist1
        d1_scores = f[f"objectives/{locate_by}/scores"][()]
        qpos = torch.from_numpy(f["query_position"][()])
        base = torch.from_numpy(f["base_probs"][()])
    bundle = load_data(cfg)
    model = build_target(cfg, bundle).to(device)
    table = ParamTable.from_module(model)
    qx = bundle.x_test[qpos]
    t0 = time.perf_counter()
    exact = []
    for c in progress(range(k), "exact retraining", sys.stderr.isatty()):
        flat = retrain_without(cfg, bundle, assignment, [c], 0, device)
        exact.append(query_probs(model, table, flat, qx))
    exact_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.synchronize()
    eff = torch.stack(exact).sub(base[None]).norm(dim=-1).T  # [Q, K] exact Dist1
    pick = torch.from_numpy(d1_scores).argmax(1)
    q = torch.arange(len(pick))
    located, oracle, mean = 100 * eff[q, pick].mean(), 100 * eff.max(1).values.mean(), 100 * eff.mean()
    rho = spearman(torch.from_numpy(d1_scores).T, eff.T)
    offline = timings["distill"]
    print(f"size: {len(bundle.y_train)} train images, K = {k} clusters, {cfg.train.epochs} epochs, "
          f"{len(pick)} queries")
    print(f"method {args.method}: train {timings['train']:.1f} s, cluster {timings['cluster']:.1f} s, distill "
          f"(offline) {offline:.1f} s = {offline / timings['train']:.2f} trainings, attribute (online, K "
          f"fine-tunings) {online:.1f} s")
    print(f"exact leave-one-out retraining of K = {k} clusters: {exact_s:.1f} s ({exact_s / k:.2f} s each)")
    print(f"speedup online: {exact_s / online:.1f}x (online = {online / exact_s:.4f} of exact); offline + online: "
          f"{exact_s / (offline + online):.2f}x")
    print(f"located Dist1 x100: DDM {located:.2f}, oracle {oracle:.2f}, mean over clusters {mean:.2f}; "
          f"Spearman(DDM {locate_by} scores, exact Dist1) per query: mean {float(torch.nanmean(rho)):+.3f}")


if __name__ == "__main__":
    main()
