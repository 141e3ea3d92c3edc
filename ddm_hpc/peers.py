"""Peer attribution methods for ``ddm-hpc evaluate``: TracIn (TracInCP) and TRAK, per sample and per cluster.

Both score every (query, training sample) pair on the same model and trajectory as DDM, and
:func:`to_clusters` sums a method's per-sample scores over each cluster's members so the
methods share one table.

Sign convention (all functions here): **a higher score means the training sample is more
responsible for the query's prediction** -- removing it would lower the model's probability
(TracIn: loss; TRAK: margin) of the query's label ``y_query`` (pass the true label).

* TracIn (Pruthi et al. 2020, TracInCP): ``sum_t lr_t <grad_theta l(theta_t, z_train),
  grad_theta l(theta_t, z_query)>`` with ``l`` the cross-entropy. A positive value is a
  *proponent* (a descent step on the training sample lowers the query's loss), so the raw
  value already follows the convention. Own implementation (``torch.func`` per-sample
  gradients), checked against the closed form of softmax regression in tests/test_peers.py.
* TRAK (Park et al. 2023) through the ``traker`` package (MadryLab, 0.3.2): per checkpoint,
  per-sample gradients of the margin ``f = z_y - logsumexp_{j != y} z_j`` are projected with
  traker's ``BasicProjector`` (Gaussian, a fresh matrix per checkpoint, seeded), the
  training features ``Phi (Phi^T Phi)^-1`` are formed, target features are scored against
  them, averaged over checkpoints and re-weighted by the averaged ``1 - p(y | x_train)``
  (the one-step-Newton term Q). The score is TRAK's estimate of the effect of *including*
  a training sample on the query margin: higher = more helpful, as above.

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
"""
from __future__ import annotations

import contextlib
import copy
import logging
import tempfile
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from ddm_hpc.errors import ConfigError
from ddm_hpc.storage import ParamTable
from ddm_hpc.utils import memory_budget_bytes, progress

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- input checks
def _check_inputs(model: nn.Module, table: ParamTable, checkpoints: Sequence[torch.Tensor],
                  x_train: torch.Tensor, y_train: torch.Tensor, x_query: torch.Tensor, y_query: torch.Tensor,
                  batch: int, method: str) -> None:
    """Raise a one-line ConfigError for inputs a peer method cannot score."""
    if len(checkpoints) == 0:
        raise ConfigError(f"{method} needs at least one checkpoint; pass rows of train.h5's trajectory/params")
    for i, c in enumerate(checkpoints):
        if c.numel() != table.total:
            raise ConfigError(f"{method}: checkpoint {i} has {c.numel()} values but the parameter table has "
                              f"{table.total}: use the table and trajectory of the same train.h5")
    names = [n for n, _ in model.named_parameters()]
    if sorted(names) != sorted(table.names):
        raise ConfigError(f"{method}: the model's parameters ({len(names)}) do not match the table's "
                          f"({len(table.names)}): build the model the trajectory was trained with")
    if len(list(model.buffers())):
        raise ConfigError(f"{method}: {type(model).__name__} has buffers; peers need a buffer-free model")
    for what, x, y in (("train", x_train, y_train), ("query", x_query, y_query)):
        if len(x) != len(y):
            raise ConfigError(f"{method}: x_{what} has {len(x)} rows but y_{what} has {len(y)}; pass aligned arrays")
        if len(x) == 0:
            raise ConfigError(f"{method}: no {what} samples; pass at least one")
        if y.dtype.is_floating_point or y.dim() != 1 or (y < 0).any():
            raise ConfigError(f"{method}: y_{what} must be 1-D non-negative integer labels, got {y.dtype} {tuple(y.shape)}")
    if not isinstance(batch, int) or batch < 1:
        raise ConfigError(f"{method}: batch must be a positive integer, got {batch!r}")


