"""Unlearning by fine-tuning: the one place that removes groups from theta_tau with their synsets (Eq. 9).

For each perturbation p in {0,1}^G (p_k = 0: group k removed), a copy of theta_tau is fine-tuned
for T full-batch steps on the synsets of the removed groups (descent for reverse-matched synsets,
ascent for forward-matched ones, so both *remove* the groups' contribution), each removed group's
synset weighted by ``--finetune-scale``. Many perturbations are fine-tuned together: stacked
parameters, one ``vmap(grad(...))`` per step, chunked to fit memory (:func:`finetune_many`, which
also fine-tunes on real rows for the baselines of ``diagnose unlearn``).

:class:`Unlearner` resolves everything once for a run: theta_tau, T (``--finetune-steps``, 0 = tau),
eta_f (``--finetune-lr``, 0 = the training lr), the per-group weights and the models per vmap call.
The attribute stage, ``evaluate`` (Table 4), ``diagnose`` and the benchmarks all unlearn through it.

Room: imports ``config``, ``context``, ``models`` and ``synsets``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, vmap

from ddm_hpc.config import FINETUNE_BLOCK, TrainConfig
from ddm_hpc.context import RunContext
from ddm_hpc.errors import ConfigError, StageError
from ddm_hpc.models import forward_with
from ddm_hpc.synsets import SynsetLevel, read_synsets
from ddm_hpc.utils import memory_budget_bytes, progress


@dataclass
class FinetuneSpec:
    """Which rows each fine-tuned model trains on, and with what loss weight."""

    rows: torch.Tensor  # int64 [M, R] index into the training rows (a flattened synset; padding: 0)
    weights: torch.Tensor  # float32 [M, R] (0 = padding)


def removal_spec(perturbations: torch.Tensor, ipc: int, group_weight: torch.Tensor | None = None,
                 width: int = 0) -> FinetuneSpec:
    """For each row of ``perturbations`` (1 = kept), the synthetic images of its removed groups.

    Each removed group contributes ``group_weight[k]`` (default 1) times the mean loss of its
    ``ipc`` images, so removing more groups moves the model further. Rows are padded to ``width``
    (0 = the most any row removes, times ``ipc``: :func:`removal_width`).
    """
    k = perturbations.shape[1]
    gw = torch.ones(k) if group_weight is None else group_weight.float()
    removed = [torch.nonzero(p == 0)[:, 0] for p in perturbations]
    width = width or removal_width(perturbations, ipc)
    rows = torch.zeros(len(removed), width, dtype=torch.long)
    weights = torch.zeros(len(removed), width)
    for i, r in enumerate(removed):
        idx = (r[:, None] * ipc + torch.arange(ipc)[None, :]).reshape(-1)
        rows[i, :len(idx)] = idx
        weights[i, :len(idx)] = gw[r].repeat_interleave(ipc) / ipc
    return FinetuneSpec(rows, weights)


def removal_width(perturbations: torch.Tensor, ipc: int) -> int:
    """Padded row width of :func:`removal_spec`: the most groups any perturbation removes, times ``ipc`` (>= 1)."""
    return max(1, int((perturbations == 0).sum(1).max()) * ipc) if len(perturbations) else 1


def group_weights(level: SynsetLevel, scale: str, train_lr: float, momentum: float, batch_size: int,
                  finetune_lr: float, epochs_per_step: float = 1.0) -> torch.Tensor:
    """Per-group loss weight c_k of the fine-tune (``--finetune-scale``).

    Training (Eq. 2) applies, per epoch, lr * (n_k / B) * mean grad(D_k) from cluster k, and
    momentum mu stretches every step by 1/(1-mu). Cosine matching fixes only the direction of
    grad(S_k), so ``matched`` rescales it: one fine-tune step of rate eta_f then moves theta by
    what the cluster contributed over one recorded trajectory step, ``epochs_per_step`` epochs
    (``--save-every``; epochs / tau), and T = tau steps undo the whole training (Eq. 3).
    """
    if scale == "uniform":
        return torch.ones(len(level.size))
    eff_lr = train_lr / (1.0 - momentum)
    ratio = level.grad_norm_real / level.grad_norm_syn.clamp(min=1e-12)
    w = (eff_lr / finetune_lr) * (level.size.float() / batch_size) * ratio
    return w if epochs_per_step == 1.0 else w * epochs_per_step


def activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of all module outputs for a forward pass of one image of ``x`` (a memory estimate).

    The image is moved to the model's device first (``x`` may sit on the host while the model is on a GPU).
    """
    device = next((t.device for t in (*model.parameters(), *model.buffers())), x.device)
    total = 0

    def hook(_m, _i, out):
        nonlocal total
        if isinstance(out, torch.Tensor):
            total += out.numel() * out.element_size()

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    with torch.no_grad():
        model(x[:1].to(device))
    for h in handles:
        h.remove()
    return total


