"""Stage ``train``: train the target from theta_0 and record the trajectory theta_0..theta_tau.

Artifact ``train.h5``: the trajectory (``trajectory/*`` and ``params/*``, layout in
``ddm_hpc.trajectory``) and
  data/train_index, data/test_index int64        rows of the source splits used
  data/train_label int64
  attrs: test_accuracy (final), num_classes, image_shape, mean, std, + provenance

Data order is a seeded permutation per epoch over the *full* training set; a ``keep`` mask
drops removed samples from that same order, so leave-cluster-out retraining differs from the
full run only by the data removed, not by a reshuffle.

Room: a stage (imports ``config``, ``context``, ``data``, ``models``, ``storage``, ``trajectory``).
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ddm_hpc.config import Config, TrainConfig
from ddm_hpc.context import RunContext
from ddm_hpc.data import DatasetBundle, MappedImages, MinibatchReader
from ddm_hpc.models import model_factory
from ddm_hpc.storage import ParamTable, artifact_path, atomic_h5, read_attrs, write_provenance
from ddm_hpc.trajectory import Trajectory, write_trajectory
from ddm_hpc.utils import generator, progress

log = logging.getLogger(__name__)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """Permutation of the full training set for ``epoch`` (shared by full and leave-out runs)."""
    return torch.randperm(n, generator=generator(seed, 7, epoch))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1024) -> float:
    """Top-1 accuracy of ``model`` on (x [N,C,H,W], y [N]) on the model's device."""
    if len(y) == 0:
        return float("nan")
    dev = next(model.parameters()).device
    was = model.training
    model.eval()
    correct = 0
    for i in range(0, len(y), batch):
        correct += (model(x[i:i + batch].to(dev)).argmax(1).cpu() == y[i:i + batch]).sum().item()
    model.train(was)
    return correct / len(y)


def train_trajectory(
    model: nn.Module,
    x: torch.Tensor | MappedImages,
    y: torch.Tensor,
    x_test: torch.Tensor | MappedImages,
    y_test: torch.Tensor,
    tcfg: TrainConfig,
    seed: int,
    device: torch.device,
    keep: torch.Tensor | None = None,
    show_progress: bool = True,
    loader_workers: int = 0,
) -> Trajectory:
    """SGD from the model's current parameters (theta_0); record every ``save_every`` epochs.

    Args:
        model: initialised target (its parameters are theta_0; trained in place).
        x, y: training images float32 [N,C,H,W] and labels int64 [N].
        x_test, y_test: evaluation split for the recorded accuracies.
        tcfg: epochs, batch size, lr, momentum, weight decay, save_every.
        seed: seeds the per-epoch data order (``epoch_order``).
        device: where to train.
        keep: optional bool [N]; False rows are dropped from the full run's data order.
        loader_workers: when ``x`` is not copied to ``device`` whole (``data.resident_on``), processes that
            gather the minibatches (same batches, same order, same values); 0 = this process.
    """
    model.to(device).train()
    table = ParamTable.from_module(model)
    opt = torch.optim.SGD(model.parameters(), lr=tcfg.lr, momentum=tcfg.momentum, weight_decay=tcfg.weight_decay)
    reader = MinibatchReader(x, y, device, loader_workers)
    keep_cpu = None if keep is None else keep.bool().cpu()
    rows = [table.flatten(dict(model.named_parameters()))]
    epochs, accs, losses = [0], [accuracy(model, x_test, y_test)], [float("nan")]
    bar = progress(range(1, tcfg.epochs + 1), "train", show_progress)
    for epoch in bar:
        order = epoch_order(len(y), seed, epoch)
        if keep_cpu is not None:
            order = order[keep_cpu[order]]
        total, count = 0.0, 0
        batches = list(order.split(tcfg.batch_size))
        for xb, yb in reader(batches):
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(yb)
            count += len(yb)
        if not math.isfinite(total):
            raise FloatingPointError(f"training diverged at epoch {epoch} (loss {total}): lower --lr")
        if epoch % tcfg.save_every == 0 or epoch == tcfg.epochs:
            rows.append(table.flatten(dict(model.named_parameters())))
            epochs.append(epoch)
            accs.append(accuracy(model, x_test, y_test))
            losses.append(total / max(count, 1))
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{losses[-1]:.3f}", acc=f"{accs[-1]:.3f}")
    return Trajectory(table, torch.stack(rows), epochs, accs, losses)


def check(cfg: Config) -> None:
    """``--model`` names a registered model or a factory that imports (before any data is read)."""
    model_factory(cfg.model.model)


def run(cfg: Config, bundle: DatasetBundle | None = None) -> Path:
    """Run the stage and write ``train.h5`` atomically; returns its path."""
    t0 = time.perf_counter()
    ctx = RunContext(cfg, bundle)
    bundle, device = ctx.bundle, ctx.device
    model = ctx.build_model()
    log.info("train: %s on %s, %d train / %d test images, %d parameters, %d epochs on %s",
             cfg.model.model, bundle.name, len(bundle.y_train), len(bundle.y_test),
             sum(p.numel() for p in model.parameters()), cfg.train.epochs, device)
    traj = train_trajectory(model, bundle.x_train, bundle.y_train, bundle.x_test, bundle.y_test, cfg.train,
                            cfg.seed, device, show_progress=cfg.runtime.progress,
                            loader_workers=cfg.runtime.loader_workers)
    path = artifact_path(cfg.runtime.out, "train")
    with atomic_h5(path) as f:
        write_trajectory(f, traj)
        d = f.create_group("data")
        d.create_dataset("train_index", data=bundle.train_index.numpy())
        d.create_dataset("test_index", data=bundle.test_index.numpy())
        d.create_dataset("train_label", data=bundle.y_train.numpy())
        f.attrs["test_accuracy"] = traj.test_accuracy[-1]
        f.attrs["num_classes"] = bundle.num_classes
        f.attrs["image_shape"] = list(bundle.image_shape)
        f.attrs["mean"] = list(bundle.mean)
        f.attrs["std"] = list(bundle.std)
        write_provenance(f, cfg, "train", time.perf_counter() - t0)
    log.info("train: test accuracy %.4f after %d epochs (%.1f s) -> %s", traj.test_accuracy[-1], cfg.train.epochs,
             time.perf_counter() - t0, path)
    return path


def summary(run_dir: str | Path, n_show: int = 10) -> list[str]:
    """The ``ddm-hpc show`` line of ``train.h5``."""
    a = read_attrs(artifact_path(run_dir, "train"))
    return [f"  train      {a['seconds']:7.1f} s  test accuracy {a['test_accuracy']:.4f}"] if a else []