def _batch_for(batch: int, n_params: int, device: torch.device) -> int:
    """``batch`` capped so a [batch, P] float32 per-sample gradient block (x4 for vmap temporaries) fits."""
    cap = max(1, memory_budget_bytes(device) // max(1, 16 * n_params))
    if cap < batch:
        log.info("peers: batch %d capped to %d to fit per-sample gradients of %d parameters", batch, cap, n_params)
    return min(batch, cap)


def _ranges(n: int, batch: int) -> list[tuple[int, int]]:
    return [(i, min(i + batch, n)) for i in range(0, n, batch)]


# ----------------------------------------------------------------------------- TracIn
def per_sample_loss_grads(model: nn.Module, table: ParamTable, params: dict[str, torch.Tensor], x: torch.Tensor,
                          y: torch.Tensor) -> torch.Tensor:
    """Flat per-sample gradients of the cross-entropy.

    Args:
        model: architecture (its own parameters are ignored; ``params`` are used).
        table: parameter order of the flat output.
        params: name -> tensor on the compute device.
        x: float32 [B, ...] inputs on the device; y: int64 [B] labels.

    Returns:
        float32 [B, P]: row b = grad_theta CE(model(x_b; theta), y_b), in ``table`` order.
    """
    def loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([g[n].reshape(len(x), -1) for n in table.names], dim=1)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def tracin_scores(model: nn.Module, table: ParamTable, checkpoints: Sequence[torch.Tensor], lrs: Sequence[float],
                  x_train: torch.Tensor, y_train: torch.Tensor, x_query: torch.Tensor, y_query: torch.Tensor,
                  device: torch.device | str = "cpu", batch: int = 256, show_progress: bool = False) -> torch.Tensor:
    """TracInCP scores of every training sample for every query.

    ``score[q, i] = sum_t lr_t * <grad l(theta_t, z_i), grad l(theta_t, z_q)>`` with ``l`` the
    cross-entropy at the true labels. Higher = more responsible: a positive score marks a
    proponent, whose descent step lowers the query's loss, so removing it is expected to
    lower the query's probability of ``y_query``.

    Args:
        model: the architecture (buffer-free); its parameters are not touched.
        table: names/shapes of the flat checkpoints (``ParamTable.from_module(model)`` or train.h5's).
        checkpoints: T flat float32 [P] parameter vectors theta_t.
        lrs: T learning rates lr_t, one per checkpoint.
        x_train: float32 [N, C, H, W]; y_train: int64 [N].
        x_query: float32 [Q, C, H, W]; y_query: int64 [Q] (true labels).
        device: where gradients are computed.
        batch: training samples per per-sample-gradient call (capped to the free memory).
        show_progress: tqdm over checkpoints x batches.

    Returns:
        float32 [Q, N] on CPU.

    Raises:
        ConfigError: no checkpoints, len(lrs) != len(checkpoints), mismatched x/y lengths,
            a checkpoint that does not match the table, or a model with buffers.
    """
    _check_inputs(model, table, checkpoints, x_train, y_train, x_query, y_query, batch, "TracIn")
    if len(lrs) != len(checkpoints):
        raise ConfigError(f"TracIn: {len(lrs)} learning rates for {len(checkpoints)} checkpoints; pass one per checkpoint")
    device = torch.device(device)
    y_train, y_query = y_train.long(), y_query.long()
    batch = _batch_for(batch, table.total, device)
    ranges = _ranges(len(x_train), batch)
    scores = torch.zeros(len(x_query), len(x_train), dtype=torch.float64, device=device)
    jobs = [(t, r) for t in range(len(checkpoints)) for r in ranges]
    q_grads: torch.Tensor | None = None
    current = -1
    with _eval_mode(model), torch.no_grad():
        for t, (a, b) in progress(jobs, "TracIn", show_progress):
            params = table.unflatten(checkpoints[t].to(device=device, dtype=torch.float32))
            if t != current:  # query gradients once per checkpoint, scaled by lr_t
                q_grads = torch.cat([per_sample_loss_grads(model, table, params, x_query[i:j].to(device),
                                                           y_query[i:j].to(device))
                                     for i, j in _ranges(len(x_query), batch)]) * float(lrs[t])
                current = t
            g = per_sample_loss_grads(model, table, params, x_train[a:b].to(device), y_train[a:b].to(device))
            scores[:, a:b] += (q_grads @ g.T).double()
    return scores.float().cpu()


# ----------------------------------------------------------------------------- TRAK
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
                show_progress: bool = False) -> torch.Tensor:
    """TRAK scores (traker package, CPU-capable projector) of every training sample for every query.

    ``score[q, i] = mean_t(phi_t(z_q) (Phi_t^T Phi_t)^+ phi_t(z_i)) * mean_t(1 - p_t(y_i | x_i))``
    with ``phi_t`` the projected per-sample gradient of the margin at theta_t and ``Phi_t``
    the [N, k] matrix of the training rows. Higher = more responsible: TRAK's estimate of the
    effect of including sample i on the query's margin at ``y_query``.

    Args:
        model: the architecture (buffer-free); a copy is used, the caller's model is not touched.
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

    Returns:
        float32 [Q, N] on CPU.

    Raises:
        ConfigError: no checkpoints, mismatched x/y lengths, a checkpoint that does not match
            the table, a model with buffers, or proj_dim < 1.
    """
    _check_inputs(model, table, checkpoints, x_train, y_train, x_query, y_query, batch, "TRAK")
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
    batch = _batch_for(batch, n_params, device)
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
    train_ranges = _ranges(len(x_train), batch)
    query_ranges = _ranges(len(x_query), batch)
    jobs = [(t, r) for t in range(len(checkpoints)) for r in train_ranges]
    with tempfile.TemporaryDirectory(prefix="ddm_trak_") as tmp, _quiet_traker(show_progress), _eval_mode(net):
        traker = TRAKer(model=net, task="image_classification", train_set_size=len(x_train), save_dir=tmp,
                        device=str(device), projector=projector,
                        score_computer=_trak_score_computer(), use_half_precision=False,
                        logging_level=logging.WARNING, projector_seed=seed)

        def load(t: int) -> dict[str, torch.Tensor]:
            return dict(table.unflatten(checkpoints[t].float()))

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