def auto_chunk(model: nn.Module, n_params: int, rows: int, sample: torch.Tensor, device: torch.device) -> int:
    """How many models to fine-tune at once so params, grads and activations fit the budget."""
    per_model = 4 * 4 * n_params + 3 * max(rows, 1) * activation_bytes(model, sample)
    return int(max(1, min(512, memory_budget_bytes(device) // max(per_model, 1))))


def finetune_many(model: nn.Module, theta: dict[str, torch.Tensor], syn_x: torch.Tensor, syn_y: torch.Tensor,
                  spec: FinetuneSpec, steps: int, lr: float, direction: float, eval_x: torch.Tensor,
                  chunk: int, device: torch.device, desc: str = "fine-tune", show_progress: bool = True,
                  buffers: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Fine-tune one copy of ``theta`` per row of ``spec`` and return its softmax outputs.

    Args:
        model: architecture; theta: name -> tensor, the start point (theta_tau).
        syn_x: float32 [S, C, H, W] training rows (a flattened synset); syn_y: int64 [S] labels or float32 [S, L]
            soft labels.
        spec: per model, the rows it trains on and their weights (loss = sum of w * CE).
        steps, lr: T full-batch SGD steps of rate lr; direction +1 descent, -1 ascent.
        eval_x: float32 [E, C, H, W] images to evaluate the fine-tuned models on.
        chunk: models per vmap call.
        buffers: theta's buffers (BatchNorm statistics; every model runs in eval mode with them), or None.

    Returns:
        float32 [M, E, L] softmax probabilities on CPU.
    """
    theta = {k: v.detach().to(device) for k, v in theta.items()}
    syn_x, syn_y, eval_x = syn_x.to(device), syn_y.to(device), eval_x.to(device)
    buffers = {k: v.to(device) for k, v in (buffers or {}).items()}

    def loss(p, xb, yb, wb):
        out = forward_with(model, p, xb, buffers)
        return (F.cross_entropy(out, yb, reduction="none") * wb).sum()

    step_fn = vmap(grad(loss), in_dims=(0, 0, 0, 0))
    eval_fn = vmap(lambda p, x: forward_with(model, p, x, buffers), in_dims=(0, None))
    outs = []
    starts = range(0, len(spec.rows), chunk)
    for m0 in starts:
        rows = spec.rows[m0:m0 + chunk].to(device)
        w = spec.weights[m0:m0 + chunk].to(device)
        m = len(rows)
        params = {k: v.expand(m, *v.shape).clone() for k, v in theta.items()}
        xb, yb = syn_x[rows], syn_y[rows]
        label = f"{desc} {m0 + m}/{len(spec.rows)} models" if len(starts) > 1 else f"{desc} {m} models"
        for _ in progress(range(steps), label, show_progress):
            g = step_fn(params, xb, yb, w)
            params = {k: v - (direction * lr) * g[k] for k, v in params.items()}
        with torch.no_grad():
            logits = torch.cat([eval_fn(params, eval_x[e:e + 256]) for e in range(0, len(eval_x), 256)], 1)
        outs.append(logits.softmax(-1).float().cpu())
    return torch.cat(outs)


def step_with_rates(model: nn.Module, theta: dict[str, torch.Tensor], syn_x: torch.Tensor, syn_y: torch.Tensor,
                    removed: torch.Tensor, rates: torch.Tensor, rate_names: tuple[str, ...], lr: float,
                    direction: float, eval_x: torch.Tensor, chunk: int, device: torch.device,
                    desc: str = "fine-tune", show_progress: bool = True,
                    buffers: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """One fine-tune step per model in which each removed group's synset steps every parameter tensor at its own
    rate (``--layer-rates``): theta_m = theta - direction lr sum_k removed[m, k] rates[k, l] grad_l L(theta; S_k),
    L the mean CE over the group's images, every gradient at ``theta``. With all rates 1 this is one step of
    :func:`finetune_many`.

    Args:
        syn_x: float32 [G, ipc, C, H, W]; syn_y: int64 [G, ipc] or float32 [G, ipc, L] soft labels.
        removed: float32 [M, G] each removed group's loss weight per model (0: kept).
        rates: float32 [G, n_tensors], columns ``rate_names`` (every parameter of ``theta``, any order).
        chunk: models per block; only the groups a block removes have their gradients computed.

    Returns:
        float32 [M, E, L] softmax probabilities on CPU.
    """
    if sorted(rate_names) != sorted(theta):
        raise StageError(f"synsets.h5's layer rates are for the tensors {list(rate_names)}, not this model's "
                         f"{list(theta)}: rerun distill with --overwrite")
    theta = {k: v.detach().to(device) for k, v in theta.items()}
    buffers = {k: v.to(device) for k, v in (buffers or {}).items()}
    col = {name: i for i, name in enumerate(rate_names)}

    def loss(p, xb, yb):
        return F.cross_entropy(forward_with(model, p, xb, buffers), yb)

    group_grad = vmap(grad(loss), in_dims=(None, 0, 0))
    if device.type == "cpu":  # vmap over parameters turns convolutions into grouped ones: ~3x slower on CPU
        def eval_fn(p, x):
            return torch.stack([forward_with(model, {k: v[m] for k, v in p.items()}, x, buffers)
                                for m in range(len(next(iter(p.values()))))])
    else:
        eval_fn = vmap(lambda p, x: forward_with(model, p, x, buffers), in_dims=(0, None))
    outs = []
    for m0 in progress(range(0, len(removed), chunk), desc, show_progress):
        w = removed[m0:m0 + chunk].to(device)
        used = torch.nonzero(w.sum(0) != 0)[:, 0]
        step = {k: torch.zeros(len(w), *v.shape, device=device) for k, v in theta.items()}
        for g0 in range(0, len(used), chunk):
            ids = used[g0:g0 + chunk]
            g = group_grad(theta, syn_x[ids.cpu()].to(device), syn_y[ids.cpu()].to(device))
            r = rates[ids.cpu()].to(device)
            for k in step:
                scaled = (g[k] * r[:, col[k]].reshape(-1, *[1] * (g[k].dim() - 1))).reshape(len(ids), -1)
                step[k] += (w[:, ids] @ scaled).reshape(step[k].shape)
        params = {k: v[None] - (direction * lr) * step[k] for k, v in theta.items()}
        with torch.no_grad():
            logits = torch.cat([eval_fn(params, eval_x[e:e + 256].to(device)) for e in range(0, len(eval_x), 256)], 1)
        outs.append(logits.softmax(-1).float().cpu())
    return torch.cat(outs)


@dataclass
class Unlearner:
    """Removes groups from theta_tau by fine-tuning on their synsets, with steps, rate and weights resolved once.

    Attributes:
        model: the target architecture on ``device`` (its own parameters are not used).
        theta: theta_tau, name -> tensor on ``device``.
        steps: T, full-batch fine-tune steps.
        lr: eta_f, the fine-tune rate.
        scale: ``--finetune-scale`` (matched or uniform).
        train: the training schedule (lr, momentum, batch size: the ``matched`` weights follow it).
        batch_models: models per vmap call; 0 = :data:`~ddm_hpc.config.FINETUNE_BLOCK`, fewer if memory is short.
        device, show_progress: where to compute and whether to show bars.
    """

    model: nn.Module
    theta: dict[str, torch.Tensor]
    steps: int
    lr: float
    scale: str
    train: TrainConfig
    batch_models: int
    device: torch.device
    show_progress: bool = True
    epochs_per_step: float = 1.0  # training epochs per recorded trajectory step (epochs / tau)
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)  # theta_tau's buffers (BatchNorm), on device

    @classmethod
    def of_run(cls, ctx: RunContext) -> Unlearner:
        """The run's unlearner: theta_tau of its ``train.h5``, ``--finetune-steps`` (0 = 1 for influence and
        displacement synsets, tau for trajectory pairs), ``--finetune-lr`` (0 = the training lr), ``--finetune-scale``
        (auto = by the synsets' target) and ``--batch-models`` of its config."""
        cfg = ctx.cfg
        reader = ctx.trajectory(ctx.device)
        return cls(ctx.build_model().to(ctx.device).eval(), reader.params(reader.tau),
                   cfg.finetune_step_count(reader.tau), cfg.finetune_rate, cfg.finetune_weighting, cfg.train,
                   cfg.attribute.batch_models, ctx.device, cfg.runtime.progress, cfg.train.epochs / max(reader.tau, 1),
                   reader.buffers(reader.tau))

    def weights(self, level: SynsetLevel) -> torch.Tensor:
        """c_k, the loss weight of each group's synset (:func:`group_weights`)."""
        t = self.train
        return group_weights(level, self.scale, t.lr, t.momentum, t.batch_size, self.lr, self.epochs_per_step)

    def unlearn(self, level: SynsetLevel, perturbations: torch.Tensor, eval_x: torch.Tensor, rows: slice = slice(None),
                desc: str = "fine-tune", chunk: int = 0) -> torch.Tensor:
        """Softmax outputs float32 [M, E, L] on ``eval_x`` of the models of perturbation rows ``rows``.

        The removal spec's padding width is that of all rows, so a block of rows is fine-tuned the same
        whichever other rows share its task; only the block's rows are built. ``chunk``: models per vmap call
        (0: ``batch_models``).
        """
        ipc = level.images.shape[1]
        if level.layer_rates is not None:
            if self.steps != 1:
                raise ConfigError(f"synsets with layer rates (--layer-rates) are removed by one fine-tune step, not "
                                  f"{self.steps}: pass --finetune-steps 1")
            removed = (perturbations[rows] == 0).float() * self.weights(level).float()[None, :]
            return step_with_rates(self.model, self.theta, level.images, level.train_targets, removed,
                                   level.layer_rates, level.rate_names, self.lr, level.unlearn_direction, eval_x,
                                   chunk or self.batch_models or FINETUNE_BLOCK, self.device, desc,
                                   self.show_progress, self.buffers)
        spec = removal_spec(perturbations[rows], ipc, self.weights(level), removal_width(perturbations, ipc))
        chunk = chunk or self.batch_models or min(FINETUNE_BLOCK, auto_chunk(
            self.model, sum(v.numel() for v in self.theta.values()),
            max(spec.rows.shape[1], min(len(eval_x), 256)), eval_x, self.device))
        images = level.images
        return finetune_many(self.model, self.theta, images.reshape(-1, *images.shape[2:]), level.flat_targets(),
                             spec, self.steps, self.lr, level.unlearn_direction, eval_x, chunk, self.device, desc,
                             self.show_progress, self.buffers)

    def finetune(self, x: torch.Tensor, y: torch.Tensor, spec: FinetuneSpec, direction: float, eval_x: torch.Tensor,
                 desc: str, chunk: int) -> torch.Tensor:
        """Fine-tune on real rows ``x``/``y`` as ``spec`` says (same steps and rate): the simple alternatives."""
        return finetune_many(self.model, self.theta, x, y, spec, self.steps, self.lr, direction, eval_x, chunk,
                             self.device, desc, self.show_progress, self.buffers)


def unlearn_all_accuracy(ctx: RunContext, synsets: RunContext | None = None) -> float:
    """Test accuracy of theta_tau fine-tuned on *all* cluster synsets (Table 4's "unlearn everything").

    Uses the attribute stage's fine-tune (same steps, rate, scale and direction) with every cluster
    removed; exact retraining on nothing is theta_0, whose accuracy is the reference. ``synsets``: the run
    whose synsets (and options) to use (a variant of ``ctx``, which shares its train.h5; default ``ctx``).
    """
    src = synsets or ctx
    level = read_synsets(src.run_dir, "cluster")
    unlearner = Unlearner.of_run(RunContext(src.cfg, ctx.bundle, ctx.device))
    probs = unlearner.unlearn(level, torch.zeros(1, len(level.size)), ctx.bundle.x_test, desc="unlearn all", chunk=1)
    return float((probs[0].argmax(1) == ctx.bundle.y_test).float().mean())


def train_all_accuracy(ctx: RunContext, synsets: RunContext) -> float:
    """Test accuracy of theta_0 *trained* on all of ``synsets``' cluster synsets: Table 4's protocol for forward-
    matched synsets (DDM-match), which the paper trains from theta_0 (their Acc(theta_tau) column) instead of
    unlearning from theta_tau. Descent with the attribute stage's steps, rate and weights (of ``synsets``' config)."""
    level = dataclasses.replace(read_synsets(synsets.run_dir, "cluster"), unlearn_direction=1.0)
    unlearner = Unlearner.of_run(RunContext(synsets.cfg, ctx.bundle, ctx.device))
    reader = ctx.trajectory(ctx.device)
    unlearner = dataclasses.replace(unlearner, theta=reader.params(0), buffers=reader.buffers(0))
    probs = unlearner.unlearn(level, torch.zeros(1, len(level.size)), ctx.bundle.x_test, desc="train on all", chunk=1)
    return float((probs[0].argmax(1) == ctx.bundle.y_test).float().mean())


__all__ = ["Unlearner", "FinetuneSpec", "removal_spec", "removal_width", "group_weights", "finetune_many",
           "step_with_rates", "auto_chunk",
           "unlearn_all_accuracy", "train_all_accuracy"]
