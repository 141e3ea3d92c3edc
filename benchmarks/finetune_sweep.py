"""DDM's attribution quality against exact retraining as the synsets and the fine-tune change.

For a run that ``ddm-hpc evaluate`` has finished (its ``groundtruth.h5`` holds the exact
retrainings), distills the cluster synsets once per (``--labels``, ``--ipcs``) pair in
``RUN/variants/sweep-<labels>-ipc<n>`` (on the run's train.h5 and clusters.h5), then reruns only
the attribute stage for every (``--scales``, ``--steps``) pair in
``RUN/variants/sweep-<labels>-ipc<n>-<scale>-T<steps>`` and scores it exactly as ``evaluate``
does (Dist1 x100 and LDS over the run's random subsets, mean ± s.e.m. over queries). Nothing is
retrained, so each row costs one attribute stage (and each new synset family one distillation).

    python benchmarks/finetune_sweep.py runs/eval
    python benchmarks/finetune_sweep.py runs/eval --labels learn --ipcs 1 4 --scales matched --steps 1 2 4 0

Steps 0 means the run's own setting (tau, the trajectory length). The rows with the run's own
settings reproduce evaluate's DDM-full (hard) and DDM + learned labels (learn) rows.

Two more columns ask where Dist1 is lost: the share of queries whose located cluster belongs to
the class theta_tau predicts (the exact oracle's always does on the measured run), and Dist1 when
the choice is restricted to that class's clusters. ``--references`` adds the same columns for
evaluate's other methods (e.g. random, clustering, trak).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

from ddm_hpc.evaluate import method_metrics
from ddm_hpc.methods import MethodResult, read_ddm_scores, score_methods
from ddm_hpc.metrics import gt_objectives, located_clusters, located_values
from ddm_hpc.pipeline import materialise
from ddm_hpc.variants import synset_variant

sys.path.insert(0, str(Path(__file__).resolve().parent))
from score_more import open_run  # noqa: E402


def where_located(res: MethodResult, retrained, labels: torch.Tensor, cluster_class: torch.Tensor
                  ) -> tuple[float, float]:
    """(share of queries whose Dist1-located cluster is of theta_tau's predicted class, mean Dist1 x100 when
    the choice is restricted to that class's clusters)."""
    scores = res.for_metric("dist1")
    pred = retrained.gt.base.argmax(-1)  # the full-data retraining is theta_tau
    top = retrained.removed[located_clusters(scores, retrained.removed)]
    inside = float((cluster_class[top] == pred).double().mean())
    restricted = scores.masked_fill(cluster_class[None, :] != pred[:, None], float("-inf"))
    d1 = located_values(restricted, retrained.gt.outputs, retrained.removed, retrained.gt.base, labels)["dist1"]
    return inside, float(d1.mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--labels", nargs="+", default=["hard", "learn"], help="--syn-labels values")
    ap.add_argument("--scales", nargs="+", default=["matched", "uniform"], help="--finetune-scale values")
    ap.add_argument("--ipcs", nargs="+", type=int, default=[1], help="--ipc values (synthetic images per cluster)")
    ap.add_argument("--steps", nargs="+", type=int, default=[1, 3, 0], help="--finetune-steps values (0 = tau)")
    ap.add_argument("--references", default="random,clustering", help="evaluate methods to print alongside")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    run = Path(args.run_dir)
    cfg, ctx, retrained = open_run(run)
    labels = ctx.query_y
    print(f"run {run}: {len(labels)} queries, K = {ctx.k}, {len(retrained.masks)} LDS subsets, "
          f"tau = {cfg.train.epochs // cfg.train.save_every}")
    head = f"{'Dist1 x100':>14s}  {'LDS':>16s}  {'in pred. class':>14s}  {'Dist1 within it':>15s}"
    truth = torch.full((len(labels), ctx.k), float("-inf"), dtype=torch.float64)
    truth[:, retrained.removed] = gt_objectives(retrained.gt.outputs, retrained.gt.base, labels)["dist1"].T.double()
    inside, d1c = where_located(MethodResult(truth, 0.0), retrained, labels, ctx.cluster_class)
    print(f"{'exact (oracle)':25s} {'':14s}  {'':16s}  {inside:14.2f}  {d1c:15.2f}")
    for name, res in score_methods(ctx, [m for m in args.references.split(",") if m]).items():
        m = method_metrics(res, retrained, labels)
        inside, d1c = where_located(res, retrained, labels, ctx.cluster_class)
        print(f"{name:25s} {m['dist1'][0]:6.2f} ± {m['dist1'][1]:5.2f}  {m['lds'][0]:+7.3f} ± {m['lds'][1]:5.3f}  "
              f"{inside:14.2f}  {d1c:15.2f}")
    print(f"{'labels':6s} {'ipc':>3s} {'scale':8s} {'T':>3s}  {head}  attribute s")
    for lab in args.labels:
        for ipc in args.ipcs:
            distill = {"syn_labels": lab, "ipc": ipc}
            name = f"sweep-{lab}-ipc{ipc}"
            t0 = time.perf_counter()
            synsets = synset_variant(name, distill, ("distill",))
            materialise(cfg, [synsets])
            print(f"# {name}: synsets in {time.perf_counter() - t0:.1f} s (0 if they existed)", flush=True)
            for scale in args.scales:
                for steps in args.steps:
                    t0 = time.perf_counter()
                    tuned = synset_variant(f"{name}-{scale}-T{steps}", distill, ("attribute",), sources={"distill": synsets},
                                           attribute={"finetune_scale": scale, "finetune_steps": steps})
                    (out,) = materialise(cfg, [tuned])
                    res = read_ddm_scores(out, name)
                    m = method_metrics(res, retrained, labels)
                    (d1, d1s), (lds, ldss) = m["dist1"], m["lds"]
                    inside, d1c = where_located(res, retrained, labels, ctx.cluster_class)
                    print(f"{lab:6s} {ipc:3d} {scale:8s} {steps:3d}  {d1:6.2f} ± {d1s:5.2f}  {lds:+7.3f} ± "
                          f"{ldss:5.3f}  {inside:14.2f}  {d1c:15.2f}  {time.perf_counter() - t0:6.1f}", flush=True)


if __name__ == "__main__":
    main()
