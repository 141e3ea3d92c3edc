"""Is one method's Dist1 / LDS difference from another real? Paired over the queries of several evaluated runs.

The evaluation table gives each method's mean over queries (and a mean ± std over seeds); two
methods scored on the same queries are better compared query by query. For ``--method`` and each
``--against`` method, per (removal protocol, kept fraction) and pooled over the queries of every run
given: the mean paired difference of Dist1 x100 (each located as ``evaluate`` locates it) and of the
per-query LDS, with its s.e.m. over the pooled queries, and how many queries locate the same
cluster / a better one / a worse one. Methods stored in a run's ``evaluation.h5`` are read from it;
others (variant rows such as ``ddm-disp``) are scored as ``score_more.py`` scores them. Nothing is
retrained.

    OMP_NUM_THREADS=1 python benchmarks/paired.py runs_gt/seed0 runs_gt/seed1 runs_gt/seed2 \\
        --method ddm-disp --against clustering,trak,tracin,replay
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import h5py
import torch

from ddm_hpc.evaluate import method_metrics
from ddm_hpc.methods import MethodResult, resolve, score_methods
from ddm_hpc.metrics import located_values
from ddm_hpc.pipeline import materialise

sys.path.insert(0, str(Path(__file__).resolve().parent))
from score_more import open_run  # noqa: E402


def stored(run: Path, name: str) -> MethodResult | None:
    """The scores ``evaluate`` wrote for ``name`` (None if it did not score it)."""
    with h5py.File(run / "evaluation.h5", "r") as f:
        if f"methods/{name}" not in f:
            return None
        g = f[f"methods/{name}"]
        objs = {k: torch.from_numpy(v[()]) for k, v in g["objectives"].items()} if "objectives" in g else {}
        return MethodResult(torch.from_numpy(g["scores"][()]), float(g["seconds"][()]), per_objective=objs,
                            dist1_by=str(g.attrs.get("dist1_by", "dist1")))


def per_query(run: Path, names: list[str], dist1_by: str = "") -> dict[tuple[str, str, float], dict[str, torch.Tensor]]:
    """(method, removal, alpha) -> {'dist1': [Q], 'lds': [Q], 'located': [Q]} on one run. ``dist1_by`` (dist1 or
    dist2): the first method's Dist1 located by those scores instead of its own rule (it is then scored afresh, as
    an evaluation.h5 made before ``dist1_by`` was stored kept only the located scores)."""
    cfg, _, _ = open_run(run)
    results = {n: None if dist1_by and i == 0 else stored(run, n) for i, n in enumerate(names)}
    missing = [n for n, r in results.items() if r is None]
    if missing:
        materialise(cfg, [v for m in resolve(missing) for v in m.variants(cfg)])
    cfg, ctx, retrained = open_run(run)
    results.update(score_methods(ctx, missing) if missing else {})
    if dist1_by:
        results[names[0]].dist1_by = dist1_by
    out = {}
    for removal in cfg.evaluate.removal_list():
        for alpha in cfg.evaluate.alpha_list():
            view = retrained.view(removal, alpha)
            for n, res in results.items():
                m = method_metrics(res, view, ctx.query_y)
                d1 = located_values(res.for_metric("dist1"), view.gt.outputs, view.removed, view.gt.base,
                                    ctx.query_y)["dist1"]
                out[(n, removal, alpha)] = {"dist1": d1, "lds": m["lds_per_query"].double(), "located": m["located"][0]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="evaluated run directories (e.g. three seeds)")
    ap.add_argument("--method", required=True)
    ap.add_argument("--against", default="clustering,trak,tracin,replay", help="comma-separated methods")
    ap.add_argument("--dist1-by", choices=("dist1", "dist2"), default="",
                    help="locate --method's Dist1 by these scores instead of its own rule (methods.ddm.dist1_rule)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    others = [n for n in args.against.split(",") if n]
    pooled: dict[tuple[str, str, float], dict[str, list[torch.Tensor]]] = {}
    for run in args.runs:
        for key, v in per_query(Path(run), [args.method, *others], args.dist1_by).items():
            for metric, x in v.items():
                pooled.setdefault(key, {}).setdefault(metric, []).append(x)
    cat = {key: {m: torch.cat(xs) for m, xs in v.items()} for key, v in pooled.items()}
    print(f"{args.method} minus each method, paired over the queries of {len(args.runs)} run(s): mean ± s.e.m.")
    for (name, removal, alpha), mine in ((k, v) for k, v in cat.items() if k[0] == args.method):
        print(f"{removal}, kept fraction {alpha:g}: {args.method} Dist1 {float(mine['dist1'].mean()):.2f}, "
              f"LDS {float(mine['lds'].nanmean()):+.3f}")
        for other in others:
            theirs = cat[(other, removal, alpha)]
            d1, dl = mine["dist1"] - theirs["dist1"], mine["lds"] - theirs["lds"]
            same = int((mine["located"] == theirs["located"]).sum())
            ok = ~dl.isnan()
            print(f"  - {other:12s} Dist1 {float(d1.mean()):+6.2f} ± {float(d1.std() / len(d1) ** 0.5):.2f} "
                  f"(same cluster {same}, better {int((d1 > 0).sum())}, worse {int((d1 < 0).sum())} of {len(d1)}) | "
                  f"LDS {float(dl[ok].mean()):+.3f} ± {float(dl[ok].std() / int(ok.sum()) ** 0.5):.3f}")


if __name__ == "__main__":
    main()
