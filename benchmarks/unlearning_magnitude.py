"""How far does DDM's fine-tune move the queries' outputs, against exact leave-cluster-out?

For a finished run directory, retrains the target exactly without each of ``--n-clusters``
clusters (same theta_0, the full run's data order with the cluster's rows dropped), and
compares Dist1 (L2 change of the queries' softmax) of the exact retraining with Dist1 of the
DDM fine-tune under both ``--finetune-scale`` choices. Also retrains once on the full data
with another seed for the noise floor. Prints means and the per-query Spearman correlation
between predicted and exact effects across the chosen clusters.

    python benchmarks/unlearning_magnitude.py runs/default --n-clusters 6
    python benchmarks/unlearning_magnitude.py runs/default --scales matched --lrs 0.01 0.001 --steps 1 5 30

This is a spot check on a few clusters, not the evaluation (LDS over many retrainings).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

import h5py
import numpy as np
import torch

from ddm_hpc.attribute import loo_perturbations
from ddm_hpc.config import Config
from ddm_hpc.context import RunContext
from ddm_hpc.metrics import spearman
from ddm_hpc.retrain import query_probs, retrain_without
from ddm_hpc.storage import artifact_path
from ddm_hpc.synsets import read_synsets
from ddm_hpc.unlearn import Unlearner


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--n-clusters", type=int, default=6, help="clusters to retrain without (spread over the ranking)")
    ap.add_argument("--scales", nargs="+", default=["matched", "uniform"], help="--finetune-scale values to compare")
    ap.add_argument("--lrs", nargs="+", type=float, default=None, help="fine-tune rates to sweep (default: the run's)")
    ap.add_argument("--steps", nargs="+", type=int, default=None, help="fine-tune steps to sweep (default: the run's)")
    args = ap.parse_args()
    with h5py.File(artifact_path(args.run_dir, "attribute"), "r") as f:
        cfg = Config.from_dict(json.loads(f.attrs["config"]) | {"runtime": {"out": args.run_dir, "progress": False}})
        q_pos = torch.from_numpy(f["query_position"][()])
        base = torch.from_numpy(f["base_probs"][()])
        scores = f["scores"][()]
    ctx = RunContext(cfg, device=torch.device("cpu"))
    bundle, reader, model = ctx.bundle, ctx.trajectory(), ctx.build_model()
    with h5py.File(artifact_path(args.run_dir, "cluster"), "r") as f:
        assignment = torch.from_numpy(f["clusters/assignment"][()])
    # clusters spread over the mean ranking, so effects differ
    order = np.argsort(-scores.mean(0))
    picks = order[np.linspace(0, len(order) - 1, args.n_clusters).round().astype(int)]
    xq = bundle.x_test[q_pos]

    t0 = time.perf_counter()
    exact = torch.stack([(query_probs(model, reader.table, retrain_without(cfg, bundle, assignment, [int(k)]), xq)
                          - base).norm(dim=-1) for k in picks])  # [n_clusters, Q]
    noise_d1 = (query_probs(model, reader.table, retrain_without(cfg, bundle, assignment, [], seed_offset=1), xq)
                - base).norm(dim=-1)
    t_retrain = time.perf_counter() - t0

    level = read_synsets(args.run_dir, "cluster")
    unlearner = Unlearner.of_run(ctx)  # the run's own steps, rate and scale; swept below
    pert = loo_perturbations(len(level.size))[torch.from_numpy(picks)]
    print(f"run {args.run_dir}: {len(q_pos)} queries, clusters {picks.tolist()}, "
          f"{len(picks) + 1} retrainings in {t_retrain:.0f} s")
    print(f"  exact leave-cluster-out  mean Dist1 {exact.mean():.4f}")
    print(f"  noise floor (seed+1)     mean Dist1 {noise_d1.mean():.4f}")
    for scale in args.scales:
        for lr_f in args.lrs or [unlearner.lr]:
            for t in args.steps or [unlearner.steps]:
                t1 = time.perf_counter()
                swept = dataclasses.replace(unlearner, scale=scale, lr=lr_f, steps=t)
                p = swept.unlearn(level, pert, xq, chunk=len(picks))
                d1 = (p - base[None]).norm(dim=-1)  # [n_clusters, Q]
                rho = float(torch.nanmean(spearman(d1, exact)))
                print(f"  DDM fine-tune, {scale:8s} lr {lr_f:<7g} T {t:3d}  mean Dist1 {d1.mean():.4f}  ratio to exact "
                      f"{d1.mean() / exact.mean():8.2f}  mean per-query Spearman vs exact {rho:+.3f}  "
                      f"({time.perf_counter() - t1:.1f} s)")

if __name__ == "__main__":
    main()
