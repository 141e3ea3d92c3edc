"""Score a displacement-matching variant (``ddm-disp`` with options changed) against an evaluated run.

Distils ``RUN/variants/ddm-disp-<name>`` from the run's trajectory and clusters with the ``ddm-disp``
settings (``ddm_hpc.variants.DISPLACEMENT``; ``--base ddm-inf`` / ``ddm-fw`` / ``ddm-fws`` starts from those
variants' instead)
plus ``--set`` overrides of the distill options, attributes
with one unweighted fine-tune step per cluster, and scores it exactly as ``evaluate`` scores ``ddm-disp``
(Dist1 located by the variant's own rule, ``methods.ddm.dist1_rule``; both rules printed) under every protocol and kept fraction of the run. Prints the
distill seconds and the matching loss too. Nothing is retrained.

    OMP_NUM_THREADS=1 python benchmarks/disp_variants.py runs_gt/seed0 --name s50 --set distill_steps=50 --json s50_seed0.json
    python benchmarks/score_more.py --seeds s50_seed0.json s50_seed1.json s50_seed2.json
    OMP_NUM_THREADS=1 python benchmarks/disp_variants.py runs_gt/seed0 --name r500 \
        --attr perturbation=random n_perturbations=500 removal_prob=0.5   # ddm-disp's synsets, other removals
    python benchmarks/disp_variants.py runs_gt/seed7 --base ddm-fw --name fw-lr2 --attr finetune_lr=0.02
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import h5py

from ddm_hpc.methods.ddm import DDMDisp, dist1_rule, read_ddm_scores
from ddm_hpc.pipeline import materialise
from ddm_hpc.storage import artifact_path
from ddm_hpc.variants import ONE_STEP, ONE_STEP_VARIANTS, synset_variant

sys.path.insert(0, str(Path(__file__).resolve().parent))
from score_more import open_run, view_cells  # noqa: E402


def parse_sets(items: list[str]) -> dict[str, object]:
    """``key=value`` pairs, values read as JSON where they parse (numbers, booleans), else as strings."""
    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: give key=value, e.g. --set distill_steps=50")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--name", required=True, help="the variant's directory is RUN/variants/ddm-disp-<name>")
    ap.add_argument("--base", choices=sorted(ONE_STEP_VARIANTS), default="ddm-disp",
                    help="the variant whose distill options --set changes (default ddm-disp)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="distill options over --base's")
    ap.add_argument("--attr", nargs="*", default=[], metavar="KEY=VALUE",
                    help="attribute options over --base's one fine-tune step (e.g. finetune_lr=0.02); "
                         "without --set the variant shares RUN/variants/<base>'s synsets")
    ap.add_argument("--json", help="also write {'ddm-disp-<name>': {'<removal>/<metric>[@alpha]': mean}} here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cfg, _, _ = open_run(args.run_dir)
    name = f"ddm-disp-{args.name}"
    sets = parse_sets(args.set)
    settings, make_base = ONE_STEP_VARIANTS[args.base]
    sources = {} if sets else {"distill": make_base()}  # the same synsets: distil them once
    variant = synset_variant(name, {**settings, **sets}, ("attribute",) if sources else ("distill", "attribute"),
                             sources=sources,
                             attribute={**ONE_STEP, **parse_sets(args.attr)})
    materialise(cfg, [variant] if sets else [make_base(), variant])
    cfg, ctx, retrained = open_run(args.run_dir)
    out_dir = variant.directory(cfg)
    res = read_ddm_scores(out_dir, DDMDisp.note, dist1_by=dist1_rule(variant.config(cfg)))
    with h5py.File(artifact_path(out_dir, "distill"), "r") as f:
        init, final = float(f["cluster/init_loss"][()].mean()), float(f["cluster/final_loss"][()].mean())
    print(f"{name}: distill {res.offline_seconds:.1f} s, attribute {res.seconds:.1f} s; mean matching loss "
          f"{init:.3f} -> {final:.3f}")
    row: dict[str, float] = {"online s": res.seconds, "offline s": res.offline_seconds, "matching loss": final}
    for (removal, alpha), m in view_cells(res, retrained, ctx.query_y, cfg).items():
        row.update({f"{removal}/dist1": m["dist1"][0], f"{removal}/lds@{alpha:g}": m["lds"][0],
                    f"{removal}/dist1 by dist1": m["dist1 by dist1"][0], f"{removal}/dist1 by dist2": m["dist1 by dist2"][0]})
        print(f"  {removal} a={alpha:g}: Dist1 {m['dist1'][0]:.2f}±{m['dist1'][1]:.2f} (by {res.dist1_by}; by dist1 "
              f"{m['dist1 by dist1'][0]:.2f}, by dist2 {m['dist1 by dist2'][0]:.2f}) LDS {m['lds'][0]:+.3f}"
              f"±{m['lds'][1]:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({name: row}, indent=1))


if __name__ == "__main__":
    main()
