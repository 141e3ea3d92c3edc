"""Score more methods against an evaluated run's exact retrainings, without rewriting its evaluation.

For a run ``ddm-hpc evaluate`` has finished, scores ``--methods`` (any registered name, e.g.
``ddm-hier`` or ``replay``) exactly as ``evaluate`` does, under every removal protocol and LDS kept
fraction the run was evaluated with, and prints one row per method: Dist1 x100 (and Dist1 located
by the Dist2 scores), Dist2, LDS, per protocol / alpha. Nothing is retrained; methods that need
variant runs make them first (as ``evaluate`` would).

    python benchmarks/score_more.py runs_gt/seed0 --methods ddm-hier,ddm
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from ddm_hpc.config import Config
from ddm_hpc.context import RunContext
from ddm_hpc.evaluate import load_retrained, method_metrics
from ddm_hpc.methods import resolve, score_methods
from ddm_hpc.metrics import located_values, mean_sem
from ddm_hpc.pipeline import materialise


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--methods", default="ddm-hier,ddm", help="comma-separated registered methods")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    run = Path(args.run_dir)
    cfg = Config.from_dict({**json.loads((run / "config.json").read_text()),
                            "runtime": {"out": str(run), "progress": False, "overwrite": False}})
    names = [m for m in args.methods.split(",") if m]
    materialise(cfg, [v for m in resolve(names) for v in m.variants(cfg)])
    ctx = RunContext(cfg)
    labels = ctx.query_y
    retrained = load_retrained(cfg, ctx.k, ctx.query_pos)
    ec = cfg.evaluate
    views = [(r, a) for r in ec.removal_list() for a in ec.alpha_list()]
    print(f"run {run}: {len(labels)} queries, K = {ctx.k}; protocols {ec.gt_removal}, kept fractions "
          f"{','.join(f'{a:g}' for a in ec.alpha_list())}")
    for name, res in score_methods(ctx, names).items():
        cells = []
        for removal, alpha in views:
            view = retrained.view(removal, alpha)
            m = method_metrics(res, view, labels)
            d12 = mean_sem(located_values(res.for_metric("dist2"), view.gt.outputs, view.removed, view.gt.base,
                                          labels)["dist1"])
            cells.append(f"{removal} a={alpha:g}: Dist1 {m['dist1'][0]:.2f}±{m['dist1'][1]:.2f} "
                         f"(by Dist2 {d12[0]:.2f}) Dist2 {m['dist2'][0]:.3f} LDS {m['lds'][0]:+.3f}±{m['lds'][1]:.3f}")
        print(f"{name:10s} online {res.seconds:.1f} s  " + " | ".join(cells))


if __name__ == "__main__":
    main()
