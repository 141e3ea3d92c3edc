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

Real minibatches: up to ``batch_real`` members of each group, drawn without replacement and
padded to a common size with zero weights, so each group's gradient is the exact mean over
its own sample.

Artifact ``synsets.h5`` has one group per level (``cluster``: K groups, ``class``: L groups):
  <level>/images       float32 [G, ipc, C, H, W]  (normalised input space)
  <level>/labels       int64 [G, ipc]             class of the group
  <level>/group_class  int64 [G]
  <level>/loss_history float32 [steps]            mean matching loss per group at each step
  <level>/init_loss, <level>/final_loss float32 [G]  loss on fixed evaluation pairs, before/after
  attrs: method, pairing, sign, distance, include_1d, unlearn_direction (+1: fine-tune by
         descent on the removed synsets, ddm; -1: by ascent, ddm-match) + provenance
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from kernels import matching_loss

from ddm_hpc.config import Config, DistillConfig
from ddm_hpc.errors import ConfigError
from ddm_hpc.storage import artifact_path, atomic_h5, open_read, write_provenance
from ddm_hpc.train import TrajectoryReader, build_target, load_data
from ddm_hpc.utils import generator, progress, resolve_device

log = logging.getLogger(__name__)


@dataclass
class Synset:
    images: torch.Tensor  # float32 [G, ipc, C, H, W]
    labels: torch.Tensor  # int64 [G, ipc]
    group_class: torch.Tensor  # int64 [G]
    loss_history: np.ndarray  # float32 [steps]
    init_loss: np.ndarray  # float32 [G]
    final_loss: np.ndarray  # float32 [G]
    grad_norm_real: np.ndarray  # float32 [G] |grad L(theta_t; D_k)| on the evaluation pairs (mean)
    grad_norm_syn: np.ndarray  # float32 [G] |grad L(theta'; S_k)| for the final synset (mean)
    size: np.ndarray  # int64 [G] training rows in each group


