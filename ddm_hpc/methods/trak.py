"""TRAK as an attribution method: per-sample scores summed per cluster.

TRAK (Park et al. 2023) through the ``traker`` package (MadryLab, 0.3.2): per checkpoint,
per-sample gradients of the margin ``f = z_y - logsumexp_{j != y} z_j`` are projected with
traker's ``BasicProjector`` (Gaussian, a fresh matrix per checkpoint, seeded), the
training features ``Phi (Phi^T Phi)^-1`` are formed, target features are scored against
them, averaged over checkpoints and re-weighted by the averaged ``1 - p(y | x_train)``
(the one-step-Newton term Q). The score is TRAK's estimate of the effect of *including*
a training sample on the query margin: higher = more helpful, the toolkit's sign convention.

Departure from traker's default score computer, on purpose: traker divides each
checkpoint's ``(Phi^T Phi)^-1`` by its mean absolute entry (a guard against float16
overflow) and inverts in float32. Here features are kept in float32 (no half precision),
``Phi^T Phi`` is formed and pseudo-inverted in float64 (eigenvalues below 1e-10 x the
largest dropped: float32 noise of degenerate directions), and no per-checkpoint rescaling is
applied, so scores are the textbook estimator (exactly the closed form for one checkpoint
without projection) and checkpoints are ensembled with equal weights. With
``proj_dim >= P`` no projection is applied (``NoOpProjector``).

traker 0.3.2 quirks handled here: its store lives in a temporary directory (deleted on
return); the device is passed as a string (traker compares ``device == "cpu"``); the
projector keeps its matrix through ``finalize_features`` (see ``_keep_projector_class``);
its tqdm bars follow ``show_progress`` and its ``logging.basicConfig()`` is undone.

Room: a method file (imports ``context``, ``methods.base``, ``methods.peers``, ``storage``); the
``traker`` package is imported where it is used (deferred: heavy, and only this method needs it).
"""
from __future__ import annotations

import contextlib
import copy
import logging
import tempfile
import time
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from ddm_hpc.context import RunContext
from ddm_hpc.errors import ConfigError
from ddm_hpc.methods.base import AttributionMethod, MethodResult
from ddm_hpc.methods.peers import batch_for, batch_ranges, check_inputs, checkpoints, eval_mode, to_clusters
from ddm_hpc.storage import ParamTable
from ddm_hpc.utils import progress

log = logging.getLogger(__name__)


def _trak_score_computer():
    """traker's BasicScoreComputer with float64 Phi^T Phi, a pseudo-inverse and no per-checkpoint rescaling."""
    from trak.score_computers import BasicScoreComputer

    class ExactScoreComputer(BasicScoreComputer):
        def get_xtx(self, grads: torch.Tensor) -> torch.Tensor:
            g = torch.as_tensor(grads, device=self.device).double()
            return g.T @ g

        def get_x_xtx_inv(self, grads: torch.Tensor, xtx: torch.Tensor) -> torch.Tensor:
            xtx = xtx.double() + self.lambda_reg * torch.eye(len(xtx), dtype=torch.float64, device=xtx.device)
            # Eigenvalues below 1e-10 x the largest (singular values of Phi below 1e-5 x the
            # largest) are float32 rounding noise of exactly-degenerate directions (e.g. the
            # margin gradients of softmax regression sum to zero over classes): drop them.
            inv = torch.linalg.pinv(xtx, rtol=1e-10, hermitian=True)
            return (torch.as_tensor(grads, device=self.device).double() @ inv).to(self.dtype)

    return ExactScoreComputer


def _keep_projector_class():
    """traker's BasicProjector that keeps its matrix through ``finalize_features``.

    traker 0.3.2 frees the matrix in ``finalize_features`` but, with a single block
    (``block_size == proj_dim``), regenerates it only when the checkpoint id changes, so
    scoring the last featurized checkpoint fails with AttributeError; keeping it avoids that.
    """
    from trak.projectors import BasicProjector

    class KeepProjector(BasicProjector):
        def free_memory(self) -> None:
            pass

    return KeepProjector


@contextlib.contextmanager
def _quiet_traker(show_progress: bool) -> Iterator[None]:
    """Route traker's tqdm bars through ``utils.progress`` and undo its ``logging.basicConfig()``."""
    import trak.traker

    handlers, level = list(logging.root.handlers), logging.root.level
    original = trak.traker.tqdm
    trak.traker.tqdm = lambda it, desc="", **_: progress(it, desc.rstrip("."), show_progress)
    try:
        yield
    finally:
        trak.traker.tqdm = original
        logging.root.handlers[:] = handlers
        logging.root.setLevel(level)


