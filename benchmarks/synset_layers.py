"""Where do displacement synsets miss their target? Per parameter tensor, against an evaluated run.

For the ``--target displacement`` synsets of ``RUN/variants/<variant>``, compares the synset's
one-step displacement D_syn,k = -lr grad L(theta_tau; S_k) (rates 1, or the stored ``--layer-rates``
with ``--rated``) with its target D_k = lr T_k (the summed trajectory gradient), tensor by tensor:
the tensor's share of |D_k|^2, the cosine, the norm ratio |D_syn| / |D| and the residual it leaves
(as a share of |D_k|^2), each a mean over clusters. Then it scores, exactly as ``evaluate`` scores
``ddm-disp`` (objectives at theta_tau + displacement, Dist1 by the CE scores), the perfect target, the
synsets, the synsets with one tensor replaced by its target, and the synsets with each tensor (or the
whole step) rescaled by its best scalar. Nothing is retrained or distilled.

    OMP_NUM_THREADS=1 python benchmarks/synset_layers.py runs_gt/seed0 --variant ddm-disp-s100
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from ddm_hpc.distill import per_group_grads
from ddm_hpc.synsets import read_synsets

sys.path.insert(0, str(Path(__file__).resolve().parent))
from displacement_targets import stepped, uniform_targets  # noqa: E402
from score_more import open_run, view_cells  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--variant", default="ddm-disp", help="the synsets' run, RUN/variants/<variant>")
    ap.add_argument("--rated", action="store_true", help="apply the synsets' stored --layer-rates (times their "
                    "--contraction factors, if any: those steps aim below the uniform target on purpose)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cfg, ctx, retrained = open_run(args.run_dir)
    reader, model = ctx.trajectory(), ctx.build_model().eval()
    t, k = cfg.train, ctx.k
    target = uniform_targets(ctx, reader, model)  # [K, P]
    theta = reader.params(reader.tau)
    syn = read_synsets(Path(args.run_dir) / "variants" / args.variant, "cluster")
    grads = per_group_grads(model, theta, syn.images, syn.train_targets, torch.ones(syn.images.shape[:2]), "loop")
    names = list(theta)
    if args.rated:
        if syn.layer_rates is None:
            raise SystemExit(f"{args.variant}'s synsets have no layer rates: drop --rated")
        col = {n: i for i, n in enumerate(syn.rate_names)}
        grads = [g * syn.layer_rates[:, col[n]].reshape(-1, *[1] * (g.dim() - 1)) for n, g in zip(names, grads)]
    step = -t.lr * torch.cat([g.reshape(k, -1) for g in grads], 1).double()
    bounds = torch.tensor([0] + [theta[n].numel() for n in names]).cumsum(0).tolist()
    total = target.norm(dim=1) ** 2
    print(f"run {args.run_dir}, synsets {args.variant}{' (rated)' if args.rated else ''}: relative L2 "
          f"{float(((step - target).norm(dim=1) ** 2 / total).mean()):.3f}")
    print(f"{'tensor':28s} {'size':>6s} {'share':>6s} {'cos':>7s} {'|syn|/|tgt|':>11s} {'residual':>8s}")
    for n, a, b in zip(names, bounds, bounds[1:]):
        d, s = target[:, a:b], step[:, a:b]
        print(f"{n:28s} {b - a:6d} {float((d.norm(dim=1) ** 2 / total).mean()):6.3f} "
              f"{float(F.cosine_similarity(d, s, dim=1).mean()):+7.3f} "
              f"{float((s.norm(dim=1) / d.norm(dim=1).clamp(min=1e-30)).mean()):11.2f} "
              f"{float(((d - s).norm(dim=1) ** 2 / total).mean()):8.3f}")

    def show(name: str, disp: torch.Tensor) -> None:
        cells = view_cells(stepped(model, reader.table, theta, disp, ctx.query_x, ctx.query_y), retrained,
                           ctx.query_y, cfg)
        print(f"{name:40s} " + " | ".join(f"{r[:4]} a={al:g}: Dist1 {m['dist1'][0]:5.2f} LDS {m['lds'][0]:+.3f}"
                                           for (r, al), m in cells.items()), flush=True)

    def best_scalar(d: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return s * ((d * s).sum(1).clamp(min=0) / (s * s).sum(1).clamp(min=1e-30))[:, None]  # as --layer-rates

    show("target (a perfect synset)", target)
    show("synsets", step)
    for n, a, b in zip(names, bounds, bounds[1:]):
        if float(((target[:, a:b]).norm(dim=1) ** 2 / total).mean()) > 0.01:  # tensors that hold >1 % of the target
            hybrid = step.clone()
            hybrid[:, a:b] = target[:, a:b]
            show(f"synsets, {n} = target", hybrid)
    show("synsets, one best scalar per synset", best_scalar(target, step))
    show("synsets, best scalar per tensor", torch.cat([best_scalar(target[:, a:b], step[:, a:b])
                                                       for a, b in zip(bounds, bounds[1:])], 1))

    def per_row(a: int, b: int, shape: torch.Size) -> torch.Tensor:  # one scalar per output unit of the tensor
        rows = shape[0] if len(shape) > 1 else b - a
        d, s = target[:, a:b].reshape(k * rows, -1), step[:, a:b].reshape(k * rows, -1)
        return best_scalar(d, s).reshape(k, b - a)

    rowwise = torch.cat([per_row(a, b, theta[n].shape) for n, a, b in zip(names, bounds, bounds[1:])], 1)
    print(f"best scalar per output unit: relative L2 {float(((rowwise - target).norm(dim=1) ** 2 / total).mean()):.3f}")
    show("synsets, best scalar per output unit", rowwise)


if __name__ == "__main__":
    main()
