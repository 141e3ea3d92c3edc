"""How good is the damped influence displacement as a synset's target? Score it perfectly reproduced, no distillation.

``--target influence`` matches each cluster's synset at theta_tau to the damped Newton step of removing it,
D_k = (F + lambda I)^-1 (sum_{i in D_k} grad l_i(theta_tau)) / N (``ddm_hpc.distill.Matcher.set_influence_targets``,
the pipeline's own code, used here). This scores D_k as a perfect synset would give it online (the objectives at
theta_tau + D_k, Dist1 located by the CE change, and in brackets by the Dist1 scores, the rule ``evaluate`` uses for
``ddm-inf`` and the default ``ddm``), beside the uniform
target of ``ddm-disp`` (the summed trajectory gradient) and, with ``--tangents``, the exact first-order removal
displacement (saved by ``displacement_targets.py --exact --tangents F``), with each row's cosine to it.

Rows: the empirical Fisher (per-row gradients at their labels, what the pipeline uses) at the automatic ridge
(weight decay + (1 - momentum) / (lr x steps)) and at ``--dampings`` instead; ``--fisher-rows n ...``: estimated on
n random rows; ``--fisher-ranks r ...``: its top r eigenpairs (``--fisher-rank``); ``--mc``: the Fisher with labels
sampled from the model (unbiased for the Gauss-Newton matrix);
``--ggn``: the exact Gauss-Newton matrix (every class's log-probability gradient, eigendecomposed: P x P, minutes).
``--projections r ...``: the automatic row's target split along F's eigenvectors, its part in the top r
directions and the rest, each scored alone, with the share of |D_k|^2 each holds (where do the outputs read a
target?). ``--checkpoints J``: the target computed as at theta_{tau-j} for j < J (the Fisher and the cluster sums at
that checkpoint), and the means of the first 2..J of them (a checkpoint ensemble), all stepped from theta_tau.
``--rate-rules``: the run's own cluster synsets' one rated step (``synsets.h5``) with its stored least-squares
per-tensor rates (it reproduces the evaluated ``ddm`` row's LDS), and with rates that give each tensor's step the
target's length instead, |T_l| / |g_l| (and the geometric middle of the two); and the stored step with one parameter
tensor replaced by its target (tensors holding >= 0.5 % of the parameters or of |D|^2): where the synsets' gap sits.
``--unlearning``: also each row as an unlearning step, the softmax at theta_tau + c D_k against the exact retraining
without cluster k (mean L2 over the queries and the leave-one-out clusters, x100, as ``diagnose`` measures unlearning
on the test set), for each scale c in ``UNLEARN_SCALES``; c = 0 is doing nothing.

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
from displacement_targets import flat_grads, score_stepped, stepped_probs, uniform_targets  # noqa: E402
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


def fisher_eigvecs(model, theta: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """float64 [P, n]: the empirical Fisher's eigenvectors (per-row CE gradients at the training labels, as the
    pipeline's Fisher), by the n x n row kernel, in decreasing order of eigenvalue; directions with eigenvalue 0 left
    out."""
    rows = []
    for lo in range(0, len(x), 256):
        g = per_group_grads(model, theta, x[lo:lo + 256, None], y[lo:lo + 256, None], torch.ones(len(x[lo:lo + 256]), 1),
                            "loop")
        rows.append(torch.cat([v.reshape(len(g[0]), -1) for v in g], 1).double())
    m = torch.cat(rows)
    vals, u = torch.linalg.eigh(m @ m.T)
    keep = vals > vals.max() * 1e-12
    vals, u = vals[keep].flip(0), u[:, keep].flip(1)
    return (m.T @ u) / vals.sqrt()


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


UNLEARN_SCALES = (0.0, 0.25, 0.5, 0.75, 1.0)  # --unlearning: multiples of each row's displacement; 0 = do nothing


def unlearning_distances(model, table, theta: dict, D: torch.Tensor, x: torch.Tensor,
                         views: dict[str, object]) -> dict[str, dict[float, float]]:
    """{protocol: {c: mean over the leave-one-out clusters k and the queries of |softmax(theta_tau + c D_k) -
    exact_k|_2}} for c in ``UNLEARN_SCALES`` (exact_k: the retraining without cluster k in that protocol's view).
    The stepped outputs are computed once per scale and shared by the protocols."""
    out: dict[str, dict[float, float]] = {name: {} for name in views}
    for c in UNLEARN_SCALES:
        probs = stepped_probs(model, table, theta, c * D, x)
        for name, view in views.items():
            out[name][c] = float((probs[view.removed] - view.gt.outputs).norm(dim=-1).mean())
    return out


class _Earlier:
    """A trajectory whose last checkpoint is theta_{tau-j}: the pipeline's influence targets computed there."""

    def __init__(self, reader, j: int):
        self.reader, self.tau = reader, reader.tau - j

    def params(self, t: int):
        return self.reader.params(t)

    def buffers(self, t: int):
        return self.reader.buffers(t)


def rate_rule_rows(path: Path, ctx, model, theta: dict, D: torch.Tensor, lr: float) -> dict[str, torch.Tensor]:
    """The run's cluster synsets' one-step displacements -lr a_kl grad_l L(theta_tau; S_k) [K, P] under each rate rule."""
    import h5py
    with h5py.File(path, "r") as f:
        if "cluster/layer_rates" not in f:
            raise SystemExit(f"{path} has no cluster layer rates: --rate-rules needs --layer-rates synsets")
        images, labels, stored = (torch.from_numpy(f[f"cluster/{k}"][()]) for k in ("images", "targets", "layer_rates"))
    k, ipc = images.shape[:2]
    steps = [-lr * v.double().reshape(k, -1) for v in per_group_grads(model, theta, images, labels, torch.ones(k, ipc),
                                                                     "loop")]
    parts = D.split([v.shape[1] for v in steps], 1)
    dots = torch.stack([(a * t).sum(1) for a, t in zip(steps, parts)], 1)  # [K, n_tensors]
    n2 = torch.stack([a.pow(2).sum(1) for a in steps], 1).clamp(min=1e-30)
    t2 = torch.stack([t.pow(2).sum(1) for t in parts], 1)
    length = (dots > 0) * (t2 / n2).sqrt()
    rules = {"synsets, stored least-squares rates": stored.double(), "synsets, rates to the target's length": length,
             "synsets, geometric middle of the two": (stored.double() * length).sqrt()}
    out = {name: torch.cat([a[:, i:i + 1] * v for i, v in enumerate(steps)], 1) for name, a in rules.items()}
    names, rated = list(theta), out["synsets, stored least-squares rates"]
    bounds = torch.tensor([0] + [v.shape[1] for v in steps]).cumsum(0).tolist()
    for i, name in enumerate(names):  # where does the synsets' gap to a perfect one sit? one tensor made perfect
        if bounds[i + 1] - bounds[i] >= 0.005 * D.shape[1] or D[:, bounds[i]:bounds[i + 1]].pow(2).sum() >= \
                0.005 * D.pow(2).sum():
            hybrid = rated.clone()
            hybrid[:, bounds[i]:bounds[i + 1]] = D[:, bounds[i]:bounds[i + 1]]
            share = float((D[:, bounds[i]:bounds[i + 1]].pow(2).sum(1) / D.pow(2).sum(1)).mean())
            cos = float((dots[:, i] / (n2[:, i] * t2[:, i]).sqrt().clamp(min=1e-30)).mean())
            out[f"synsets, {name} (cos {cos:.2f}) replaced by its target ({share:.2f} of |D|^2)"] = hybrid
    return out


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
    ap.add_argument("--projections", nargs="*", type=int, default=[], help="also the automatic row's part in the "
                    "Fisher's top r eigen-directions, and the rest, each alone")
    ap.add_argument("--checkpoints", type=int, default=0, metavar="J", help="also the target as at theta_{tau-j}, "
                    "j < J, and the means of the first 2..J")
    ap.add_argument("--rate-rules", action="store_true", help="also the run's synsets' rated step under other rate rules")
    ap.add_argument("--synsets", type=Path, help="--rate-rules: these synsets.h5 (e.g. RUN/variants/V/synsets.h5, "
                    "distilled on this run's trajectory and clusters) instead of RUN/synsets.h5")
    ap.add_argument("--unlearning", action="store_true", help="also each row as an unlearning step: its softmax's "
                    "distance to the exact leave-one-out retraining at scales UNLEARN_SCALES")
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
    main_row = rows[f"influence, empirical Fisher, lambda auto = {auto:.4g}"] = pipeline_targets(ctx, reader, model,
                                                                                                 0.0, 0)
    if args.projections:
        vecs = fisher_eigvecs(model, theta, ctx.bundle.x_train, ctx.bundle.y_train)
        for r in args.projections:
            top = (main_row @ vecs[:, :r]) @ vecs[:, :r].T
            share = float((top.pow(2).sum(1) / main_row.pow(2).sum(1)).mean())
            rows[f"influence, top {r} Fisher directions only ({share:.2f} of |D|^2)"] = top
            rows[f"influence, without the top {r} ({1 - share:.2f} of |D|^2)"] = main_row - top
    if args.checkpoints > reader.tau:
        raise SystemExit(f"--checkpoints {args.checkpoints}: the trajectory has {reader.tau + 1} checkpoints")
    earlier = [main_row] + [pipeline_targets(ctx, _Earlier(reader, j), model, 0.0, 0) for j in range(1, args.checkpoints)]
    for j in range(1, args.checkpoints):
        rows[f"influence as at theta_(tau-{j})"] = earlier[j]
    for j in range(2, args.checkpoints + 1):
        rows[f"influence, mean over theta_tau..theta_(tau-{j - 1})"] = sum(earlier[:j]) / j
    if args.rate_rules:
        rows.update(rate_rule_rows(args.synsets or Path(args.run_dir) / "synsets.h5", ctx, model, theta, main_row,
                                   cfg.train.lr))
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
        if args.unlearning:
            views = {r: retrained.view(r, cfg.evaluate.alpha_list()[0]) for r in cfg.evaluate.removal_list()}
            dists = unlearning_distances(model, reader.table, theta, d, ctx.query_x, views)
            for removal, dist in dists.items():
                out[name].update({f"{removal}/unlearn@{c:g}": v for c, v in dist.items()})
            print(f"{'':52s} unlearning, L2 to exact x100: " + " | ".join(
                f"{r[:4]}: " + " ".join(f"x{c:g} {100 * v:.3f}" for c, v in dist.items()) for r, dist in dists.items()),
                flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
