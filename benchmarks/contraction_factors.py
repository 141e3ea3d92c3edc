"""How far is the uniform displacement target from the exact one, and does a shared contraction factor bridge it?

``ddm-disp`` matches each cluster's synset to the uniform target D_k = lr_eff n_k sum_t g_k(theta_t)
(the summed trajectory gradient, no contraction by later training). The exact first-order removal
displacement is -d theta_tau / d w_k (``ddm_hpc.replay.replay_tangents``; load it with ``--tangents``,
saved by ``displacement_targets.py --exact --tangents F``). This prints their cosine and norm ratio,
then fits a contraction factor c shared by all clusters, per parameter tensor or per output unit,
c = argmin sum |De - c Du|^2, either from every cluster's exact tangent (a ceiling: it needs them all)
or from m random +-1 sketches sum_k s_k De_k (what m forward-mode passes through the replayed
training, or m weighted retrainings by finite differences, would cost offline), and scores, exactly as
``evaluate`` scores ``ddm-disp`` (objectives at theta_tau + D_k, Dist1 located by the CE change):
c * Du (a perfect synset of the corrected target), c * the ``RUN/variants/ddm-disp`` synsets' rated
steps (``--synsets``), and blends beta De + (1 - beta) Du. ``--retrainings m`` adds what ``--contraction m``
fits instead: per-tensor factors from m retrainings without random halves of the clusters (the same subsets),
applied to the target and to the synsets' steps. Nothing else is retrained, nothing is distilled.

    OMP_NUM_THREADS=1 python benchmarks/contraction_factors.py runs_gt/seed0 --tangents tangents_seed0.pt \\
        --json contraction_seed0.json
    python benchmarks/score_more.py --seeds contraction_seed0.json contraction_seed1.json contraction_seed2.json
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import h5py
import torch
import torch.nn.functional as F

from ddm_hpc.distill import contraction_subsets, fit_contraction, per_group_grads
from ddm_hpc.retrain import retrain_without
from ddm_hpc.storage import artifact_path
from ddm_hpc.synsets import read_synsets

sys.path.insert(0, str(Path(__file__).resolve().parent))
from displacement_targets import score_stepped, uniform_targets  # noqa: E402
from score_more import open_run  # noqa: E402


def shared_factors(a: torch.Tensor, b: torch.Tensor, bounds: list[int], shapes: list[torch.Size], per_unit: bool
                   ) -> torch.Tensor:
    """float64 [P]: per parameter tensor (or per output unit of it) the c minimising sum_rows |a - c b|^2."""
    c = torch.empty(b.shape[1], dtype=torch.float64)
    for lo, hi, shape in zip(bounds, bounds[1:], shapes):
        units = shape[0] if per_unit else 1
        ar, br = a[:, lo:hi].reshape(len(a), units, -1), b[:, lo:hi].reshape(len(b), units, -1)
        cu = (ar * br).sum((0, 2)) / (br * br).sum((0, 2)).clamp(min=1e-30)
        c[lo:hi] = cu[:, None].expand(units, (hi - lo) // units).reshape(-1)
    return c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--tangents", type=Path, required=True, help="(tangents [K, P], theta_tau) saved by "
                    "displacement_targets.py --exact --tangents F")
    ap.add_argument("--sketches", nargs="*", type=int, default=[1, 2, 4], help="numbers of random +-1 sketches")
    ap.add_argument("--blends", nargs="*", type=float, default=[0.25, 0.5, 0.75])
    ap.add_argument("--synsets", default="ddm-disp", help="the rated synsets' variant, RUN/variants/<name> ('' = none); "
                    "their rates are used without any --contraction factor they carry")
    ap.add_argument("--seed", type=int, default=0, help="the sketches' seed")
    ap.add_argument("--retrainings", nargs="*", type=int, default=[1, 4], help="also per-tensor factors fitted to "
                    "this many retrainings without random halves of the clusters, as --contraction fits them")
    ap.add_argument("--json", help="also write {row: {'<removal>/<metric>[@alpha]': mean}} here (for --seeds)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cfg, ctx, retrained = open_run(args.run_dir)
    reader, model = ctx.trajectory(), ctx.build_model().eval()
    t, k = cfg.train, ctx.k
    du = uniform_targets(ctx, reader, model)  # [K, P] the uniform target
    de = -torch.load(args.tangents)[0].double()  # [K, P] the exact first-order removal displacement
    if de.shape != du.shape:
        raise SystemExit(f"{args.tangents} holds tangents of shape {tuple(de.shape)}, this run's targets are "
                         f"{tuple(du.shape)}: give the tangents of this run")
    theta = reader.params(reader.tau)
    names = list(theta)
    shapes = [theta[n].shape for n in names]
    bounds = torch.tensor([0] + [theta[n].numel() for n in names]).cumsum(0).tolist()
    cos = F.cosine_similarity(du, de, dim=1)
    print(f"run {args.run_dir}: cos(uniform, exact) {float(cos.mean()):.3f} (min {float(cos.min()):.3f}), "
          f"|uniform| / |exact| {float((du.norm(dim=1) / de.norm(dim=1)).mean()):.2f}")
    c_all = shared_factors(de, du, bounds, shapes, per_unit=False)
    print("per-tensor factors from every cluster: " + " ".join(f"{n}={float(c_all[lo]):.3f}"
                                                             for n, lo in zip(names, bounds)))
    synset_step = None
    if args.synsets:
        syn_dir = Path(args.run_dir) / "variants" / args.synsets
        syn = read_synsets(syn_dir, "cluster")
        if syn.layer_rates is None:
            raise SystemExit(f"{args.synsets}'s synsets have no layer rates: give --synsets of a --layer-rates run")
        with h5py.File(artifact_path(syn_dir, "distill"), "r") as f:  # the rates before any --contraction factor
            rates = torch.from_numpy(f["cluster/layer_rates"][()])
            if "contraction" in f:
                print(f"{args.synsets}'s synsets carry --contraction factors: the rows below use their rates "
                      "without them")
        grads = per_group_grads(model, theta, syn.images, syn.train_targets, torch.ones(syn.images.shape[:2]), "loop")
        col = {n: i for i, n in enumerate(syn.rate_names)}
        synset_step = -t.lr * torch.cat([(g * rates[:, col[n]].reshape(-1, *[1] * (g.dim() - 1)))
                                         .reshape(k, -1) for n, g in zip(names, grads)], 1).double()
    rows: dict[str, torch.Tensor] = {"uniform target": du, "exact target": de}
    if synset_step is not None:
        rows["synsets"] = synset_step
    for b in args.blends:
        rows[f"blend {b:g} exact + {1 - b:g} uniform"] = b * de + (1 - b) * du
    gen = torch.Generator().manual_seed(args.seed)
    fits = {"every cluster": (de, du)}
    for m in args.sketches:
        s = torch.randint(0, 2, (m, k), generator=gen).double() * 2 - 1
        fits[f"{m} sketch{'es' if m > 1 else ''}"] = (s @ de, s @ du)
    for how, (a, b) in fits.items():
        for per_unit in (False, True):
            c = shared_factors(a, b, bounds, shapes, per_unit)
            label = f"{'unit' if per_unit else 'tensor'} c from {how}"
            rows[f"target, {label}"] = c * du
            if synset_step is not None:
                rows[f"synsets, {label}"] = c * synset_step
    if args.retrainings:
        kept = contraction_subsets(k, max(args.retrainings), cfg.seed)
        flat_tau = reader.table.flatten(theta).double()
        moves = torch.stack([retrain_without(cfg, ctx.bundle, ctx.assignment, torch.nonzero(~kp)[:, 0])[:len(flat_tau)]
                             .double() - flat_tau for kp in kept])
        split = lambda d: [d[:, lo:hi].reshape(k, *sh) for lo, hi, sh in zip(bounds, bounds[1:], shapes)]  # noqa: E731
        for m in args.retrainings:
            for what, d in (("target", du), ("synsets", synset_step)):
                if d is not None:  # fitted to this row's own steps, as --contraction fits the synsets'
                    c = fit_contraction(split(d), moves[:m], kept[:m]).double()
                    rows[f"{what}, tensor c from {m} retraining{'s' if m > 1 else ''}"] = torch.cat(
                        [c[i] * d[:, lo:hi] for i, (lo, hi) in enumerate(zip(bounds, bounds[1:]))], 1)
    out = {}
    for name, d in rows.items():
        out[name], text = score_stepped(model, reader, theta, d, ctx, retrained, cfg)
        rel = float(((d - de).norm(dim=1) ** 2 / de.norm(dim=1) ** 2).mean())
        print(f"{name:42s} |D - De|^2/|De|^2 {rel:7.3f} | {text}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
