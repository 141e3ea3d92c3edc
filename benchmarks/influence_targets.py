"""How good is the damped influence displacement as a synset's target? Score it perfectly reproduced, no distillation.

``--target influence`` matches each cluster's synset at theta_tau to the damped Newton step of removing it,
D_k = (F + lambda I)^-1 (sum_{i in D_k} grad l_i(theta_tau)) / N (``ddm_hpc.distill.Matcher.set_influence_targets``,
the pipeline's own code, used here). This scores D_k as a perfect synset would give it online (the objectives at
theta_tau + D_k, Dist1 located by the CE change, exactly as ``evaluate`` scores ``ddm-inf``), beside the uniform
target of ``ddm-disp`` (the summed trajectory gradient) and, with ``--tangents``, the exact first-order removal
displacement (saved by ``displacement_targets.py --exact --tangents F``), with each row's cosine to it.

Rows: the empirical Fisher (per-row gradients at their labels, what the pipeline uses) at the automatic ridge
(weight decay + (1 - momentum) / (lr x steps)) and at ``--dampings`` instead; ``--fisher-rows n ...``: estimated on
n random rows; ``--fisher-ranks r ...``: its top r eigenpairs (``--fisher-rank``); ``--mc``: the Fisher with labels
sampled from the model (unbiased for the Gauss-Newton matrix);
``--ggn``: the exact Gauss-Newton matrix (every class's log-probability gradient, eigendecomposed: P x P, minutes).

    OMP_NUM_THREADS=2 python benchmarks/influence_targets.py runs_gt/seed0 --tangents tangents_seed0.pt --mc --ggn
    python benchmarks/score_more.py --seeds inf_seed0.json inf_seed1.json inf_seed2.json
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call, jacrev, vmap

from ddm_hpc.config import DistillConfig
from ddm_hpc.distill import Matcher, damped_fisher_solve, influence_damping, influence_rows, per_group_grads

sys.path.insert(0, str(Path(__file__).resolve().parent))
from displacement_targets import flat_grads, score_stepped, uniform_targets  # noqa: E402
from score_more import open_run  # noqa: E402


def pipeline_targets(ctx, reader, model, damping: float, fisher_rows: int, rank: int = 0) -> torch.Tensor:
    """float64 [K, P]: lr x the --target influence targets of every cluster (their displacements), by the pipeline."""
    cfg = ctx.cfg
    n = len(ctx.bundle.y_train)
    m = Matcher(model, reader, ctx.bundle.x_train, ctx.bundle.y_train, ctx.assignment, ctx.k, DistillConfig(),
                torch.device("cpu"))
    m.set_influence_targets(cfg.train.lr, influence_damping(cfg.train, n, damping),
                            influence_rows(n, fisher_rows, cfg.seed), rank=rank, seed=cfg.seed)
    return torch.cat([v.reshape(ctx.k, -1) for v in m.targets], 1).double() * cfg.train.lr


def sampled_label_rows(model, theta: dict, x: torch.Tensor, seed: int) -> torch.Tensor:
    """float64 [N, P]: per-row CE gradients at labels drawn from the model's own softmax (a Monte Carlo Fisher), by
    the distill stage's ``per_group_grads`` with one row per group."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for lo in range(0, len(x), 256):
        xb = x[lo:lo + 256]
        with torch.no_grad():
            yb = torch.multinomial(functional_call(model, theta, (xb,)).softmax(-1), 1, generator=gen)[:, 0]
        g = per_group_grads(model, theta, xb[:, None], yb[:, None], torch.ones(len(xb), 1), "loop")
        out.append(torch.cat([v.reshape(len(xb), -1) for v in g], 1).double())
    return torch.cat(out)


