"""Stage ``distill``: learn a tiny synset S_k per group by (reverse) gradient matching.

Each step samples a trajectory index t and pairs it (``pairing``):
  reverse (Eq. 6):   real gradient at theta_t,  synthetic gradient at theta_{tau-t}
  alg1 (Algorithm 1): real at theta_t,           synthetic at theta_{t+s}, t+s < tau
  same (DDM-match):  both at theta_t
then minimises ``matching_loss(real, syn, sign)`` over the synthetic images, where sign=-1
compares grad L(theta', S_k) with -grad L(theta_t, D_k) (reverse matching) and sign=+1 with
+grad (forward matching). All groups' gradients in a step come from one ``vmap(grad(...))``
call per side (chunked over groups to bound memory), not a loop of K backward passes; the
synthetic side keeps its graph so the loss backpropagates to the images (double backward).

``--target displacement`` (not in the paper) replaces the sampled pairs with one fixed target per
group, its whole contribution to training: T_k = sum_{t < tau} (n_k / (B (1 - momentum))) mean
grad L(theta_t; D_k), computed once over all of the group's rows (:meth:`Matcher.set_displacement_targets`),
and matches the synthetic gradient at theta_tau, where the online fine-tune starts, by relative L2
over every parameter: |grad L(theta_tau; S_k) + T_k|^2 / |T_k|^2. One unweighted fine-tune step of
rate lr on S_k then moves theta_tau by lr T_k, what the group's rows added to it (to first order,
without the later epochs' contraction). Each step costs the synthetic side only.

``--target influence`` (not in the paper) keeps that matching and changes the target to the damped Newton step of
removing the group at theta_tau: T_k = (F + lambda I)^-1 (sum_{i in D_k} grad l_i(theta_tau)) / (N lr), with F the
empirical Fisher of the training rows at theta_tau (per-row gradients, one pass) and lambda the weight decay plus
(1 - momentum) / (lr x optimizer steps), the ridge that stopping after that many steps amounts to
(:func:`influence_damping`): directions flatter than that keep the summed-gradient step, steeper ones, which later
training contracts, get the Newton step (:meth:`Matcher.set_influence_targets`, :func:`damped_fisher_solve`). No
trajectory sum and no retraining: the scale is the training's own. ``--fisher-rank r`` keeps F's top r eigenpairs
(:func:`low_rank_fisher`, streamed: P x r memory) where the exact F does not fit. ``--tensor-weights fisher-sqrt``
(the default) weighs each parameter tensor's residual in the training loss by the square root of its mean Fisher
diagonal (:meth:`Matcher._fisher_tensor_weights`, one more pass of per-row gradients), ``fisher`` by the diagonal
itself, ``none`` equally; the reported losses stay unweighted.

``--augment`` (DSA, paper sec. 4.1; :mod:`ddm_hpc.augment`): each step, every group takes one augmentation draw
from its own generator, applied alike to its sampled real rows (before the real gradient) and to its synthetic
images (differentiably, before the synthetic gradient): the siamese rule. The fixed evaluation before and after
(``init_loss``, ``final_loss``, the gradient norms the matched fine-tune scale reads) is unaugmented: the synsets are
used unaugmented downstream, and the numbers stay comparable with and without ``--augment``.

Real minibatches: up to ``batch_real`` members of each group, drawn without replacement and
padded to a common size with zero weights, so each group's gradient is the exact mean over
its own sample.

Sharding (``--shards``): groups are computed in blocks of ``--group-chunk`` (``DistillConfig.block``)
consecutive groups, one synthetic-side ``vmap`` call per block, and the blocks of every level (K
cluster groups, then L class groups) are the work items: each task distils a contiguous run of
blocks and writes its own shard, and the merge step concatenates them into ``synsets.h5``. The
result is the same for any shard count: every group draws its init and minibatches from its own
generator (``generator(seed, salt, g)``), the trajectory pairs are one sequence shared by all
groups, each group's images are their own optimizer tensor, and a block is computed the same way
whichever task runs it (bit for bit on CPU; GPU kernels may differ in the last bits).

Artifact ``synsets.h5`` has one group per level (``cluster``: K groups, ``class``: L groups):
  <level>/images       float32 [G, ipc, C, H, W]  (normalised input space)
  <level>/labels       int64 [G, ipc]             class of the group
  <level>/group_class  int64 [G]
  <level>/loss_history float32 [steps]            mean matching loss per group at each step
  <level>/init_loss, <level>/final_loss float32 [G]  loss on fixed evaluation pairs, before/after
  attrs: method, pairing, sign, distance, include_1d, unlearn_direction (+1: fine-tune by
         descent on the removed synsets, ddm; -1: by ascent, ddm-match), target (pairs or
         displacement or influence; absent in files made before it), augment (the DSA parts matched with, joined by _;
         only with --augment) + provenance
  <level>/layer_rates  float32 [G, n_tensors]     --layer-rates: each synset's rate per parameter tensor (attr
                                                  layer_rate_names), fitted to its target
  contraction          float32 [n_tensors]        --contraction m: one factor per tensor for every synset's rates,
  contraction_kept     bool [m, K]                fitted to m retrainings without random halves of the clusters
                                                  (their kept clusters); the one-step fine-tune uses rates x factor
(read back by ``ddm_hpc.synsets``).

``--contraction``: one fine-tune step on S_k at the fitted rates moves theta_tau by the cluster's uniform
target, the sum of its trajectory gradients; later training shrinks each layer's share of a removal, and not
by the same amount (benchmarks/contraction_factors.py: the uniform target is 4-5x the exact first-order
displacement and nearly orthogonal to it, the classifier-side layers keep more of it than the convolutions). The
merge step retrains without m random halves of the clusters and scales each tensor's rates by the least-squares
factor that makes the removed clusters' summed steps reproduce those retrainings (:func:`fit_contraction`): m
trainings, counted in distill's seconds.

Room: a stage (imports ``augment``, ``config``, ``context``, ``launch``, ``models``, ``retrain``, ``storage``,
``trajectory`` and ``kernels``).
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, vmap

from kernels import matching_loss, triton_usable

from ddm_hpc import augment
from ddm_hpc.config import Config, DistillConfig, TrainConfig
from ddm_hpc.context import RunContext
from ddm_hpc.errors import ConfigError, StageError
from ddm_hpc.launch import run_sharded, shard_range
from ddm_hpc.models import forward_with
from ddm_hpc.retrain import retrain_without
from ddm_hpc.storage import artifact_path, atomic_h5, create_dataset, open_read, read_attrs, write_provenance
from ddm_hpc.trajectory import Checkpoints
from ddm_hpc.utils import generator, progress, to_device

log = logging.getLogger(__name__)
POSTFIX_EVERY = 10  # steps between the progress bar's loss readings (each one waits for the device)


@dataclass
class Synset:
    group_id: torch.Tensor  # int64 [G] ids of the distilled groups (all groups, or a shard's subset)
    images: torch.Tensor  # float32 [G, ipc, C, H, W]
    labels: torch.Tensor  # int64 [G, ipc]
    targets: torch.Tensor  # float32 [G, ipc, L] label distribution (one-hot unless --syn-labels learn)
    group_class: torch.Tensor  # int64 [G]
    loss_history: np.ndarray  # float32 [steps] mean over the groups of group_history
    group_history: np.ndarray  # float32 [G, steps] matching loss of each group at each step
    init_loss: np.ndarray  # float32 [G]
    final_loss: np.ndarray  # float32 [G]
    grad_norm_real: np.ndarray  # float32 [G] |grad L(theta_t; D_k)| on the evaluation pairs (mean)
    grad_norm_syn: np.ndarray  # float32 [G] |grad L(theta'; S_k)| for the final synset (mean)
    size: np.ndarray  # int64 [G] training rows in each group
    layer_rates: np.ndarray | None = None  # float32 [G, n_tensors] (--layer-rates): each tensor's fine-tune rate


def group_members(groups: torch.Tensor, n_groups: int, ids: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of groups ``ids`` (default all): (members int64 [len(ids), width] padded with 0, sizes int64 [len(ids)]).

    ``width`` is the largest group of *all* ``n_groups`` (so a group's random draws do not depend on
    which other groups share its shard), but only the rows of ``ids`` are gathered: memory grows with
    the shard, not with K.
    """
    sizes = torch.bincount(groups, minlength=n_groups)
    if (sizes == 0).any():
        raise ConfigError(f"group {int((sizes == 0).nonzero()[0])} has no training rows: re-run the cluster stage")
    ids = torch.arange(n_groups) if ids is None else ids.long()
    width = int(sizes.max())
    mine = torch.isin(groups, ids)
    rows = torch.nonzero(mine)[:, 0]
    slot = torch.full((n_groups,), -1, dtype=torch.long)
    slot[ids] = torch.arange(len(ids))
    g = slot[groups[rows]]  # [n_rows] position of each row's group in ids
    order = torch.argsort(g, stable=True)
    rows, g = rows[order], g[order]
    sub_sizes = sizes[ids]
    starts = torch.cumsum(sub_sizes, 0) - sub_sizes
    col = torch.arange(len(rows)) - starts[g]
    members = torch.zeros(len(ids), width, dtype=torch.long)
    members[g, col] = rows
    return members, sub_sizes


