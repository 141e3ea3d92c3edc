"""``replay``: exact metagradients through the replayed training, the upper anchor of the evaluation.

Not DDM and not cheap: it differentiates the whole recorded training (``ddm_hpc.replay``) with
respect to every cluster's loss weight, once per query objective, so its online cost grows with the
number of queries (about two trainings per objective on CPU). It tells the table where the ceiling
of a first-order attribution is; DDM's job is to come close at a fraction of its per-query cost.

Objectives per query q, at theta_tau: the cross-entropy at the true label (Dist2; removing cluster k
changes it by about ``-dCE/dw_k``: the score) and the probability of the predicted class (Dist1's
first-order softmax shift ``|dp_pred/dw_k|``; for a correctly predicted query ``p_pred = exp(-CE)``,
so it needs no objective of its own). Dist3 locates the smallest shift.

Room: a method file (imports ``config``, ``context``, ``methods.base``, ``replay``, ``storage``, ``trajectory``, ``utils``).
"""
from __future__ import annotations

import time

import torch
from torch.func import functional_call

from ddm_hpc.config import Config
from ddm_hpc.context import RunContext
from ddm_hpc.errors import ConfigError
from ddm_hpc.methods.base import AttributionMethod, MethodResult
from ddm_hpc.replay import replay_metagradients
from ddm_hpc.storage import artifact_path, read_attrs
from ddm_hpc.trajectory import TrajectoryReader, load_into
from ddm_hpc.utils import PeakRSS


def query_objectives(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, pred: torch.Tensor):
    """theta -> [Q + n_wrong]: each query's CE at its label, then p_pred of the wrongly predicted ones."""
    wrong = torch.nonzero(pred != y)[:, 0]

    def objectives(theta: dict[str, torch.Tensor]) -> torch.Tensor:
        logp = functional_call(model, theta, (x,)).log_softmax(-1)
        q = torch.arange(len(y), device=logp.device)
        return torch.cat([-logp[q, y], logp[wrong, pred[wrong]].exp()])

    return objectives, wrong


class Replay(AttributionMethod, name="replay", label="Replay (exact, anchor)",
             help="exact metagradients through the replayed training (REPLAY/MAGIC), the upper anchor", scatter=True):
    def check(self, cfg: Config) -> None:
        """A trained run whose model has buffers (BatchNorm) is refused before any retraining."""
        if read_attrs(artifact_path(cfg.runtime.out, "train")) and TrajectoryReader.of_run(cfg.runtime.out).buffer_table:
            raise ConfigError("--methods replay differentiates through training, where BatchNorm statistics change at "
                              "every step; it needs a buffer-free model (nn.GroupNorm): drop replay from --methods")

    def score(self, ctx: RunContext) -> MethodResult:
        t0 = time.perf_counter()
        reader = ctx.trajectory()
        model = load_into(ctx.build_model(), reader.table, reader.flat(0)).to(ctx.device)
        x_q, y_q = ctx.query_x.to(ctx.device), ctx.query_y.to(ctx.device)
        with torch.no_grad():
            p_tau = load_into(ctx.build_model(), reader.table, reader.flat(reader.tau)).to(ctx.device).eval()(x_q)
            p_tau = p_tau.softmax(-1)
        pred = p_tau.argmax(1)
        objectives, wrong = query_objectives(model, x_q, y_q, pred)
        with PeakRSS() as mem:
            meta = replay_metagradients(model, ctx.bundle.x_train, ctx.bundle.y_train, ctx.cfg.train, ctx.cfg.seed,
                                        ctx.assignment, ctx.k, objectives, ctx.device, ctx.show_progress)
        drift = float((meta.theta_tau - reader.flat(reader.tau).cpu()).abs().max())
        q = len(y_q)
        d_ce = meta.grads[:q]  # [Q, K] dCE / dw_k
        shift = (p_tau.gather(1, y_q[:, None]).cpu().double() * d_ce).abs()  # |dp_pred/dw| where pred == label
        shift[wrong.cpu()] = meta.grads[q:].abs()
        scores = (-d_ce).float()
        note = (f"reverse-mode metagradient through all {meta.steps} SGD steps ({len(meta.grads)} objectives: CE of "
                f"each query, p_pred of the {len(wrong)} misclassified), first order in the cluster weights; replayed "
                f"theta_tau matches train.h5 to {drift:.1g}; {meta.seconds:.1f} s, peak {mem.delta / 2**20:.0f} MiB "
                "above the start")
        return MethodResult(scores, time.perf_counter() - t0,
                            per_objective={"dist1": shift.float(), "dist2": scores, "dist3": (1.0 / (1.0 + shift)).float()},
                            note=note)
