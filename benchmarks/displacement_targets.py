"""How good can a DDM synset be? Score the removal displacements a synset could be matched to, without synsets.

DDM's online step fine-tunes theta_tau on the removed clusters' synsets; to first order it moves
theta by a displacement D_k per removed cluster and a query's objective f changes by
``grad f(theta_tau) . D_k``. A synset can at best reproduce its target displacement, so scoring the
targets directly (linear in D_k, and the objective at ``theta_tau + D_k``) gives the ceiling of each
way of choosing them, before any distillation. Targets, from the recorded trajectory only:

    D_k = eta_eff (n_k / B) sum_t a_t g_k(theta_t)      (g_k: mean CE gradient over cluster k's rows)

  uniform   a_t = 1 for the tau training epochs (what summing every epoch's pairing aims at)
  last      only g_k(theta_tau)
  half-h    a_t = 2^-((tau - 1 - t) / h): epoch t's contribution decays with half-life h epochs
  early-h   a_t = 2^-(t / h): the early epochs weighted most
  fit       a_t fitted by least squares to the run's ``replay`` scores (in-sample: a diagnostic of how
            far any per-epoch weighting can go; needs ``replay`` in the run's evaluation.h5)

These rows are linear (``grad f(theta_tau) . D_k``; Dist1 by ``|grad p_pred . D_k|``). ``uniform,
stepped x f`` evaluates the objectives at theta_tau + f D_k instead, exactly what a perfect
``--target displacement`` synset gives online (the ``ddm-disp`` row's ceiling). ``--exact`` adds
the exact first-order removal displacement (forward mode through the replayed training, checked
against the ``replay`` scores), linear and stepped; ``--direct`` predicts each LDS subset by
stepping once with the sum of its removed clusters' targets (not additively).

Each row is scored exactly as ``evaluate`` scores methods (Dist1 x100 located by the Dist1 and by
the Dist2 scores, LDS), under every protocol and kept fraction of the run.

    python benchmarks/displacement_targets.py runs_gt/seed0
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import h5py
import torch
from torch.func import functional_call, grad, vmap

from ddm_hpc.distill import contribution_per_row, group_members, per_group_grads
from ddm_hpc.methods import MethodResult
from ddm_hpc.metrics import objective_values
from ddm_hpc.replay import replay_tangents
from ddm_hpc.trajectory import load_into

sys.path.insert(0, str(Path(__file__).resolve().parent))
from score_more import open_run, view_cells  # noqa: E402


def flat_grads(model, params: dict, x: torch.Tensor, y: torch.Tensor, assignment: torch.Tensor, k: int
               ) -> torch.Tensor:
    """[K, P]: each cluster's mean CE gradient at ``params`` over all its rows (the distill stage's per-group
    gradients, flattened)."""
    members, sizes = group_members(assignment, k)
    w = (torch.arange(members.shape[1])[None, :] < sizes[:, None]).float()
    grads = per_group_grads(model, params, x[members], y[members], w, "loop")
    return torch.cat([g.reshape(k, -1) for g in grads], 1)


def uniform_targets(ctx, reader, model) -> torch.Tensor:
    """float64 [K, P]: each cluster's uniform displacement target D_k = lr/(1-mu) (n_k/B) sum_t g_k(theta_t), what
    ``--target displacement`` matches (the distill stage's per-group gradients, flattened)."""
    t = ctx.cfg.train
    scale = t.lr * contribution_per_row(t, reader.tau) * torch.bincount(ctx.assignment, minlength=ctx.k).double()
    return scale[:, None] * sum(flat_grads(model, reader.params(i), ctx.bundle.x_train, ctx.bundle.y_train,
                                           ctx.assignment, ctx.k).double() for i in range(reader.tau))


def query_grads(model, params: dict, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dCE/dtheta [Q, P], dp_pred/dtheta [Q, P], pred [Q]) at ``params``."""
    with torch.no_grad():
        pred = functional_call(model, params, (x,)).argmax(1)

    def ce(p, xb, yb):
        return -(functional_call(model, p, (xb[None],)).log_softmax(-1)[0] * yb).sum()

    def pp(p, xb, c):
        return (functional_call(model, p, (xb[None],)).softmax(-1)[0] * c).sum()

    flat = lambda g: torch.cat([v.reshape(len(x), -1) for v in g.values()], 1)  # noqa: E731
    n = functional_call(model, params, (x[:1],)).shape[-1]
    oh = torch.nn.functional.one_hot
    return (flat(vmap(grad(ce), in_dims=(None, 0, 0))(params, x, oh(y, n).float())),
            flat(vmap(grad(pp), in_dims=(None, 0, 0))(params, x, oh(pred, n).float())), pred)


def result(d_ce: torch.Tensor, d_p: torch.Tensor, note: str) -> MethodResult:
    shift = d_p.abs()
    return MethodResult(d_ce.float(), 0.0, per_objective={"dist1": shift.float(), "dist2": d_ce.float(),
                                                          "dist3": (1.0 / (1.0 + shift)).float()}, note=note)


def stepped_probs(model, table, theta: dict, D: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[K, Q, L]: the queries' softmax at theta_tau + D_k (not linearised), for every row k of ``D``."""
    flat0 = table.flatten(theta).double()
    with torch.no_grad():
        return torch.stack([functional_call(model, table.unflatten((flat0 + d).float()), (x,)).softmax(-1)
                            for d in D])


def stepped(model, table, theta: dict, D: torch.Tensor, x: torch.Tensor, labels: torch.Tensor) -> MethodResult:
    """What a perfect displacement synset gives online: the objectives at theta_tau + D_k (not linearised), scored
    as the attribute stage scores a fine-tune; Dist1 located by the CE change, as ``ddm-disp`` does (the Dist1 scores,
    the softmax's distance from theta_tau's, are kept too: ``view_cells``' 'dist1 by dist1')."""
    with torch.no_grad():
        base = functional_call(model, theta, (x,)).softmax(-1)
    probs = stepped_probs(model, table, theta, D, x)
    obj = objective_values(probs, base, labels, "single")
    d_ce = (obj["dist2"] - objective_values(base[None], base, labels, "single")["dist2"]).T.float()
    return MethodResult(d_ce, 0.0, per_objective={"dist1": obj["dist1"].T.float(), "dist2": d_ce,
                                                  "dist3": obj["dist3"].T.float()}, dist1_by="dist2")


def score_stepped(model, reader, theta: dict, D: torch.Tensor, ctx, retrained, cfg) -> tuple[dict[str, float], str]:
    """One row of perfect-synset scores (:func:`stepped`, as ``evaluate`` scores a fixed-target synset method):
    ({'<removal>/dist1' and '<removal>/lds@<alpha>': mean} for ``--json`` and ``score_more.py --seeds``, the printed
    cells)."""
    cells = view_cells(stepped(model, reader.table, theta, D, ctx.query_x, ctx.query_y), retrained, ctx.query_y, cfg)
    row = {f"{r}/dist1": m["dist1"][0] for (r, _), m in cells.items()}
    row.update({f"{r}/lds@{al:g}": m["lds"][0] for (r, al), m in cells.items()})
    row.update({f"{r}/dist1 by dist1": m["dist1 by dist1"][0] for (r, _), m in cells.items()})
    text = " | ".join(f"{r[:4]} a={al:g}: D1 {m['dist1'][0]:5.2f} ({m['dist1 by dist1'][0]:5.2f}) LDS {m['lds'][0]:+.3f}"
                      for (r, al), m in cells.items())
    return row, text


def direct(model, table, theta: dict, G: torch.Tensor, scale: torch.Tensor, ctx, retrained, labels, tau: int,
           factors: list[float]) -> None:
    """LDS of the subsets' CE predicted by evaluating at theta_tau + s * sum_removed D_k (uniform targets)."""
    from ddm_hpc.metrics import gt_objectives, spearman
    flat0 = table.flatten(theta).double()
    D = scale[:, None] * G[:tau].sum(0)  # [K, P]

    for removal in ctx.cfg.evaluate.removal_list():
        for alpha in ctx.cfg.evaluate.alpha_list():
            view = retrained.view(removal, alpha)
            actual = gt_objectives(view.mask_outputs, view.gt.base, labels)["dist2"]
            for s in factors:
                with torch.no_grad():
                    ce = torch.stack([torch.nn.functional.cross_entropy(
                        functional_call(model, table.unflatten((flat0 + s * ((~m).double() @ D)).float()), (ctx.query_x,)), labels,
                        reduction="none") for m in view.masks]).double()
                print(f"direct {removal} a={alpha:g} s={s:g}: LDS {float(torch.nanmean(spearman(ce, actual))):+.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--half-lives", nargs="*", type=float, default=[0.5, 1, 2, 4])
    ap.add_argument("--direct", nargs="*", type=float, default=[], help="also predict each LDS subset directly: the "
                    "objective at theta_tau + s * (sum of the removed clusters' uniform targets), for these s")
    ap.add_argument("--step-factors", nargs="*", type=float, default=[1.0],
                    help="rows scoring the objectives at theta_tau + f * D_k (uniform targets, not linearised)")
    ap.add_argument("--exact", action="store_true", help="also the exact first-order removal displacement "
                    "-d theta_tau / d w_k (ddm_hpc.replay.replay_tangents; K jvps per step: GPU-sized)")
    ap.add_argument("--tangents", type=Path, default=None, help="with --exact: load the tangents from this .pt file "
                    "if it exists, else save them there after computing them (they are query-independent)")
    ap.add_argument("--per-epoch", action="store_true", help="also one row per single epoch's gradient")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    run = Path(args.run_dir)
    cfg, ctx, retrained = open_run(run)
    labels = ctx.query_y
    reader = ctx.trajectory()
    model = ctx.build_model().eval()
    tau, t = reader.tau, cfg.train
    x, y = ctx.bundle.x_train, ctx.bundle.y_train
    sizes = torch.bincount(ctx.assignment, minlength=ctx.k).double()
    scale = t.lr * contribution_per_row(t, tau) * sizes  # [K]: lr/(1-mu) (n_k/B) per recorded step
    G = torch.stack([flat_grads(model, reader.params(i), x, y, ctx.assignment, ctx.k)
                     for i in range(tau + 1)]).double()  # [tau+1, K, P]
    theta = reader.params(tau)
    g_ce, g_p, _ = query_grads(model, theta, ctx.query_x, labels)
    g_ce, g_p = g_ce.double(), g_p.double()
    # per-epoch linear features: F[t] = grad f(theta_tau) . eta_eff (n_k/B) g_k(theta_t), [tau+1, Q, K]
    f_ce = torch.einsum("qp,tkp->tqk", g_ce, G) * scale
    f_p = torch.einsum("qp,tkp->tqk", g_p, G) * scale

    rows: dict[str, MethodResult] = {}
    epochs = torch.arange(tau)  # training epochs 0..tau-1 (gradient at each epoch's start)

    def weighted(a: torch.Tensor, name: str) -> None:
        rows[name] = result(torch.einsum("t,tqk->qk", a, f_ce), torch.einsum("t,tqk->qk", a, f_p), name)

    weighted(torch.cat([torch.ones(tau), torch.zeros(1)]).double(), "uniform")
    weighted(torch.cat([torch.zeros(tau), torch.ones(1)]).double(), "last")
    for f in args.step_factors:
        rows[f"uniform, stepped x{f:g}"] = stepped(model, reader.table, theta, f * scale[:, None] * G[:tau].sum(0),
                                                   ctx.query_x, labels)
    for h in args.half_lives:
        weighted(torch.cat([2.0 ** (-(tau - 1 - epochs) / h), torch.zeros(1)]).double(), f"half-{h:g}")
    for h in args.half_lives:
        weighted(torch.cat([2.0 ** (-epochs / h), torch.zeros(1)]).double(), f"early-{h:g}")
    if args.per_epoch:
        for i in range(tau + 1):
            weighted(torch.eye(tau + 1, dtype=torch.float64)[i], f"epoch {i}")
    with h5py.File(run / "evaluation.h5", "r") as f:
        rep = torch.from_numpy(f["methods/replay/scores"][()]).double() if "methods/replay" in f else None
    if rep is not None:
        a = torch.linalg.lstsq(f_ce.reshape(tau + 1, -1).T, rep.reshape(-1, 1)).solution[:, 0]
        print("fitted a_t (t = 0..tau): " + " ".join(f"{v:+.2f}" for v in a.tolist()))
        weighted(a, "fit (in-sample)")
        rows["replay, CE scores only"] = result(rep, rep.abs(), "replay")  # its Dist1 by |dCE|, not replay's own rule
    if args.exact:
        import time
        t0 = time.perf_counter()
        m0 = load_into(ctx.build_model(), reader.table, reader.flat(0))
        if args.tangents is not None and args.tangents.exists():
            tangent, theta_r = torch.load(args.tangents)
        else:
            tangent, theta_r = replay_tangents(m0, x, y, t, cfg.seed, ctx.assignment, ctx.k, show_progress=True)
            if args.tangents is not None:
                torch.save((tangent, theta_r), args.tangents)
        tangent = tangent.double()
        drift = float((theta_r - torch.cat([v.reshape(-1) for v in theta.values()])).abs().max())
        print(f"exact tangents in {time.perf_counter() - t0:.0f} s; replayed theta_tau drift {drift:.1g}")
        lin = -(g_ce @ tangent.T)  # removal raises CE by -dCE/dw_k
        rows["exact, linear"] = result(lin, -(g_p @ tangent.T), "exact first-order displacement")
        with h5py.File(run / "evaluation.h5", "r") as f:
            if "methods/replay" in f:
                rep = torch.from_numpy(f["methods/replay/scores"][()]).double()
                print(f"exact linear CE scores against replay's: max |diff| {float((lin - rep).abs().max()):.2g} "
                      f"(scale {float(rep.abs().max()):.2g})")
        for f_ in args.step_factors:
            rows[f"exact, stepped x{f_:g}"] = stepped(model, reader.table, theta, -f_ * tangent, ctx.query_x, labels)
    if args.direct:
        direct(model, reader.table, theta, G, scale, ctx, retrained, labels, tau, args.direct)
    print(f"run {run}: {len(labels)} queries, K = {ctx.k}, tau = {tau}")
    for name, res in rows.items():
        cells = [f"{removal[:4]} a={alpha:g}: D1 {m['dist1'][0]:5.2f} (by D2 {m['dist1 by dist2'][0]:5.2f}) "
                 f"LDS {m['lds'][0]:+.3f}" for (removal, alpha), m in view_cells(res, retrained, labels, cfg).items()]
        print(f"{name:16s} " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