def sample_real(members: torch.Tensor, sizes: torch.Tensor, batch: int,
                gen: torch.Generator | list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group, up to ``batch`` distinct members: (rows int64 [G, B], weights float32 [G, B]).

    ``gen``: one generator per group (each group's sample then does not depend on which other
    groups are drawn with it: shard-invariant), or one generator used for every group in turn.
    """
    g, width = members.shape
    b = min(batch, width)
    gens = gen if isinstance(gen, list) else [gen] * g
    keys = torch.stack([torch.rand(width, generator=gens[i]) for i in range(g)]) if g else torch.zeros(0, width)
    keys[torch.arange(width)[None, :] >= sizes[:, None]] = float("inf")
    pick = keys.argsort(1)[:, :b]
    weights = (torch.arange(b)[None, :] < sizes.clamp(max=batch)[:, None]).float()
    return members.gather(1, pick), weights


def per_group_grads(model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                    w: torch.Tensor, impl: str = "vmap", buffers: dict[str, torch.Tensor] | None = None
                    ) -> list[torch.Tensor]:
    """Gradient of each group's weighted mean CE at ``params``.

    Args:
        model: architecture (its own parameters are ignored; ``params`` are used).
        params: name -> tensor, shared by all groups.
        x: float [G, B, C, H, W]; y: int64 [G, B]; w: float [G, B] (0 = padding).
        impl: "vmap" (one batched ``vmap(grad)`` call) or "loop" (one backward per group,
            skipping padding). Same result; on CPU the loop is ~2x faster (conv weight
            gradients under vmap become grouped convolutions; see benchmarks/RESULTS.md),
            on GPU vmap wins by batching K small passes into one.
        buffers: the checkpoint's buffers (BatchNorm statistics; the model runs in eval mode), or None.

    Returns:
        One tensor [G, *param_shape] per parameter, in ``params`` order. Differentiable w.r.t.
        ``x`` when ``x`` requires grad.
    """
    def loss(p: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
        out = forward_with(model, p, xb, buffers)
        return (F.cross_entropy(out, yb, reduction="none") * wb).sum() / wb.sum()

    if impl == "vmap":
        g = vmap(grad(loss), in_dims=(None, 0, 0, 0))(params, x, y, w)
        return [g[name] for name in params]
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    per = []
    with torch.enable_grad():  # plain autograd: measured 25% faster than torch.func.grad per group
        for k in range(len(x)):
            keep = w[k] > 0
            g = torch.autograd.grad(loss(leaves, x[k][keep], y[k][keep], w[k][keep]), list(leaves.values()),
                                    create_graph=x.requires_grad)
            per.append(g)
    return [torch.stack([g[i] for g in per]) for i in range(len(leaves))]


def resolve_group_grads(impl: str, device: torch.device) -> str:
    """'auto' -> vmap on CUDA, loop on CPU (measured faster there)."""
    if impl == "auto":
        return "vmap" if device.type == "cuda" else "loop"
    return impl


def trajectory_pairs(pairing: str, tau: int, step_length: int, gen: torch.Generator, n: int
                     ) -> list[tuple[int, int]]:
    """``n`` sampled (real index, synthetic index) pairs into theta_0..theta_tau."""
    if tau < 1:
        raise ConfigError("the trajectory has a single checkpoint: train for at least one epoch")
    if pairing == "alg1":
        if tau - step_length < 1:
            raise ConfigError(f"--pairing alg1 needs more than --step-length {step_length} recorded epochs "
                              f"(the trajectory has {tau}): lower --step-length or --save-every")
        ts = torch.randint(0, tau - step_length, (n,), generator=gen).tolist()
        return [(t, t + step_length) for t in ts]
    ts = torch.randint(0, tau + 1, (n,), generator=gen).tolist()
    if pairing == "reverse":
        return [(t, tau - t) for t in ts]
    return [(t, t) for t in ts]


class Matcher:
    """Computes per-group matching losses for synthetic images against real data."""

    def __init__(self, model: nn.Module, reader: Checkpoints, x: torch.Tensor, y: torch.Tensor,
                 groups: torch.Tensor, n_groups: int, dcfg: DistillConfig, device: torch.device,
                 group_ids: torch.Tensor | None = None, kernel: str = "auto"):
        self.model, self.reader, self.dcfg, self.device, self.kernel = model, reader, dcfg, device, kernel
        # The real images stay where they are (host memory for large sets); each block's sampled rows are
        # gathered there and moved to the device (through pinned memory, without blocking the host: the
        # copy overlaps the previous block's work), so device memory holds a block, not the dataset.
        self.x, self.y = x, y
        self.group_ids = torch.arange(n_groups) if group_ids is None else group_ids
        self.members, self.sizes = group_members(groups, n_groups, self.group_ids)  # this shard's groups only
        self.n_groups = len(self.group_ids)
        self.impl = resolve_group_grads(dcfg.group_grads, device)
        self.targets: list[torch.Tensor] | None = None  # --target displacement/influence: per parameter [G, *shape]
        self.target_norm2: torch.Tensor | None = None  # [G] |target|^2, the relative L2's denominator
        self.tensor_weights: torch.Tensor | None = None  # --tensor-weights fisher(-sqrt): float64 [n_tensors] w_l
        self.target_wnorm2: torch.Tensor | None = None  # [G] sum_l w_l |T_l|^2, the training loss's denominator

    def _group_gradient_sums(self, t: int) -> list[torch.Tensor]:
        """Per parameter [G, *shape]: each group's summed CE gradient at theta_t over *all* its rows (in column
        chunks of ``batch_real``, blocks of ``DistillConfig.block`` groups). Nothing here is sampled."""
        chunk, width, b = self.dcfg.block, self.members.shape[1], self.dcfg.batch_real
        params = {k: v.detach() for k, v in self.reader.params(t).items()}
        buffers = self.reader.buffers(t)
        parts = []
        for g0 in range(0, self.n_groups, chunk):
            g1 = min(g0 + chunk, self.n_groups)
            acc = None
            for c0 in range(0, width, b):
                cols = torch.arange(c0, min(c0 + b, width))
                w = (cols[None, :] < self.sizes[g0:g1, None]).float()
                if not w.any():
                    break
                r = self.members[g0:g1, c0:c0 + b]
                keep = w.sum(1) > 0  # groups with rows in this column chunk
                with torch.no_grad():
                    g = per_group_grads(self.model, params, to_device(self.x[r[keep]], self.device),
                                        to_device(self.y[r[keep]], self.device), to_device(w[keep], self.device),
                                        self.impl, buffers)
                n = to_device(w[keep].sum(1), self.device)
                full = [torch.zeros(g1 - g0, *v.shape[1:], dtype=v.dtype, device=self.device) for v in g]
                for f, v in zip(full, g):
                    f[keep.to(self.device)] = v * n.reshape(-1, *[1] * (v.dim() - 1))  # sums, not means
                acc = full if acc is None else [a + f for a, f in zip(acc, full)]
            parts.append(acc)
        return [torch.cat(p) for p in zip(*parts)]

    def _block_targets(self, g0: int, g1: int) -> list[torch.Tensor]:
        """Groups g0..g1's targets, one tensor per parameter."""
        return [v[g0:g1] for v in self.targets]

    def _set_targets(self, targets: list[torch.Tensor]) -> None:
        self.targets = targets
        # |T_k|^2 block by block (the unit of --shards): a reduction over all groups at once may round a group's norm
        # differently with other groups beside it
        chunk = self.dcfg.block
        blocks = range(0, self.n_groups, chunk)
        self.target_norm2 = torch.cat([_group_norm(self._block_targets(g0, min(g0 + chunk, self.n_groups)))
                                       for g0 in blocks]).square().clamp(min=1e-30)
        self.target_wnorm2 = self.target_norm2 if self.tensor_weights is None else torch.cat(
            [_group_norm(self._weighted(self._block_targets(g0, min(g0 + chunk, self.n_groups)))) for g0 in blocks]
        ).square().clamp(min=1e-30)

    def set_displacement_targets(self, per_row: float, show_progress: bool = False) -> None:
        """Match every group to its whole contribution to training (``--target displacement``).

        T_k = per_row * n_k * sum_{t < tau} mean grad L(theta_t; D_k), the mean over *all* of group k's rows, so one
        fine-tune step of rate ``lr`` on a synset whose gradient at theta_tau is -T_k moves theta by lr * T_k, what
        the group's rows contributed over training (``per_row``: (epochs per recorded step) / (B (1 - momentum)),
        :func:`contribution_per_row`). Nothing here is sampled.
        """
        tau = self.reader.tau
        if tau < 1:
            raise ConfigError("the trajectory has a single checkpoint: train for at least one epoch")
        sums = None
        for t in progress(range(tau), "displacement targets", show_progress):
            step = self._group_gradient_sums(t)
            sums = step if sums is None else [a + v for a, v in zip(sums, step)]
        self._set_targets([v * per_row for v in sums])

    def set_influence_targets(self, lr: float, damping: float, rows: torch.Tensor, show_progress: bool = False,
                              rank: int = 0, seed: int = 0, cache: dict | None = None) -> None:
        """Match every group to its damped influence displacement at theta_tau (``--target influence``).

        T_k = (F + damping I)^-1 (sum_{i in D_k} grad l_i(theta_tau)) / (N lr), with F = (1/n) sum_{i in rows}
        grad l_i grad l_i^T the empirical Fisher of the training loss at theta_tau over ``rows`` (n of the N
        training rows) and ``damping`` its ridge (:func:`influence_damping`: weight decay + the L2 penalty that
        early stopping after the training's steps amounts to). One fine-tune step of rate ``lr`` on a synset whose
        gradient at theta_tau is -T_k then moves theta by the damped Newton step of removing the group's rows.
        ``rank`` 0: F exactly, solved in float64 in whichever of the parameter space (P x P) or the rows' kernel
        (n x n, Woodbury) is smaller (:func:`damped_fisher_solve`), where that fits ``FISHER_SOLVE_BYTES``, else as
        rank :data:`AUTO_FISHER_RANK` (:func:`fisher_rank_for`); ``rank`` r > 0: F's top r eigenpairs, found by
        a randomized range finder streamed over the per-row gradients (:func:`low_rank_fisher`, seeded by ``seed``),
        so memory is P x O(r) and no n x P matrix is held. ``cache``: a dict shared by the levels of one distill
        shard; the factored Fisher is kept there, so the second level (classes after clusters) skips the pass of
        per-row gradients and the factorisation, with the same bits.
        """
        tau = self.reader.tau
        theta = {k: v.detach() for k, v in self.reader.params(tau).items()}
        buffers = self.reader.buffers(tau)
        size = sum(v.numel() for v in theta.values())
        rank = fisher_rank_for(len(rows), size, rank)
        check_fisher_size(len(rows), size, rank)
        key = ("fisher", tau, float(damping), rank, seed, tuple(rows.tolist()))
        solve = cache.get(key) if cache is not None else None
        if solve is None:
            solve = self._fisher_solver(theta, buffers, rows, size, damping, rank, seed, show_progress)
            if cache is not None:
                cache[key] = solve
        if self.dcfg.tensor_weights != "none":
            wkey = ("tensor weights",) + key[1:]
            weights = cache.get(wkey) if cache is not None else None
            if weights is None:
                weights = self._fisher_tensor_weights(theta, buffers, rows, show_progress)
                if cache is not None:
                    cache[wkey] = weights
            self.tensor_weights = weights.sqrt() if self.dcfg.tensor_weights == "fisher-sqrt" else weights
        sums = self._group_gradient_sums(tau)
        flat = torch.cat([v.reshape(self.n_groups, -1) for v in sums], 1).double()
        # solved block by block of groups (the unit of --shards), so a group's target is the same bits in any shard
        solved = solve(flat, self.dcfg.block) / (len(self.x) * lr)
        out, p0 = [], 0
        for v in sums:
            n = v[0].numel()
            out.append(solved[:, p0:p0 + n].reshape(v.shape).to(v.dtype))
            p0 += n
        self._set_targets(out)

    def _row_chunks(self, theta: dict[str, torch.Tensor], buffers, rows: torch.Tensor, desc: str, show_progress: bool):
        """float64 [c, P] per-row CE gradients at ``theta`` over ``rows``, a chunk of ``batch_real`` at a time."""
        for c0 in progress(range(0, len(rows), self.dcfg.batch_real), desc, show_progress):
            r = rows[c0:c0 + self.dcfg.batch_real]
            with torch.no_grad():
                g = per_group_grads(self.model, theta, to_device(self.x[r][:, None], self.device),
                                    to_device(self.y[r][:, None], self.device),
                                    torch.ones(len(r), 1, device=self.device), self.impl, buffers)
            yield torch.cat([v.reshape(len(r), -1) for v in g], 1).double()

    def _fisher_tensor_weights(self, theta: dict[str, torch.Tensor], buffers, rows: torch.Tensor,
                               show_progress: bool) -> torch.Tensor:
        """``--tensor-weights fisher``: float64 [n_tensors], each parameter tensor's mean Fisher diagonal
        tr(F_ll) / n_l = sum_{i in rows} |grad_l l_i(theta)|^2 / (n n_l): the curvature the training rows' outputs
        show, per parameter of the tensor, on average (one pass of per-row gradients)."""
        sizes = [v.numel() for v in theta.values()]
        acc = torch.zeros(len(sizes), dtype=torch.float64, device=self.device)
        for chunk in self._row_chunks(theta, buffers, rows, "influence: tensor weights", show_progress):
            acc += torch.stack([part.pow(2).sum() for part in chunk.split(sizes, 1)])
        return acc / (len(rows) * torch.tensor(sizes, dtype=torch.float64, device=self.device))

    def _weighted(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each tensor times sqrt(w_l) (``--tensor-weights``), so squared distances and dots weigh w_l."""
        if self.tensor_weights is None:
            return grads
        return [v * self.tensor_weights[i].sqrt().to(v.dtype) for i, v in enumerate(grads)]

    def _fisher_solver(self, theta: dict[str, torch.Tensor], buffers, rows: torch.Tensor, size: int, damping: float,
                       rank: int, seed: int, show_progress: bool):
        """``solve(b [G, P], block) -> (F + damping I)^-1 b_g`` per row, F the empirical Fisher at ``theta`` over
        ``rows``: factored here once (exact, or its top ``rank`` eigenpairs), solved ``block`` rows at a time."""
        def row_chunks(desc: str):
            return self._row_chunks(theta, buffers, rows, desc, show_progress)

        if rank:
            vecs, vals = low_rank_fisher(row_chunks, len(rows), size, rank, generator(seed, 59), self.device)
            return lambda b, block: torch.cat([low_rank_solve(vecs, vals, part, damping)
                                               for part in b.split(block or len(b))])
        return damped_fisher_factor(torch.cat(list(row_chunks("influence: per-row gradients"))), damping)

    def losses(self, images: list[torch.Tensor], labels: torch.Tensor | list[torch.Tensor], pair: tuple[int, int],
               gen: torch.Generator | list[torch.Generator], chunk: int, backward: bool, rated: bool = False,
               aug_gen: list[torch.Generator] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """At one trajectory pair: (matching loss [G], |real grad| [G], |syn grad| [G]).

        ``images``: one tensor [ipc, C, H, W] per group; ``labels``: int64 [G, ipc] hard labels, or one
        float tensor [ipc, L] of soft labels per group; ``gen``: one generator per group;
        ``chunk``: groups per block (the first block starts at the first group). If ``backward``,
        accumulates d loss / d images. ``rated`` (displacement only): the loss left when every parameter tensor
        steps at its best rate (:meth:`layer_rates`), not at rate 1. Norms are over all parameters. The three
        tensors stay on the device: nothing here waits for the GPU. ``aug_gen`` (pairs targets with ``--augment``):
        one generator per group; each group draws one augmentation (:func:`ddm_hpc.augment.draw`) and applies it to
        its real minibatch and its synthetic images alike; None = unaugmented.
        """
        t_real, t_syn = pair
        fixed = self.targets is not None
        p_syn = {k: v.detach() for k, v in self.reader.params(t_syn).items()}
        if not fixed:
            p_real = {k: v.detach() for k, v in self.reader.params(t_real).items()}
            rows, w = sample_real(self.members, self.sizes, self.dcfg.batch_real, gen)
        parts = self.dcfg.augment_parts if aug_gen is not None and not fixed else ()
        draws = [augment.draw(parts, *self.x.shape[-2:], aug_gen[g]) for g in range(self.n_groups)] if parts else None
        out, real_norm, syn_norm = [], [], []
        for g0 in range(0, self.n_groups, chunk):
            g1 = min(g0 + chunk, self.n_groups)
            if fixed:
                real = self._block_targets(g0, g1)
            else:
                r = rows[g0:g1].to(self.x.device)
                with torch.no_grad():
                    real_x = to_device(self.x[r], self.device)
                    if draws:  # the group's draw on each of its real rows (padding rows too: weight 0)
                        real_x = torch.stack([augment.apply(xg, draws[g0 + i]) for i, xg in enumerate(real_x)])
                    real = per_group_grads(self.model, p_real, real_x,
                                           to_device(self.y[r], self.device), to_device(w[g0:g1], self.device),
                                           self.impl, self.reader.buffers(t_real))
            if draws:  # the same draw on the group's synthetic images, in the graph (d loss / d images through it)
                syn_x = torch.stack([augment.apply(im, draws[g0 + i]) for i, im in enumerate(images[g0:g1])])
            else:
                syn_x = torch.stack(images[g0:g1])
            ones = torch.ones(syn_x.shape[:2], device=self.device)
            lab = torch.stack(labels[g0:g1]) if isinstance(labels, list) else labels[g0:g1]
            syn = per_group_grads(self.model, p_syn, syn_x, lab, ones, buffers=self.reader.buffers(t_syn))
            # training steps weigh each tensor by --tensor-weights; the reported losses stay unweighted
            w_real, w_syn, norm2 = ((self._weighted(real), self._weighted(syn), self.target_wnorm2[g0:g1])
                                    if fixed and backward else (real, syn, self.target_norm2[g0:g1] if fixed else None))
            if fixed and rated:  # each tensor at its best rate (--layer-rates): what it leaves of |T_k|^2
                loss = 1.0 - explained(w_syn, w_real, signed=backward) / norm2
            elif fixed:  # relative L2 over every parameter: |grad L(theta_tau; S_k) + T_k|^2 / |T_k|^2
                loss = matching_loss(w_real, w_syn, sign=-1.0, include_1d=True, distance="mse",
                                     backend=self.kernel) / norm2
            else:
                loss = matching_loss(real, syn, sign=self.dcfg.sign, include_1d=self.dcfg.include_1d,
                                     distance=self.dcfg.distance, backend=self.kernel)
            if backward:
                loss.sum().backward()
            out.append(loss.detach())
            real_norm.append(_group_norm(real))
            syn_norm.append(_group_norm([g.detach() for g in syn]))
        return torch.cat(out).float(), torch.cat(real_norm), torch.cat(syn_norm)

    def layer_rates(self, images: list[torch.Tensor], labels: torch.Tensor | list[torch.Tensor], chunk: int
                    ) -> torch.Tensor:
        """``--layer-rates``: float32 [G, n_tensors], per group and parameter tensor l, the rate
        a_l = max(0, <-grad_l L(theta_tau; S_k), T_k,l>) / |grad_l L(theta_tau; S_k)|^2 that brings the synset's
        step closest to the target (0 where they point apart), in ``params`` order."""
        theta = {k: v.detach() for k, v in self.reader.params(self.reader.tau).items()}
        out = []
        for g0 in range(0, self.n_groups, chunk):
            g1 = min(g0 + chunk, self.n_groups)
            syn_x = torch.stack([im.detach() for im in images[g0:g1]])
            lab = torch.stack(labels[g0:g1]) if isinstance(labels, list) else labels[g0:g1]
            with torch.no_grad():
                syn = per_group_grads(self.model, theta, syn_x, lab, torch.ones(syn_x.shape[:2], device=self.device),
                                      buffers=self.reader.buffers(self.reader.tau))
            dots, norms = _tensor_dots(syn, self._block_targets(g0, g1))
            out.append((dots.clamp(min=0) / norms.clamp(min=1e-30)).T)
        return torch.cat(out).float()


def contraction_subsets(k: int, m: int, seed: int) -> torch.Tensor:
    """bool [m, K] kept clusters of ``--contraction``'s retrainings: each cluster removed with probability 1/2, at
    least one removed and one kept, subset j from its own stream."""
    out = []
    for j in range(m):
        gen = generator(seed, 47, j)
        kept = torch.rand(k, generator=gen) >= 0.5
        while kept.all() or not kept.any():
            kept = torch.rand(k, generator=gen) >= 0.5
        out.append(kept)
    return torch.stack(out) if out else torch.zeros(0, k, dtype=torch.bool)


def fit_contraction(steps: list[torch.Tensor], moves: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``--contraction``'s factors: float32 [n_tensors], per parameter tensor l (``steps`` order)
    c_l = sum_j <dtheta_j,l, P_j,l> / sum_j |P_j,l|^2 clipped to [0, 1], the least-squares scale that makes
    P_j = sum over the removed clusters of their rated steps reproduce the retrained change dtheta_j: the share
    of a removal's step that later training leaves. Clipped because a tensor whose steps and changes are both ~0
    (a convolution's bias before a normalisation, which the output cannot see) gives a ratio of rounding noise.

    Args:
        steps: per tensor [K, *shape], each cluster's rated one-step displacement -lr a_k,l grad_l L(theta_tau; S_k).
        moves: float [m, P] theta_tau(without the removed clusters of subset j) - theta_tau, flat in ``steps`` order.
        kept: bool [m, K] each subset's kept clusters.
    """
    removed = (~kept).double()
    out, p0 = [], 0
    for st in steps:
        flat = st.reshape(len(st), -1).double()
        pred = removed @ flat  # [m, n_l]
        real = moves[:, p0:p0 + flat.shape[1]].double()
        p0 += flat.shape[1]
        den = float((pred * pred).sum())
        out.append(min(1.0, max(0.0, float((pred * real).sum()) / den)) if den > 0 else 1.0)
    if p0 != moves.shape[1]:
        raise ValueError(f"the steps hold {p0} parameters, the retrained changes {moves.shape[1]}")
    return torch.tensor(out, dtype=torch.float32)


def contraction_of_run(cfg: Config, ctx: RunContext, images: torch.Tensor, targets: torch.Tensor,
                       rates: torch.Tensor, show_progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``--contraction m`` for the cluster synsets of ``ctx``'s run: retrains without m random halves of the
    clusters (:func:`contraction_subsets`, drop protocol, the run's seed and order) and fits
    :func:`fit_contraction` to the synsets' rated steps at theta_tau. Returns (factors float32 [n_tensors] in the
    trajectory's parameter order, kept bool [m, K])."""
    device = ctx.device
    reader = ctx.trajectory(device)
    theta = {k: v.detach() for k, v in reader.params(reader.tau).items()}
    model = ctx.build_model().to(device)
    grads = per_group_grads(model, theta, images.to(device), targets.to(device),
                            torch.ones(images.shape[:2], device=device), resolve_group_grads("auto", device),
                            reader.buffers(reader.tau))
    lr = cfg.train.lr
    steps = [(-lr * g * rates[:, i].to(device).reshape(-1, *[1] * (g.dim() - 1))).cpu() for i, g in enumerate(grads)]
    kept = contraction_subsets(ctx.k, cfg.distill.contraction, cfg.seed)
    flat_tau = reader.table.flatten({k: v.cpu() for k, v in theta.items()}).double()
    n_p = len(flat_tau)
    moves = torch.stack([retrain_without(cfg, ctx.bundle, ctx.assignment, torch.nonzero(~kp)[:, 0], device=device,
                                         removal="drop")[:n_p].double() - flat_tau
                         for kp in progress(kept, "contraction retrainings", show_progress)])
    return fit_contraction(steps, moves, kept), kept


def _tensor_dots(syn: list[torch.Tensor], target: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per parameter tensor and group, (<-syn, target>, |syn|^2): two [n_tensors, G] tensors."""
    flat = lambda v: v.reshape(len(v), -1)  # noqa: E731
    dots = torch.stack([-(flat(s) * flat(t)).sum(1) for s, t in zip(syn, target)])
    return dots, torch.stack([flat(s).pow(2).sum(1) for s in syn])


def explained(syn: list[torch.Tensor], target: list[torch.Tensor], signed: bool = False) -> torch.Tensor:
    """[G]: how much of |T_k|^2 the synset's step explains when every tensor takes its best rate,
    sum_l max(0, <-g_l, T_l>)^2 / |g_l|^2 (the relative L2 at those rates is 1 - this / |T_k|^2).

    ``signed`` (``--rated-matching``'s training loss): a tensor pointing away from its target counts
    -<-g_l, T_l>^2 / |g_l|^2 instead of 0, so its gradient turns it towards the target (the clamped form has none
    there); equal to the unsigned form where every dot is >= 0."""
    dots, norms = _tensor_dots(syn, target)
    part = dots * dots.abs() if signed else dots.clamp(min=0).square()
    return (part / norms.clamp(min=1e-30)).sum(0)


FISHER_SOLVE_BYTES = 8 << 30  # the float64 system --target influence may build (P x P or n x n)
FISHER_OVERSAMPLE = 16  # --fisher-rank's range finder: extra columns beyond the rank (Halko et al.: 5-20)
# --fisher-rank 0 where the exact Fisher exceeds FISHER_SOLVE_BYTES: rank 256 attributed as the exact Fisher at the
# eval preset (three seeds, benchmarks/RESULTS.md "Influence matching"); F's eigenvalues above the ridge numbered 95.
AUTO_FISHER_RANK = 256
FISHER_POWER_ITERS = 2  # --fisher-rank's subspace iterations (each one more pass of per-row gradients)


def influence_damping(train: TrainConfig, n_train: int, damping: float = 0.0) -> float:
    """``--target influence``'s ridge on the Fisher: weight decay plus ``damping``, or where that is 0, plus
    (1 - momentum) / (lr x optimizer steps): training stopped after S steps of effective rate lr / (1 - momentum)
    acts on each curvature direction like an L2 penalty of 1 / (effective rate x S) (early stopping as ridge), so
    directions flatter than that keep the summed-gradient step and steeper ones the Newton step."""
    if damping > 0:
        return train.weight_decay + damping
    steps = train.epochs * math.ceil(n_train / train.batch_size)
    return train.weight_decay + (1.0 - train.momentum) / (train.lr * max(steps, 1))


def influence_spec(cfg: Config, n_train: int) -> tuple[float, float, torch.Tensor, int, int] | None:
    """``distill_groups``'s ``influence`` argument for a run (None unless ``--target influence``): (lr, the Fisher's
    ridge, its rows, its rank, the range finder's seed)."""
    d = cfg.distill
    if d.target != "influence":
        return None
    return (cfg.train.lr, influence_damping(cfg.train, n_train, d.damping),
            influence_rows(n_train, d.fisher_rows, cfg.seed), d.fisher_rank, cfg.seed)


def influence_rows(n_train: int, fisher_rows: int, seed: int) -> torch.Tensor:
    """int64 [n] the training rows ``--target influence`` estimates the Fisher on: all of them (``fisher_rows``
    0 or >= N), else a seeded random subset of ``fisher_rows``, sorted."""
    if fisher_rows <= 0 or fisher_rows >= n_train:
        return torch.arange(n_train)
    return torch.randperm(n_train, generator=generator(seed, 53))[:fisher_rows].sort().values


def fisher_rank_for(n: int, p: int, rank: int) -> int:
    """The Fisher rank ``--target influence`` uses for ``n`` rows of ``p`` parameters: ``--fisher-rank`` when given;
    for 0, the exact Fisher (0) where it fits ``FISHER_SOLVE_BYTES`` (:func:`check_fisher_size`), else
    :data:`AUTO_FISHER_RANK` (logged)."""
    if rank:
        return rank
    try:
        check_fisher_size(n, p)
        return 0
    except ConfigError:
        log.info("distill: the exact Fisher (%d rows x %d parameters) exceeds %d GiB: its top %d eigenpairs instead "
                 "(--fisher-rank)", n, p, FISHER_SOLVE_BYTES >> 30, AUTO_FISHER_RANK)
        return AUTO_FISHER_RANK


def check_fisher_size(n: int, p: int, rank: int = 0) -> None:
    """Refuses, in one line, a ``--target influence`` Fisher over ``FISHER_SOLVE_BYTES`` in float64: exact
    (``rank`` 0), its per-row gradients (n x P) or its system (min(n, P) square); low rank, the range finder's
    three P x (rank + oversampling) matrices."""
    if rank:
        need = 3 * p * (rank + FISHER_OVERSAMPLE) * 8
        if need > FISHER_SOLVE_BYTES:
            fit = max(1, FISHER_SOLVE_BYTES // (3 * 8 * p) - FISHER_OVERSAMPLE)
            raise ConfigError(f"--fisher-rank {rank} would hold 3 x {p} x {rank + FISHER_OVERSAMPLE} float64, over "
                              f"{FISHER_SOLVE_BYTES >> 30} GiB: pass --fisher-rank {fit} or fewer")
        return
    size = min(n, p)
    if max(size * size, n * p) * 8 > FISHER_SOLVE_BYTES:
        fit = max(1, min(int((FISHER_SOLVE_BYTES / 8) ** 0.5), FISHER_SOLVE_BYTES // (8 * p)))
        raise ConfigError(f"--target influence would hold {n} Fisher rows x {p} parameters and solve a {size} x {size} "
                          f"float64 system, over {FISHER_SOLVE_BYTES >> 30} GiB: pass --fisher-rank (e.g. 256), or "
                          f"--fisher-rows {fit} or fewer")


def low_rank_fisher(row_chunks, n: int, p: int, rank: int, gen: torch.Generator, device: torch.device,
                    power: int = FISHER_POWER_ITERS) -> tuple[torch.Tensor, torch.Tensor]:
    """(vectors float64 [P, r], values float64 [r]): the top ``rank`` eigenpairs of F = (1/n) sum_i g_i g_i^T by a
    randomized range finder (Halko, Martinsson & Tropp 2011, with ``power`` subspace iterations), each product
    F X = (1/n) sum_chunks M_c^T (M_c X) streamed over ``row_chunks(desc)``, which yields the per-row gradients
    M_c [c, P] again on every call (one pass per product; ``power + 2`` passes in all)."""
    width = min(rank + FISHER_OVERSAMPLE, p)

    def times(x: torch.Tensor, desc: str) -> torch.Tensor:
        acc = torch.zeros_like(x)
        for m in row_chunks(desc):
            acc += m.T @ (m @ x)
        return acc / n

    omega = torch.randn(p, width, generator=gen, dtype=torch.float64).to(device)
    q = torch.linalg.qr(times(omega, "influence: Fisher range")).Q
    for i in range(power):
        q = torch.linalg.qr(times(q, f"influence: power iteration {i + 1}")).Q
    small = torch.zeros(width, width, dtype=torch.float64, device=device)
    for m in row_chunks("influence: Fisher projection"):
        mq = m @ q
        small += mq.T @ mq
    vals, vecs = torch.linalg.eigh(small / n)
    keep = min(rank, width)
    return q @ vecs[:, -keep:].flip(1), vals[-keep:].flip(0).clamp(min=0)


def low_rank_solve(vecs: torch.Tensor, vals: torch.Tensor, b: torch.Tensor, damping: float) -> torch.Tensor:
    """float64 [G, P]: (V diag(vals) V^T + damping I)^-1 b_g for each row of ``b``, V = ``vecs`` orthonormal [P, r]:
    V diag(1 / (vals + damping)) V^T b + (b - V V^T b) / damping."""
    coef = b.double() @ vecs  # [G, r]
    return (b.double() - coef @ vecs.T) / damping + (coef / (vals + damping)) @ vecs.T


def damped_fisher_solve(m: torch.Tensor, b: torch.Tensor, damping: float, block: int = 0) -> torch.Tensor:
    """float64 [G, P]: (m^T m / n + damping I)^-1 b_g for each row b_g of ``b`` [G, P], ``m`` [n, P] the per-row
    gradients (:func:`damped_fisher_factor`, then its solve, ``block`` rows of ``b`` at a time: 0 = all at once)."""
    return damped_fisher_factor(m, damping)(b, block)


def damped_fisher_factor(m: torch.Tensor, damping: float):
    """``solve(b [G, P], block=0) -> float64 [G, P]``: (m^T m / n + damping I)^-1 b_g for each row, ``m`` [n, P] the
    per-row gradients. Factored once (LU) in the parameter space when P <= n, else in the rows' kernel by Woodbury:
    (b - m^T (n damping I + m m^T)^-1 m b) / damping; ``solve`` takes ``b`` ``block`` rows at a time (0 = all at
    once), so a row's result does not depend on the rows outside its block. Refuses sizes over
    ``FISHER_SOLVE_BYTES`` (:func:`check_fisher_size`)."""
    n, p = m.shape
    check_fisher_size(n, p)
    m = m.double()
    if p <= n:
        lu = torch.linalg.lu_factor(m.T @ m / n + damping * torch.eye(p, dtype=m.dtype, device=m.device))
        m = None  # the P x P factor is all the solve needs

        def solve(b: torch.Tensor, block: int = 0) -> torch.Tensor:
            return torch.cat([torch.linalg.lu_solve(*lu, r.T).T for r in b.double().split(block or len(b))])
    else:
        lu = torch.linalg.lu_factor(m @ m.T + n * damping * torch.eye(n, dtype=m.dtype, device=m.device))

        def solve(b: torch.Tensor, block: int = 0) -> torch.Tensor:
            return torch.cat([(r - torch.linalg.lu_solve(*lu, m @ r.T).T @ m) / damping
                              for r in b.double().split(block or len(b))])
    return solve


def contribution_per_row(train: TrainConfig, tau: int) -> float:
    """What one training row's gradient adds to theta over one recorded step, per unit of lr: (epochs / tau) /
    (B (1 - momentum)). Each epoch applies lr/B times each row's gradient once, and momentum stretches it by
    1/(1-momentum) (Eq. 2); ``--save-every`` records every epochs/tau epochs."""
    return train.epochs / (max(tau, 1) * train.batch_size * (1.0 - train.momentum))


def _group_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm over all parameters of each group's gradient: [G]."""
    return torch.stack([g.reshape(len(g), -1).float().pow(2).sum(1) for g in grads]).sum(0).sqrt()


def init_images(x: torch.Tensor, members: torch.Tensor, sizes: torch.Tensor, ipc: int, how: str,
                gens: list[torch.Generator]) -> list[torch.Tensor]:
    """Per group [ipc, C, H, W]: random real members of the group, or standard-normal noise.

    ``gens``: one generator per group, so each group's init is independent of the others.
    """
    out = []
    for k in range(len(sizes)):
        if how == "noise":
            out.append(torch.randn((ipc, *x.shape[1:]), generator=gens[k]))
        else:
            pick = (torch.rand(ipc, generator=gens[k]) * sizes[k]).long()
            out.append(x[members[k, pick]].clone())
    return out


def distill_groups(model: nn.Module, reader: Checkpoints, x: torch.Tensor, y: torch.Tensor,
                   groups: torch.Tensor, group_class: torch.Tensor, dcfg: DistillConfig, seed: int,
                   device: torch.device, desc: str = "distill", show_progress: bool = True,
                   group_ids: torch.Tensor | None = None, kernel: str = "auto", per_row: float = 0.0,
                   influence: tuple[float, float, torch.Tensor, int, int] | None = None,
                   fisher_cache: dict | None = None) -> Synset:
    """Learn ``ipc`` synthetic images for each group.

    Args:
        model: the target architecture (parameters come from ``reader``).
        reader: the recorded trajectory theta_0..theta_tau.
        x, y: training images float32 [N, C, H, W] and labels int64 [N].
        groups: int64 [N] group id of each row (cluster id, or class for class-wise synsets).
        group_class: int64 [G] the class of each group (label of its synthetic images).
        dcfg: distillation options; seed: seeds init, pair sampling and minibatches.
        group_ids: int64 [g] consecutive groups to distil (a shard's blocks), starting on a block
            boundary; default all. Each group's result is then the same whichever other blocks
            are distilled with it.
        kernel: the matching loss's implementation (``--kernel``: auto, triton, reference).
        per_row: ``--target displacement`` only: the training's step per row (:func:`contribution_per_row`).
        influence: ``--target influence`` only: (the training's lr, the Fisher's ridge (:func:`influence_damping`),
            the Fisher's rows (:func:`influence_rows`), its rank (0 = exact), the range finder's seed).
        fisher_cache: ``--target influence``: a dict kept across the levels of one shard, so the Fisher is computed
            and factored once (:meth:`Matcher.set_influence_targets`); None = not kept.

    The step loop never waits for the device: losses stay there until the end (one copy of the
    [G, steps] history), and the progress bar's loss is read every ``POSTFIX_EVERY`` steps, only when
    the bar is shown.
    """
    matcher = Matcher(model, reader, x, y, groups, len(group_class), dcfg, device, group_ids, kernel)
    displacement = dcfg.fixed_target  # one fixed target per group, matched at theta_tau
    if dcfg.target == "displacement":
        if per_row <= 0:
            raise ValueError("--target displacement needs per_row > 0 (contribution_per_row of the training)")
        matcher.set_displacement_targets(per_row, show_progress)
    elif dcfg.target == "influence":
        if influence is None:
            raise ValueError("--target influence needs (lr, damping, rows, rank, seed)")
        lr, damping, rows, rank, range_seed = influence
        matcher.set_influence_targets(lr, damping, rows, show_progress, rank, range_seed, fisher_cache)
    ids = matcher.group_ids.tolist()
    n_groups = len(ids)
    images = init_images(x, matcher.members, matcher.sizes, dcfg.ipc, dcfg.init,
                         [generator(seed, 21, k) for k in ids])
    images = [im.to(device).requires_grad_(True) for im in images]
    gclass = group_class[matcher.group_ids]
    hard = gclass[:, None].expand(n_groups, dcfg.ipc).contiguous().to(device)
    with torch.no_grad():
        n_cls = forward_with(model, reader.params(0), x[:1].to(device), reader.buffers(0)).shape[-1]
    groups_opt = [{"params": images}]
    if dcfg.syn_labels == "learn":
        # logits start at q(class) = 0.9; per group, so a group's result does not depend on its block
        init = math.log(9.0 * max(n_cls - 1, 1))
        logits = [(F.one_hot(hard[g], n_cls).float() * init).requires_grad_(True) for g in range(n_groups)]
        groups_opt.append({"params": logits, "lr": dcfg.lr_label})
        # one tensor per group: each block's backward then owns its groups' softmax graphs
        label_fn = lambda: [lg.softmax(-1) for lg in logits]  # noqa: E731
    else:
        label_fn = lambda: hard  # noqa: E731
    if dcfg.optimizer == "adam":
        opt = torch.optim.Adam(groups_opt, lr=dcfg.lr_img)
    else:
        opt = torch.optim.SGD(groups_opt, lr=dcfg.lr_img, momentum=dcfg.img_momentum)
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(dcfg.distill_steps, 1))
             if dcfg.lr_schedule == "cosine" else None)
    chunk = dcfg.block
    pairing = dcfg.resolved_pairing()

    # Fixed evaluation pairs and minibatches: the same before and after, so the losses compare.
    n_eval = min(4, reader.tau + 1)
    tau_pairs = lambda n: [(reader.tau, reader.tau)] * n  # noqa: E731  (displacement: always at theta_tau)
    eval_pairs = tau_pairs(1) if displacement else trajectory_pairs(pairing, reader.tau, dcfg.step_length,
                                                                      generator(seed, 31), n_eval)

    def evaluate() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # unaugmented even with --augment (no aug_gen): the synsets are used unaugmented, and the matched
        # fine-tune scale reads these gradient norms
        gen = [generator(seed, 32, k) for k in ids]
        with torch.no_grad():
            labels = label_fn()
        parts = [matcher.losses(images, labels, p, gen, chunk, backward=False, rated=dcfg.layer_rates)
                 for p in eval_pairs]
        return tuple(torch.stack(x).mean(0).cpu().numpy() for x in zip(*parts))

    init_loss, _, _ = evaluate()
    pairs = (tau_pairs(dcfg.distill_steps) if displacement else
             trajectory_pairs(pairing, reader.tau, dcfg.step_length, generator(seed, 33), dcfg.distill_steps))
    batch_gen = [generator(seed, 34, k) for k in ids]
    aug_gen = [generator(seed, 35, k) for k in ids] if dcfg.augment_parts and not displacement else None
    history = []
    bar = progress(pairs, desc, show_progress)
    shown = not getattr(bar, "disable", True)
    for step, pair in enumerate(bar):
        opt.zero_grad(set_to_none=True)
        loss, _, _ = matcher.losses(images, label_fn(), pair, batch_gen, chunk, backward=True, aug_gen=aug_gen,
                                    rated=dcfg.rated_matching)
        opt.step()
        if sched is not None:
            sched.step()
        history.append(loss)
        if shown and step % POSTFIX_EVERY == 0:
            bar.set_postfix(loss=f"{float(loss.mean()):.4f}")  # a device sync: only for a visible bar
    final_loss, real_norm, syn_norm = evaluate()
    per_group = (torch.stack(history, 1).cpu() if history else torch.zeros(n_groups, 0)).numpy().astype(np.float32)
    with torch.no_grad():
        targets = torch.stack(label_fn()) if dcfg.syn_labels == "learn" else F.one_hot(hard, n_cls).float()
        rates = matcher.layer_rates(images, label_fn(), chunk).cpu().numpy() if dcfg.layer_rates else None
    return Synset(matcher.group_ids.clone(), torch.stack([im.detach().cpu() for im in images]), hard.cpu(),
                  targets.cpu(), gclass.clone(), loss_history_of(per_group), per_group, init_loss.astype(np.float32),
                  final_loss.astype(np.float32), real_norm.astype(np.float32), syn_norm.astype(np.float32),
                  matcher.sizes.numpy(), rates)


def loss_history_of(group_history: np.ndarray) -> np.ndarray:
    """float32 [steps]: the mean over groups of float32 [G, steps] (one formula, sharded or not)."""
    return torch.from_numpy(np.ascontiguousarray(group_history, dtype=np.float32)).mean(0).numpy()


SYNSET_DATASETS = ("images", "labels", "targets", "group_class", "init_loss", "final_loss", "grad_norm_real", "grad_norm_syn",
                   "size")


def check(cfg: Config) -> None:
    """``--kernel triton`` only where the fused kernels can run: CUDA (with a compiler for Triton) or the interpreter."""
    if cfg.runtime.kernel != "triton" or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return
    device = cfg.runtime.torch_device()
    if device.type != "cuda":
        raise ConfigError(f"--kernel triton needs a CUDA device, but --device {cfg.runtime.device} resolves to {device}: use "
                          "--kernel auto or reference (or TRITON_INTERPRET=1 for Triton's interpreter)")
    why = triton_usable()
    if why:
        raise ConfigError(f"--kernel triton: {why}; or use --kernel auto or reference")


def distill_items(cfg: Config) -> list[tuple[str, int]]:
    """(level, number of groups) for each requested level, in work order."""
    train_attrs = read_attrs(artifact_path(cfg.runtime.out, "train")) or {}
    with open_read(artifact_path(cfg.runtime.out, "cluster")) as f:
        k = len(f["clusters/class"])
    counts = {"cluster": k, "class": int(train_attrs.get("num_classes", 0))}
    return [(level, counts[level]) for level in cfg.distill.level_list()]


def distill_blocks(cfg: Config) -> list[tuple[str, int, int]]:
    """The work items: (level, first group, end group) blocks of ``DistillConfig.block`` groups."""
    b = cfg.distill.block
    return [(level, g0, min(g0 + b, n)) for level, n in distill_items(cfg) for g0 in range(0, n, b)]


def distill_shard(cfg: Config, shard: int, n_shards: int, bundle=None) -> dict[str, np.ndarray]:
    """Distil the groups of one shard (a contiguous run of the blocks of ``distill_blocks``).

    Returns dataset name -> array: per level ``<level>/group_id`` int64 [g] and the per-group
    rows of every ``synsets.h5`` dataset, plus ``<level>/group_history`` float32 [g, steps] and
    ``<level>/seconds``.
    """
    work = distill_blocks(cfg)
    i0, i1 = shard_range(len(work), shard, n_shards)
    out: dict[str, np.ndarray] = {}
    if i0 == i1:
        return out
    ctx = RunContext(cfg, bundle)
    bundle, device = ctx.bundle, ctx.device
    reader = ctx.trajectory(device)
    model = ctx.build_model().to(device)
    fisher: dict = {}  # the influence target's factored Fisher, shared by the levels (same theta_tau, same rows)
    levels = {
        "cluster": (ctx.assignment, ctx.cluster_class),
        "class": (bundle.y_train.clone(), torch.arange(bundle.num_classes)),
    }
    for i, (level, n) in enumerate(distill_items(cfg)):
        mine = [(g0, g1) for lv, g0, g1 in work[i0:i1] if lv == level]
        if not mine:
            continue
        lo, hi = mine[0][0], mine[-1][1]
        t1 = time.perf_counter()
        groups, gclass = levels[level]
        s = distill_groups(model, reader, bundle.x_train, bundle.y_train, groups, gclass, cfg.distill,
                           cfg.seed + 1000 * i, device, f"distill[{level} {lo}:{hi}]", cfg.runtime.progress,
                           group_ids=torch.arange(lo, hi), kernel=cfg.runtime.kernel,
                           per_row=contribution_per_row(cfg.train, reader.tau),
                           influence=influence_spec(cfg, len(bundle.y_train)), fisher_cache=fisher)
        seconds = time.perf_counter() - t1
        log.info("distill[%s]: groups %d..%d of %d, matching loss %.4f -> %.4f (mean) in %.1f s", level, lo, hi - 1,
                 n, s.init_loss.mean(), s.final_loss.mean(), seconds)
        out.update({f"{level}/group_id": s.group_id.numpy(), f"{level}/images": s.images.numpy(),
                    f"{level}/labels": s.labels.numpy(), f"{level}/targets": s.targets.numpy(),
                    f"{level}/group_class": s.group_class.numpy(),
                    f"{level}/group_history": s.group_history, f"{level}/init_loss": s.init_loss,
                    f"{level}/final_loss": s.final_loss, f"{level}/grad_norm_real": s.grad_norm_real,
                    f"{level}/grad_norm_syn": s.grad_norm_syn, f"{level}/size": s.size,
                    f"{level}/seconds": np.float64(seconds)})
        if s.layer_rates is not None:
            out[f"{level}/layer_rates"] = s.layer_rates
    return out


def merge_distill(cfg: Config, paths: list[Path], bundle=None) -> Path:
    """Concatenate the shards (in order) into ``synsets.h5``; checks every group is there once.

    ``bundle`` (the in-process context of the tasks) is accepted and not needed.
    """
    t0 = time.perf_counter()
    files = [h5py.File(p, "r", locking=False) for p in paths]
    try:
        path = artifact_path(cfg.runtime.out, "distill")
        shard_seconds = sum(float(f.attrs.get("seconds", 0.0)) for f in files)
        with atomic_h5(path) as out:
            for level, n in distill_items(cfg):
                parts = [f[level] for f in files if level in f]
                ids = np.concatenate([g["group_id"][()] for g in parts]) if parts else np.zeros(0, np.int64)
                if not np.array_equal(ids, np.arange(n)):
                    raise StageError(f"distill shards cover groups {ids.tolist()[:10]}... of level {level}, not "
                                     f"0..{n - 1} once each: rerun with --overwrite")
                g = out.create_group(level)
                for name in SYNSET_DATASETS + (("layer_rates",) if cfg.distill.layer_rates else ()):
                    create_dataset(g, name, data=np.concatenate([p[name][()] for p in parts]))
                history = np.concatenate([p["group_history"][()] for p in parts])
                create_dataset(g, "loss_history", data=loss_history_of(history))
                g.attrs["seconds"] = float(sum(float(p["seconds"][()]) for p in parts))
            out.attrs["method"] = cfg.distill.method
            out.attrs["pairing"] = cfg.distill.resolved_pairing()
            out.attrs["sign"] = cfg.distill.sign
            out.attrs["distance"] = cfg.distill.distance
            out.attrs["include_1d"] = cfg.distill.include_1d
            out.attrs["syn_labels"] = cfg.distill.syn_labels
            out.attrs["unlearn_direction"] = cfg.distill.unlearn_direction
            out.attrs["target"] = cfg.distill.target
            if cfg.distill.augment:  # absent when off, so such files are as before
                out.attrs["augment"] = "_".join(cfg.distill.augment_parts)
            ctx = RunContext(cfg, bundle)
            if cfg.distill.layer_rates:  # the tensors the rates' columns follow
                out.attrs["layer_rate_names"] = json.dumps(ctx.trajectory().table.names)
            if cfg.distill.contraction:  # one factor per tensor for every level's rates, fitted on the clusters
                c = out["cluster"]
                factors, kept = contraction_of_run(
                    cfg, ctx, torch.from_numpy(c["images"][()]), torch.from_numpy(c["targets"][()]),
                    torch.from_numpy(c["layer_rates"][()]), ctx.show_progress)
                create_dataset(out, "contraction", data=factors.numpy())
                create_dataset(out, "contraction_kept", data=kept.numpy())
            out.attrs["n_shards"] = len(paths)
            write_provenance(out, cfg, "distill", shard_seconds + time.perf_counter() - t0)
    finally:
        for f in files:
            f.close()
    return path


def run(cfg: Config, bundle=None) -> Path:
    """Run the stage for every requested level and write ``synsets.h5``; returns its path.

    The groups are split into ``--shards`` tasks on the configured executor (see launch.py).
    """
    return run_sharded("distill", cfg, distill_shard, len(distill_blocks(cfg)), merge_distill,
                       context={"bundle": bundle})


def summary(run_dir: str | Path, n_show: int = 10) -> list[str]:
    """The ``ddm-hpc show`` line of ``synsets.h5``."""
    a = read_attrs(artifact_path(run_dir, "distill"))
    if not a:
        return []
    with open_read(artifact_path(run_dir, "distill")) as f:
        parts = [f"{lv} {f[lv]['init_loss'][()].mean():.3f} -> {f[lv]['final_loss'][()].mean():.3f}"
                 for lv in ("cluster", "class") if lv in f]
    return [f"  distill    {a['seconds']:7.1f} s  {a['method']} matching loss (mean per synset) " + ", ".join(parts)]