def trak_scores(model: nn.Module, table: ParamTable, checkpoints: Sequence[torch.Tensor],
                x_train: torch.Tensor, y_train: torch.Tensor, x_query: torch.Tensor, y_query: torch.Tensor,
                proj_dim: int = 512, seed: int = 0, device: torch.device | str = "cpu", batch: int = 256,
                show_progress: bool = False, buffers: Sequence[dict[str, torch.Tensor]] | None = None) -> torch.Tensor:
    """TRAK scores (traker package, CPU-capable projector) of every training sample for every query.

    ``score[q, i] = mean_t(phi_t(z_q) (Phi_t^T Phi_t)^+ phi_t(z_i)) * mean_t(1 - p_t(y_i | x_i))``
    with ``phi_t`` the projected per-sample gradient of the margin at theta_t and ``Phi_t``
    the [N, k] matrix of the training rows. Higher = more responsible: TRAK's estimate of the
    effect of including sample i on the query's margin at ``y_query``.

    Args:
        model: the architecture; a copy is used (in eval mode), the caller's model is not touched.
        table: names/shapes of the flat checkpoints.
        checkpoints: T flat float32 [P] parameter vectors (TRAK's ensemble).
        x_train: float32 [N, C, H, W]; y_train: int64 [N].
        x_query: float32 [Q, C, H, W]; y_query: int64 [Q] (true labels).
        proj_dim: k, dimension of the random Gaussian projection; ``proj_dim >= P`` uses the
            raw gradients. TRAK needs N >= k for ``Phi^T Phi`` to be invertible; otherwise
            the pseudo-inverse is used (with a warning).
        seed: projection seed (checkpoint t uses traker's seed derived from ``seed`` and t).
        device: where gradients, projections and inverses are computed.
        batch: samples per per-sample-gradient call (capped to the free memory).
        show_progress: tqdm over checkpoints x batches (and traker's finalising bars).
        buffers: per checkpoint, its buffers (BatchNorm statistics), or None for a buffer-free model.

    Returns:
        float32 [Q, N] on CPU.

    Raises:
        ConfigError: no checkpoints, mismatched x/y lengths, a checkpoint that does not match
            the table, or proj_dim < 1.
    """
    check_inputs(model, table, checkpoints, x_train, y_train, x_query, y_query, batch, "TRAK")
    if not isinstance(proj_dim, int) or proj_dim < 1:
        raise ConfigError(f"TRAK: proj_dim must be a positive integer, got {proj_dim!r}")
    try:
        from trak import TRAKer
        from trak.projectors import NoOpProjector, ProjectionType
        _KeepProjector = _keep_projector_class()
    except ImportError:  # pragma: no cover - depends on the environment
        raise ConfigError("TRAK needs the traker package: pip install -c constraints.txt traker==0.3.2") from None
    device = torch.device(device)
    n_params = table.total
    k = min(proj_dim, n_params)
    if len(x_train) < k:
        log.warning("TRAK: %d training samples < projection dim %d: Phi^T Phi is singular, using its "
                    "pseudo-inverse; lower proj_dim below N for the standard estimator", len(x_train), k)
    batch = batch_for(batch, n_params, device)
    y_train, y_query = y_train.long(), y_query.long()
    net = copy.deepcopy(model).to(device).float()
    if proj_dim >= n_params:
        projector = NoOpProjector(grad_dim=n_params, proj_dim=0, device=device)
    else:
        # The Gaussian matrix is held in one block up to 256 MiB (convnet width 32: P = 24k, one
        # block); beyond that traker regenerates ceil(k / block) blocks for every batch.
        block = max(1, min(k, (64 << 20) // n_params))
        projector = _KeepProjector(grad_dim=n_params, proj_dim=k, seed=seed, proj_type=ProjectionType.normal,
                                   device=device, block_size=block, dtype=torch.float32)
    train_ranges = batch_ranges(len(x_train), batch)
    query_ranges = batch_ranges(len(x_query), batch)
    jobs = [(t, r) for t in range(len(checkpoints)) for r in train_ranges]
    with tempfile.TemporaryDirectory(prefix="ddm_trak_") as tmp, _quiet_traker(show_progress), eval_mode(net):
        traker = TRAKer(model=net, task="image_classification", train_set_size=len(x_train), save_dir=tmp,
                        device=str(device), projector=projector,
                        score_computer=_trak_score_computer(), use_half_precision=False,
                        logging_level=logging.WARNING, projector_seed=seed)

        def load(t: int) -> dict[str, torch.Tensor]:
            return {**table.unflatten(checkpoints[t].float()), **(buffers[t] if buffers else {})}

        current = -1
        for t, (a, b) in progress(jobs, "TRAK featurize", show_progress):
            if t != current:
                traker.load_checkpoint(load(t), model_id=t)
                current = t
            traker.featurize(batch=(x_train[a:b].to(device), y_train[a:b].to(device)), num_samples=b - a)
        traker.finalize_features()
        for t in progress(range(len(checkpoints)), "TRAK score", show_progress):
            traker.start_scoring_checkpoint(exp_name="queries", checkpoint=load(t), model_id=t,
                                            num_targets=len(x_query))
            for a, b in query_ranges:
                traker.score(batch=(x_query[a:b].to(device), y_query[a:b].to(device)), num_samples=b - a)
        scores = traker.finalize_scores(exp_name="queries")  # [N, Q] numpy memmap
        out = torch.from_numpy(np.array(scores, dtype=np.float32)).T.contiguous()
        del traker, scores
    return out


class TRAK(AttributionMethod, name="trak", label="TRAK (peer)", help="TRAK, the traker package, CPU projector",
           scatter=True):
    def score(self, ctx: RunContext) -> MethodResult:
        t0 = time.perf_counter()
        model, table, ckpts, bufs = checkpoints(ctx)
        ec = ctx.cfg.evaluate
        per = trak_scores(model, table, ckpts, ctx.bundle.x_train, ctx.bundle.y_train, ctx.query_x, ctx.query_y,
                          proj_dim=ec.proj_dim, seed=ctx.cfg.seed, device=ctx.device, show_progress=ctx.show_progress,
                          buffers=bufs)
        s = to_clusters(per, ctx.assignment, ctx.k)
        return MethodResult(s, time.perf_counter() - t0,
                            note=f"TRAK, proj_dim {ec.proj_dim}, {len(ckpts)} checkpoints, summed per cluster")