def group_members(groups: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of each group: (members int64 [G, max_size] padded with 0, sizes int64 [G])."""
    sizes = torch.bincount(groups, minlength=n_groups)
    if (sizes == 0).any():
        raise ConfigError(f"group {int((sizes == 0).nonzero()[0])} has no training rows: re-run the cluster stage")
    order = torch.argsort(groups, stable=True)
    starts = torch.cumsum(sizes, 0) - sizes
    col = torch.arange(int(sizes.max()))
    valid = col[None, :] < sizes[:, None]
    pos = (starts[:, None] + col[None, :]).clamp(max=len(groups) - 1)
    return torch.where(valid, order[pos], torch.zeros_like(pos)), sizes


def sample_real(members: torch.Tensor, sizes: torch.Tensor, batch: int, gen: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group, up to ``batch`` distinct members: (rows int64 [G, B], weights float32 [G, B])."""
    g, width = members.shape
    b = min(batch, width)
    keys = torch.rand(g, width, generator=gen)
    keys[torch.arange(width)[None, :] >= sizes[:, None]] = float("inf")
    pick = keys.argsort(1)[:, :b]
    weights = (torch.arange(b)[None, :] < sizes.clamp(max=batch)[:, None]).float()
    return members.gather(1, pick), weights


def per_group_grads(model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                    w: torch.Tensor, impl: str = "vmap") -> list[torch.Tensor]:
    """Gradient of each group's weighted mean CE at ``params``.

    Args:
        model: architecture (its own parameters are ignored; ``params`` are used).
        params: name -> tensor, shared by all groups.
        x: float [G, B, C, H, W]; y: int64 [G, B]; w: float [G, B] (0 = padding).
        impl: "vmap" (one batched ``vmap(grad)`` call) or "loop" (one backward per group,
            skipping padding). Same result; on CPU the loop is ~2x faster (conv weight
            gradients under vmap become grouped convolutions; see benchmarks/RESULTS.md),
            on GPU vmap wins by batching K small passes into one.

    Returns:
        One tensor [G, *param_shape] per parameter, in ``params`` order. Differentiable w.r.t.
        ``x`` when ``x`` requires grad.
    """
    def loss(p: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, p, (xb,))
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

    def __init__(self, model: nn.Module, reader: TrajectoryReader, x: torch.Tensor, y: torch.Tensor,
                 groups: torch.Tensor, n_groups: int, dcfg: DistillConfig, device: torch.device):
        self.model, self.reader, self.dcfg, self.device = model, reader, dcfg, device
        self.x, self.y = x.to(device), y.to(device)
        self.members, self.sizes = group_members(groups, n_groups)
        self.n_groups = n_groups
        self.impl = resolve_group_grads(dcfg.group_grads, device)

    def losses(self, images: torch.Tensor, labels: torch.Tensor, pair: tuple[int, int], gen: torch.Generator,
               chunk: int, backward: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """At one trajectory pair: (matching loss [G], |real grad| [G], |syn grad| [G]).

        If ``backward``, accumulates d loss / d images. Norms are over all parameters.
        """
        t_real, t_syn = pair
        p_real = {k: v.detach() for k, v in self.reader.params(t_real).items()}
        p_syn = {k: v.detach() for k, v in self.reader.params(t_syn).items()}
        rows, w = sample_real(self.members, self.sizes, self.dcfg.batch_real, gen)
        out, real_norm, syn_norm = [], [], []
        for g0 in range(0, self.n_groups, chunk):
            g1 = min(g0 + chunk, self.n_groups)
            r = rows[g0:g1].to(self.device)
            with torch.no_grad():
                real = per_group_grads(self.model, p_real, self.x[r], self.y[r], w[g0:g1].to(self.device),
                                       self.impl)
            syn_x = images[g0:g1]
            ones = torch.ones(syn_x.shape[:2], device=self.device)
            syn = per_group_grads(self.model, p_syn, syn_x, labels[g0:g1], ones)
            loss = matching_loss(real, syn, sign=self.dcfg.sign, include_1d=self.dcfg.include_1d,
                                 distance=self.dcfg.distance)
            if backward:
                loss.sum().backward()
            out.append(loss.detach())
            real_norm.append(_group_norm(real))
            syn_norm.append(_group_norm([g.detach() for g in syn]))
        return torch.cat(out).float().cpu(), torch.cat(real_norm).cpu(), torch.cat(syn_norm).cpu()


def _group_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm over all parameters of each group's gradient: [G]."""
    return torch.stack([g.reshape(len(g), -1).float().pow(2).sum(1) for g in grads]).sum(0).sqrt()


def init_images(x: torch.Tensor, members: torch.Tensor, sizes: torch.Tensor, ipc: int, how: str,
                gen: torch.Generator) -> torch.Tensor:
    """[G, ipc, C, H, W]: random real members of each group, or standard-normal noise."""
    g = len(sizes)
    if how == "noise":
        return torch.randn((g, ipc, *x.shape[1:]), generator=gen)
    pick = (torch.rand(g, ipc, generator=gen) * sizes[:, None]).long()
    return x[members.gather(1, pick)].clone()


def distill_groups(model: nn.Module, reader: TrajectoryReader, x: torch.Tensor, y: torch.Tensor,
                   groups: torch.Tensor, group_class: torch.Tensor, dcfg: DistillConfig, seed: int,
                   device: torch.device, desc: str = "distill", show_progress: bool = True) -> Synset:
    """Learn ``ipc`` synthetic images for each group.

    Args:
        model: the target architecture (parameters come from ``reader``).
        reader: the recorded trajectory theta_0..theta_tau.
        x, y: training images float32 [N, C, H, W] and labels int64 [N].
        groups: int64 [N] group id of each row (cluster id, or class for class-wise synsets).
        group_class: int64 [G] the class of each group (label of its synthetic images).
        dcfg: distillation options; seed: seeds init, pair sampling and minibatches.
    """
    n_groups = len(group_class)
    matcher = Matcher(model, reader, x, y, groups, n_groups, dcfg, device)
    images = init_images(x, matcher.members, matcher.sizes, dcfg.ipc, dcfg.init, generator(seed, 21))
    images = images.to(device).requires_grad_(True)
    labels = group_class[:, None].expand(n_groups, dcfg.ipc).contiguous().to(device)
    opt = torch.optim.SGD([images], lr=dcfg.lr_img, momentum=dcfg.img_momentum)
    chunk = dcfg.group_chunk or n_groups
    pairing = dcfg.resolved_pairing()

    # Fixed evaluation pairs and minibatches: the same before and after, so the losses compare.
    n_eval = min(4, reader.tau + 1)
    eval_pairs = trajectory_pairs(pairing, reader.tau, dcfg.step_length, generator(seed, 31), n_eval)

    def evaluate() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        gen = generator(seed, 32)
        parts = [matcher.losses(images, labels, p, gen, chunk, backward=False) for p in eval_pairs]
        return tuple(torch.stack(x).mean(0).numpy() for x in zip(*parts))

    init_loss, _, _ = evaluate()
    pairs = trajectory_pairs(pairing, reader.tau, dcfg.step_length, generator(seed, 33), dcfg.distill_steps)
    batch_gen = generator(seed, 34)
    history = []
    bar = progress(pairs, desc, show_progress)
    for pair in bar:
        opt.zero_grad(set_to_none=True)
        loss, _, _ = matcher.losses(images, labels, pair, batch_gen, chunk, backward=True)
        opt.step()
        history.append(float(loss.mean()))
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{history[-1]:.4f}")
    final_loss, real_norm, syn_norm = evaluate()
    return Synset(images.detach().cpu(), labels.cpu(), group_class.clone(), np.array(history, dtype=np.float32),
                  init_loss.astype(np.float32), final_loss.astype(np.float32), real_norm.astype(np.float32),
                  syn_norm.astype(np.float32), matcher.sizes.numpy())


def run_distill(cfg: Config, bundle=None) -> Path:
    """Run the stage for every requested level and write ``synsets.h5``; returns its path."""
    from ddm_hpc.cluster import read_clusters

    t0 = time.perf_counter()
    device = resolve_device(cfg.runtime.device)
    bundle = bundle or load_data(cfg)
    reader = TrajectoryReader(artifact_path(cfg.runtime.out, "train"), device=device)
    model = build_target(cfg, bundle).to(device)
    assignment, cluster_class = read_clusters(cfg.runtime.out)
    levels = {
        "cluster": (torch.from_numpy(assignment), torch.from_numpy(cluster_class)),
        "class": (bundle.y_train.clone(), torch.arange(bundle.num_classes)),
    }
    results: dict[str, Synset] = {}
    timings: dict[str, float] = {}
    for i, level in enumerate(cfg.distill.level_list()):
        t1 = time.perf_counter()
        groups, gclass = levels[level]
        results[level] = distill_groups(model, reader, bundle.x_train, bundle.y_train, groups, gclass, cfg.distill,
                                        cfg.seed + 1000 * i, device, f"distill[{level}]", cfg.runtime.progress)
        timings[level] = time.perf_counter() - t1
        s = results[level]
        log.info("distill[%s]: %d synsets, matching loss %.4f -> %.4f (mean over groups) in %.1f s", level,
                 len(gclass), s.init_loss.mean(), s.final_loss.mean(), timings[level])
    path = artifact_path(cfg.runtime.out, "distill")
    with atomic_h5(path) as f:
        for level, s in results.items():
            g = f.create_group(level)
            g.create_dataset("images", data=s.images.numpy())
            g.create_dataset("labels", data=s.labels.numpy())
            g.create_dataset("group_class", data=s.group_class.numpy())
            g.create_dataset("loss_history", data=s.loss_history)
            g.create_dataset("init_loss", data=s.init_loss)
            g.create_dataset("final_loss", data=s.final_loss)
            g.create_dataset("grad_norm_real", data=s.grad_norm_real)
            g.create_dataset("grad_norm_syn", data=s.grad_norm_syn)
            g.create_dataset("size", data=s.size)
            g.attrs["seconds"] = timings[level]
        f.attrs["method"] = cfg.distill.method
        f.attrs["pairing"] = cfg.distill.resolved_pairing()
        f.attrs["sign"] = cfg.distill.sign
        f.attrs["distance"] = cfg.distill.distance
        f.attrs["include_1d"] = cfg.distill.include_1d
        f.attrs["unlearn_direction"] = 1.0 if cfg.distill.method == "ddm" else -1.0
        write_provenance(f, cfg, "distill", time.perf_counter() - t0)
    return path


@dataclass
class SynsetLevel:
    """One level of ``synsets.h5`` as the attribute stage uses it."""

    images: torch.Tensor  # float32 [G, ipc, C, H, W]
    labels: torch.Tensor  # int64 [G, ipc]
    group_class: torch.Tensor  # int64 [G]
    grad_norm_real: torch.Tensor  # float32 [G]
    grad_norm_syn: torch.Tensor  # float32 [G]
    size: torch.Tensor  # int64 [G]
    unlearn_direction: float  # +1 descent (ddm), -1 ascent (ddm-match)

    def subset(self, ids: torch.Tensor) -> SynsetLevel:
        return SynsetLevel(self.images[ids], self.labels[ids], self.group_class[ids], self.grad_norm_real[ids],
                           self.grad_norm_syn[ids], self.size[ids], self.unlearn_direction)


def read_synsets(run_dir: str | Path, level: str) -> SynsetLevel:
    """Read one level (``cluster`` or ``class``) of ``synsets.h5``."""
    with open_read(artifact_path(run_dir, "distill")) as f:
        if level not in f:
            raise ConfigError(f"synsets.h5 has no {level!r} synsets: re-run distill with --levels cluster,class")
        g = f[level]
        return SynsetLevel(*(torch.from_numpy(g[k][()]) for k in ("images", "labels", "group_class",
                                                                   "grad_norm_real", "grad_norm_syn", "size")),
                           unlearn_direction=float(f.attrs["unlearn_direction"]))
