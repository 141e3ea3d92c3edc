"""Score more methods against an evaluated run's exact retrainings, without rewriting its evaluation.

For a run ``ddm-hpc evaluate`` has finished, scores ``--methods`` (any registered name, e.g.
``ddm-hier`` or ``replay``) exactly as ``evaluate`` does, under every removal protocol and LDS kept
fraction the run was evaluated with, and prints one row per method: Dist1 x100 (and Dist1 located
by the Dist1 and by the Dist2 scores, both rules), Dist2, LDS, per protocol / alpha. Nothing is
retrained; methods that need variant runs make them first (as ``evaluate`` would).

    python benchmarks/score_more.py runs_gt/seed0 --methods ddm-hier,ddm --json seed0.json
    python benchmarks/score_more.py --seeds seed0.json seed1.json seed2.json   # mean ± std over seeds
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
from ddm_hpc.pipeline import load_saved_config, materialise


def open_run(run_dir: str | Path) -> tuple[Config, RunContext, object]:
    """An evaluated run as its own config.json describes it (no progress bars, never overwriting): (config, context,
    its exact retrainings). The re-scoring benchmarks (this one, finetune_sweep, displacement_targets) start here."""
    run = Path(run_dir)
    cfg = Config.from_dict({**load_saved_config(run),
                            "runtime": {"out": str(run), "progress": False, "overwrite": False}})
    ctx = RunContext(cfg)
    return cfg, ctx, load_retrained(cfg, ctx.k, ctx.query_pos)


def view_cells(res, retrained, labels, cfg: Config) -> dict[tuple[str, float], dict[str, tuple[float, float]]]:
    """(removal, alpha) -> {dist1, dist1 by dist1, dist1 by dist2, dist2, lds: (mean, s.e.m.)} of one method under
    every protocol and kept fraction of the run, scored exactly as ``evaluate`` scores it ('dist1 by X': located by
    the X scores, whatever the method's own rule)."""
    out = {}
    for removal in cfg.evaluate.removal_list():
        for alpha in cfg.evaluate.alpha_list():
            view = retrained.view(removal, alpha)
            m = method_metrics(res, view, labels)
            by = {f"dist1 by {obj}": mean_sem(located_values(res.per_objective.get(obj, res.scores), view.gt.outputs,
                                                             view.removed, view.gt.base, labels)["dist1"])
                  for obj in ("dist1", "dist2")}
            out[(removal, alpha)] = {"dist1": m["dist1"], **by, "dist2": m["dist2"], "lds": m["lds"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", nargs="?")
    ap.add_argument("--methods", default="ddm-hier,ddm", help="comma-separated registered methods")
    ap.add_argument("--json", help="also write {method: {'<removal>/<metric>[@alpha]': mean}} here (for --seeds)")
    ap.add_argument("--seeds", nargs="+", metavar="JSON", help="instead: print mean ± std over these --json files")
    args = ap.parse_args()
    if args.seeds:
        return print_seeds([json.loads(Path(p).read_text()) for p in args.seeds])
    if not args.run_dir:
        ap.error("give an evaluated run directory (or --seeds JSON ...)")
    logging.basicConfig(level=logging.WARNING)
    cfg, _, _ = open_run(args.run_dir)
    names = [m for m in args.methods.split(",") if m]
    materialise(cfg, [v for m in resolve(names) for v in m.variants(cfg)])
    cfg, ctx, retrained = open_run(args.run_dir)
    labels, ec = ctx.query_y, cfg.evaluate
    print(f"run {args.run_dir}: {len(labels)} queries, K = {ctx.k}; protocols {ec.gt_removal}, kept fractions "
          f"{','.join(f'{a:g}' for a in ec.alpha_list())}")
    out: dict[str, dict[str, float]] = {}
    for name, res in score_methods(ctx, names).items():
        cells = []
        for (removal, alpha), m in view_cells(res, retrained, labels, cfg).items():
            out.setdefault(name, {}).update({f"{removal}/dist1": m["dist1"][0],
                                             f"{removal}/dist1 by dist1": m["dist1 by dist1"][0],
                                             f"{removal}/dist1 by dist2": m["dist1 by dist2"][0],
                                             f"{removal}/lds@{alpha:g}": m["lds"][0]})
            out[name]["online s"] = res.seconds
            out[name]["offline s"] = res.offline_seconds
            cells.append(f"{removal} a={alpha:g}: Dist1 {m['dist1'][0]:.2f}±{m['dist1'][1]:.2f} "
                         f"(by Dist1 {m['dist1 by dist1'][0]:.2f}, by Dist2 {m['dist1 by dist2'][0]:.2f}) "
                         f"Dist2 {m['dist2'][0]:.3f} "
                         f"LDS {m['lds'][0]:+.3f}±{m['lds'][1]:.3f}")
        print(f"{name:10s} online {res.seconds:.1f} s  " + " | ".join(cells))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


def print_seeds(runs: list[dict[str, dict[str, float]]]) -> None:
    """One row per method: mean ± std over the runs of every cell they all have."""
    import statistics
    names = [n for n in runs[0] if all(n in r for r in runs)]
    cells = [c for c in runs[0][names[0]] if all(c in r[n] for r in runs for n in names)]
    print("| method | " + " | ".join(cells) + " |")
    print("|---" * (len(cells) + 1) + "|")
    for n in names:
        vals = [[r[n][c] for r in runs] for c in cells]
        print(f"| {n} | " + " | ".join(f"{statistics.mean(v):.2f} ± {statistics.stdev(v) if len(v) > 1 else 0:.2f}"
                                       for v in vals) + " |")


if __name__ == "__main__":
    main()