# ----------------------------------------------------------------------------- clusters
def to_clusters(per_sample: torch.Tensor, assignment: torch.Tensor, k: int) -> torch.Tensor:
    """Sum per-sample scores over each cluster's members.

    Args:
        per_sample: float [Q, N] scores (e.g. from :func:`tracin_scores` / :func:`trak_scores`).
        assignment: int [N] cluster id in 0..k-1 of each training sample (clusters.h5's).
        k: number of clusters K (empty clusters get 0).

    Returns:
        [Q, K] in ``per_sample``'s dtype: ``out[q, c] = sum_{i: assignment[i] == c} per_sample[q, i]``.

    Raises:
        ConfigError: ``per_sample`` is not 2-D, the lengths differ, or an id is outside 0..k-1.
    """
    if not isinstance(assignment, torch.Tensor):
        assignment = torch.as_tensor(np.asarray(assignment))
    assignment = assignment.reshape(-1)
    if per_sample.dim() != 2:
        raise ConfigError(f"to_clusters: per-sample scores must be [Q, N], got shape {tuple(per_sample.shape)}")
    if assignment.dtype.is_floating_point:
        raise ConfigError(f"to_clusters: the assignment must hold integer cluster ids, got {assignment.dtype}")
    if len(assignment) != per_sample.shape[1]:
        raise ConfigError(f"to_clusters: {per_sample.shape[1]} scored samples but {len(assignment)} cluster "
                          "assignments; score the training set the clusters were made on")
    if not isinstance(k, int) or k < 1:
        raise ConfigError(f"to_clusters: k must be a positive integer, got {k!r}")
    if len(assignment) and (int(assignment.min()) < 0 or int(assignment.max()) >= k):
        raise ConfigError(f"to_clusters: cluster ids span {int(assignment.min())}..{int(assignment.max())} "
                          f"but k={k}; pass the K of clusters.h5")
    out = torch.zeros(per_sample.shape[0], k, dtype=per_sample.dtype, device=per_sample.device)
    return out.index_add_(1, assignment.to(per_sample.device).long(), per_sample)