def ggn(model, theta: dict, x: torch.Tensor) -> torch.Tensor:
    """float64 [P, P]: the Gauss-Newton matrix of the mean CE, (1/N) sum_i sum_c p_ic g_ic g_ic^T with g_ic the
    gradient of log p_c(x_i) (since diag(p) - p p^T = sum_c p_c (e_c - p)(e_c - p)^T)."""
    names = list(theta)

    def logp(p, xb):
        return functional_call(model, p, (xb[None],)).log_softmax(-1)[0]

    size = sum(v.numel() for v in theta.values())
    g = torch.zeros(size, size, dtype=torch.float64)
    for lo in range(0, len(x), 250):
        xb = x[lo:lo + 250]
        with torch.no_grad():
            pr = functional_call(model, theta, (xb,)).softmax(-1).double()
        jac = vmap(jacrev(logp), in_dims=(None, 0))(theta, xb)
        jac = torch.cat([jac[n].reshape(len(xb), pr.shape[1], -1) for n in names], 2).double()
        rows = (jac * pr.sqrt()[..., None]).reshape(-1, size)
        g += rows.T @ rows
    return g / len(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--tangents", type=Path, help="(tangents [K, P], theta_tau) of this run, for the exact row and "
                    "each row's cosine to it")
    ap.add_argument("--dampings", nargs="*", type=float, default=[], help="ridges besides weight decay to add rows "
                    "for (the automatic one is always a row)")
    ap.add_argument("--fisher-rows", nargs="*", type=int, default=[], help="also rows with the Fisher on n random rows")
    ap.add_argument("--fisher-ranks", nargs="*", type=int, default=[], help="also rows with the Fisher's top r "
                    "eigenpairs (--fisher-rank r)")
    ap.add_argument("--mc", action="store_true", help="also the Fisher at labels sampled from the model")
    ap.add_argument("--ggn", action="store_true", help="also the exact Gauss-Newton matrix (minutes)")
    ap.add_argument("--json", help="also write {row: {'<removal>/<metric>[@alpha]': mean}} here (for --seeds)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cfg, ctx, retrained = open_run(args.run_dir)
    reader, model = ctx.trajectory(), ctx.build_model().eval()
    theta = {k: v.detach() for k, v in reader.params(reader.tau).items()}
    n = len(ctx.bundle.y_train)
    auto = influence_damping(cfg.train, n)
    rows = {"uniform target (ddm-disp's)": uniform_targets(ctx, reader, model)}
    de = None
    if args.tangents:
        de = -torch.load(args.tangents)[0].double()
        if de.shape != rows["uniform target (ddm-disp's)"].shape:
            raise SystemExit(f"{args.tangents} holds tangents of shape {tuple(de.shape)}, not this run's: give the "
                             "tangents of this run")
        rows["exact target"] = de
    rows[f"influence, empirical Fisher, lambda auto = {auto:.4g}"] = pipeline_targets(ctx, reader, model, 0.0, 0)
    for d in args.dampings:
        rows[f"influence, empirical Fisher, lambda = {cfg.train.weight_decay + d:.4g}"] = pipeline_targets(
            ctx, reader, model, d, 0)
    for r in args.fisher_rows:
        rows[f"influence, empirical Fisher on {r} rows, lambda auto"] = pipeline_targets(ctx, reader, model, 0.0, r)
    for r in args.fisher_ranks:
        rows[f"influence, empirical Fisher of rank {r}, lambda auto"] = pipeline_targets(ctx, reader, model, 0.0, 0, r)
    sums = flat_grads(model, theta, ctx.bundle.x_train, ctx.bundle.y_train, ctx.assignment, ctx.k).double() * \
        torch.bincount(ctx.assignment, minlength=ctx.k).double()[:, None] / n  # sum_{i in k} grad l_i / N
    if args.mc:
        rows["influence, sampled-label Fisher, lambda auto"] = damped_fisher_solve(
            sampled_label_rows(model, theta, ctx.bundle.x_train, cfg.seed), sums, auto)
    if args.ggn:
        g = ggn(model, theta, ctx.bundle.x_train)
        rows["influence, Gauss-Newton, lambda auto"] = torch.linalg.solve(
            g + auto * torch.eye(len(g), dtype=g.dtype), sums.T).T
    out = {}
    for name, d in rows.items():
        out[name], text = score_stepped(model, reader, theta, d, ctx, retrained, cfg)
        cos = f"cos to exact {float(F.cosine_similarity(d, de, dim=1).mean()):.3f} | " if de is not None else ""
        print(f"{name:52s} {cos}{text}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
