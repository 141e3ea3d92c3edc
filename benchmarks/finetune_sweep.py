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
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path


from ddm_hpc.config import Config, merge
from ddm_hpc.evaluate import load_retrained, method_metrics, run_context
from ddm_hpc.methods import VARIANT_ATTRIBUTE, read_ddm_scores, variant_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--labels", nargs="+", default=["hard", "learn"], help="--syn-labels values")
    ap.add_argument("--scales", nargs="+", default=["matched", "uniform"], help="--finetune-scale values")
    ap.add_argument("--ipcs", nargs="+", type=int, default=[1], help="--ipc values (synthetic images per cluster)")
    ap.add_argument("--steps", nargs="+", type=int, default=[1, 3, 0], help="--finetune-steps values (0 = tau)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    run = Path(args.run_dir)
    cfg = Config.from_dict({**json.loads((run / "config.json").read_text()),
                            "runtime": {"out": str(run), "progress": False, "overwrite": False}})
    ctx, labels = run_context(cfg)
    retrained = load_retrained(cfg, ctx.k, ctx.query_pos)
    print(f"run {run}: {len(labels)} queries, K = {ctx.k}, {len(retrained.masks)} LDS subsets, "
          f"tau = {cfg.train.epochs // cfg.train.save_every}")
    print(f"{'labels':6s} {'ipc':>3s} {'scale':8s} {'T':>3s}  {'Dist1 x100':>14s}  {'LDS':>16s}  attribute s")
    for lab in args.labels:
        for ipc in args.ipcs:
            distill = {"distill": {"syn_labels": lab, "ipc": ipc}}
            name = f"sweep-{lab}-ipc{ipc}"
            t0 = time.perf_counter()
            base = variant_run(ctx, name, merge(VARIANT_ATTRIBUTE, distill), ("train", "cluster"), ("distill",))
            print(f"# {name}: synsets in {time.perf_counter() - t0:.1f} s (0 if they existed)", flush=True)
            for scale in args.scales:
                for steps in args.steps:
                    over = merge(VARIANT_ATTRIBUTE, {**distill, "attribute": {"finetune_scale": scale,
                                                                              "finetune_steps": steps}})
                    t0 = time.perf_counter()
                    out = variant_run(ctx, f"{name}-{scale}-T{steps}", over, ("train", "cluster", "distill"),
                                      ("attribute",), sources={"distill": base})
                    m = method_metrics(read_ddm_scores(out, name), retrained, labels)
                    (d1, d1s), (lds, ldss) = m["dist1"], m["lds"]
                    print(f"{lab:6s} {ipc:3d} {scale:8s} {steps:3d}  {d1:6.2f} ± {d1s:5.2f}  {lds:+7.3f} ± "
                          f"{ldss:5.3f}  {time.perf_counter() - t0:6.1f}", flush=True)


if __name__ == "__main__":
    main()
