"""Stage ``train``: train the target from theta_0 and record the trajectory theta_0..theta_tau.

Artifact ``train.h5``: the trajectory (``trajectory/*`` and ``params/*``, layout in
``ddm_hpc.trajectory``) and
  data/train_index, data/test_index int64        rows of the source splits used
  data/train_label int64
  attrs: test_accuracy (final), num_classes, image_shape, mean, std, + provenance

Data order is a seeded permutation per epoch over the *full* training set; a ``keep`` mask
drops removed samples from that same order, so leave-cluster-out retraining differs from the
full run only by the data removed, not by a reshuffle.

Resumable: after every epoch the stage saves its state (parameters, the optimizer's momentum, the
epoch; the data order is a function of (seed, epoch), so no RNG state is needed) and every
recorded trajectory row under ``RUN/.train-resume/`` (``torch.save``, read back with
``weights_only=True``; each file written to a temp name, then renamed). A rerun after a kill
continues after the last saved epoch and finishes bit-identical to an uninterrupted run on CPU;
state saved for another config (stage key) is discarded. The folder is removed once ``train.h5``
is written.

Room: a stage (imports ``config``, ``context``, ``data``, ``models``, ``storage``, ``trajectory``).
"""
from __future__ import annotations

import json
import logging
import math
import os
import pickle
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ddm_hpc.config import Config, TrainConfig
from ddm_hpc.context import RunContext
from ddm_hpc.data import DatasetBundle, MappedImages, MinibatchReader
from ddm_hpc.models import model_factory
from ddm_hpc.storage import ParamTable, artifact_path, atomic_h5, create_dataset, read_attrs, write_provenance
from ddm_hpc.trajectory import Trajectory, write_trajectory
from ddm_hpc.utils import generator, progress

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Training after ``epoch`` complete epochs: enough to continue bit-identically.

    Attributes:
        epoch: epochs done. model: the model's ``state_dict``. optimizer: the SGD ``state_dict`` (momentum).
        rows: the recorded flat parameters so far (float32 [P] each), with their ``epochs``,
            ``accs`` (test accuracy) and ``losses`` (mean training loss; NaN for theta_0).
        buffer_rows: the recorded flat buffers (float32 [B] each), one per row; empty for a buffer-free model.
    """

    epoch: int
    model: dict[str, torch.Tensor]
    optimizer: dict
    rows: list[torch.Tensor] = field(default_factory=list)
    epochs: list[int] = field(default_factory=list)
    accs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    buffer_rows: list[torch.Tensor] = field(default_factory=list)


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
    weights: torch.Tensor | None = None,
    resume: TrainState | None = None,
    on_epoch: Callable[[TrainState], None] | None = None,
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
        weights: optional float [N] loss weight of each row; every batch keeps its slots and its loss is
            ``(1/B) sum_i w_i l_i`` (B = the batch's slot count), so a zero weight removes a row's contribution
            and nothing else (the ``zero-weight`` ground-truth protocol; the replay metagradient is taken
            with respect to these). None = the plain mean (all-ones weights reproduce it bit for bit on CPU).
        resume: continue after ``resume.epoch`` from its parameters, momentum and recorded rows (the model's
            own parameters are overwritten); the result is that of the uninterrupted run.
        on_epoch: called with the :class:`TrainState` after every epoch (the stage saves it).
        loader_workers: when ``x`` is not copied to ``device`` whole (``data.resident_on``), processes that
            gather the minibatches (same batches, same order, same values); 0 = this process.
    """
    model.to(device).train()  # BatchNorm updates its running statistics as usual; they are recorded with the row
    table, btable = ParamTable.from_module(model), ParamTable.buffers_of(model)

    def record() -> None:
        rows.append(table.flatten(dict(model.named_parameters())))
        if btable.names:
            buffer_rows.append(btable.flatten(dict(model.named_buffers())))
    opt = torch.optim.SGD(model.parameters(), lr=tcfg.lr, momentum=tcfg.momentum, weight_decay=tcfg.weight_decay)
    reader = MinibatchReader(x, y, device, loader_workers)
    keep_cpu = None if keep is None else keep.bool().cpu()
    if weights is not None and len(weights) != len(y):
        raise ValueError(f"weights has {len(weights)} rows for {len(y)} training images")
    w_cpu = None if weights is None else weights.detach().cpu()
    if resume is None:
        rows, buffer_rows = [], []
        record()
        epochs, accs, losses = [0], [accuracy(model, x_test, y_test)], [float("nan")]
        start = 1
    else:
        model.load_state_dict(resume.model)
        opt.load_state_dict(resume.optimizer)
        rows, epochs, accs, losses = list(resume.rows), list(resume.epochs), list(resume.accs), list(resume.losses)
        buffer_rows = list(resume.buffer_rows)
        start = resume.epoch + 1
    bar = progress(range(start, tcfg.epochs + 1), "train", show_progress)
    for epoch in bar:
        order = epoch_order(len(y), seed, epoch)
        if keep_cpu is not None:
            order = order[keep_cpu[order]]
        # the epoch's loss sum stays on the device (float64, the same sums as Python floats): one sync per epoch
        total_t, count = torch.zeros((), dtype=torch.float64, device=device), 0
        batches = list(order.split(tcfg.batch_size))
        for rows_b, (xb, yb) in zip(batches, reader(batches)):
            if w_cpu is None:
                loss = F.cross_entropy(model(xb), yb)
            else:
                wb = w_cpu[rows_b].to(device, non_blocking=True)
                loss = (F.cross_entropy(model(xb), yb, reduction="none") * wb).sum() / len(yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total_t += loss.detach().double() * len(yb)
            count += len(yb)
        total = float(total_t)
        if not math.isfinite(total):
            raise FloatingPointError(f"training diverged at epoch {epoch} (loss {total}): lower --lr")
        if epoch % tcfg.save_every == 0 or epoch == tcfg.epochs:
            record()
            epochs.append(epoch)
            accs.append(accuracy(model, x_test, y_test))
            losses.append(total / max(count, 1))
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{losses[-1]:.3f}", acc=f"{accs[-1]:.3f}")
        if on_epoch is not None:
            on_epoch(TrainState(epoch, model.state_dict(), opt.state_dict(), rows, epochs, accs, losses, buffer_rows))
    buffers = torch.stack(buffer_rows) if buffer_rows else None
    return Trajectory(table, torch.stack(rows), epochs, accs, losses, btable if buffer_rows else None, buffers)


# ----------------------------------------------------------------------------- resuming the stage
def resume_dir(run_dir: str | Path) -> Path:
    """Where the train stage keeps its per-epoch state until ``train.h5`` is written."""
    return Path(run_dir) / ".train-resume"


def _save_atomic(obj: object, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class ResumeFiles:
    """The train stage's resume folder for one stage key: ``state.pt`` (latest epoch) and ``row_<epoch>.pt``."""

    def __init__(self, run_dir: str | Path, key: str) -> None:
        self.dir, self.key = resume_dir(run_dir), key

    def save(self, st: TrainState) -> None:
        """Save ``st``: its newest row if that epoch was recorded, then the state that points past it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for i, e in enumerate(st.epochs):
            path = self.dir / f"row_{e:06d}.pt"
            if not path.exists():
                extra = {"buffers": st.buffer_rows[i]} if st.buffer_rows else {}
                _save_atomic({"key": self.key, "epoch": e, "row": st.rows[i], "acc": st.accs[i],
                              "loss": st.losses[i], **extra}, path)
        _save_atomic({"key": self.key, "epoch": st.epoch, "model": st.model, "optimizer": st.optimizer},
                     self.dir / "state.pt")

    def load(self) -> TrainState | None:
        """The saved state if it was made with this key and all its rows are present, else None (logged)."""
        path = self.dir / "state.pt"
        if not path.exists():
            return None
        try:
            st = torch.load(path, map_location="cpu", weights_only=True)
            rows = [torch.load(p, map_location="cpu", weights_only=True) for p in sorted(self.dir.glob("row_*.pt"))]
        except (OSError, RuntimeError, EOFError, KeyError, pickle.UnpicklingError) as e:  # truncated or not ours
            log.warning("train: ignoring unreadable resume state in %s (%s: %s); training from epoch 0",
                        self.dir, type(e).__name__, e)
            return None
        rows = [r for r in rows if r.get("key") == self.key and r["epoch"] <= st["epoch"]]
        if st.get("key") != self.key or not rows or rows[0]["epoch"] != 0:
            log.warning("train: resume state in %s was saved for another config; training from epoch 0", self.dir)
            return None
        log.info("train: resuming after epoch %d from %s", st["epoch"], self.dir)
        return TrainState(int(st["epoch"]), st["model"], st["optimizer"], [r["row"] for r in rows],
                          [int(r["epoch"]) for r in rows], [float(r["acc"]) for r in rows],
                          [float(r["loss"]) for r in rows], [r["buffers"] for r in rows if "buffers" in r])

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


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
    saved = ResumeFiles(cfg.runtime.out, cfg.stage_key("train"))
    state = saved.load()
    if state is None:
        saved.clear()  # nothing usable: no stale row may be taken for this run's
    traj = train_trajectory(model, bundle.x_train, bundle.y_train, bundle.x_test, bundle.y_test, cfg.train,
                            cfg.seed, device, show_progress=cfg.runtime.progress,
                            loader_workers=cfg.runtime.loader_workers, resume=state, on_epoch=saved.save)
    path = write_artifact(cfg, bundle, traj, time.perf_counter() - t0)
    saved.clear()
    log.info("train: test accuracy %.4f after %d epochs (%.1f s) -> %s", traj.test_accuracy[-1], cfg.train.epochs,
             time.perf_counter() - t0, path)
    return path


def write_artifact(cfg: Config, bundle: DatasetBundle, traj: Trajectory, seconds: float, **attrs: object) -> Path:
    """Write ``RUN/train.h5`` atomically (layout in the module docstring; ``attrs``: extra root attrs)."""
    path = artifact_path(cfg.runtime.out, "train")
    with atomic_h5(path) as f:
        write_trajectory(f, traj)
        d = f.create_group("data")
        create_dataset(d, "train_index", data=bundle.train_index.numpy())
        create_dataset(d, "test_index", data=bundle.test_index.numpy())
        create_dataset(d, "train_label", data=bundle.y_train.numpy())
        f.attrs["test_accuracy"] = traj.test_accuracy[-1]
        f.attrs["num_classes"] = bundle.num_classes
        f.attrs["image_shape"] = list(bundle.image_shape)
        f.attrs["mean"] = list(bundle.mean)
        f.attrs["std"] = list(bundle.std)
        f.attrs.update(attrs)
        write_provenance(f, cfg, "train", seconds)
    return path


def summary(run_dir: str | Path, n_show: int = 10) -> list[str]:
    """The ``ddm-hpc show`` line of ``train.h5``."""
    a = read_attrs(artifact_path(run_dir, "train"))
    if a and a.get("imported"):
        n = len(json.loads(str(a["imported"]))["files"])
        return [f"  train      {a['seconds']:7.1f} s  imported {n} checkpoints, test accuracy {a['test_accuracy']:.4f}"]
    return [f"  train      {a['seconds']:7.1f} s  test accuracy {a['test_accuracy']:.4f}"] if a else []
