"""Stage ``train``: train the target from theta_0 and record the trajectory theta_0..theta_tau.

Artifact ``train.h5``:
  trajectory/params        float32 [n_ckpt, P]  flat parameters, row 0 = theta_0, last = theta_tau
  trajectory/epoch         int64 [n_ckpt]
  trajectory/test_accuracy float32 [n_ckpt]      on the test subset
  trajectory/train_loss    float32 [n_ckpt]      mean minibatch loss of the epoch (NaN for epoch 0)
  params/{name,shape,ndim,offset,numel}          the table that unflattens a row
  data/train_index, data/test_index int64        rows of the source splits used
  attrs: test_accuracy (final), num_classes, image_shape, mean, std, + provenance

Data order is a seeded permutation per epoch over the *full* training set; a ``keep`` mask
drops removed samples from that same order, so leave-cluster-out retraining differs from the
full run only by the data removed, not by a reshuffle.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ddm_hpc.config import Config, TrainConfig
from ddm_hpc.data import DatasetBundle, MappedImages, load_dataset
from ddm_hpc.models import build_model, check_functional
from ddm_hpc.storage import ParamTable, artifact_path, atomic_h5, open_read, write_provenance
from ddm_hpc.utils import generator, memory_budget_bytes, progress, resolve_device

log = logging.getLogger(__name__)


@dataclass
class Trajectory:
    table: ParamTable
    params: torch.Tensor  # float32 [n_ckpt, P] on CPU
    epochs: list[int]
    test_accuracy: list[float]
    train_loss: list[float]


def load_data(cfg: Config) -> DatasetBundle:
    """The run's dataset: loaded into memory, or streamed into the run's cache and memory-mapped from it
    (``--data-cache mmap``)."""
    d = cfg.data
    if cfg.runtime.data_cache == "mmap":
        from ddm_hpc.data import mapped_dataset

        return mapped_dataset(d.dataset, d.data_root, Path(cfg.runtime.out) / ".data", n_train=d.n_train or None,
                              n_test=d.n_test or None, seed=cfg.seed, image_size=d.image_size,
                              show_progress=cfg.runtime.progress)
    return load_dataset(d.dataset, d.data_root, n_train=d.n_train or None, n_test=d.n_test or None, seed=cfg.seed,
                        image_size=d.image_size)


def build_target(cfg: Config, bundle: DatasetBundle, seed: int | None = None) -> nn.Module:
    """The target architecture, initialised from ``seed`` (default: cfg.seed) -> theta_0."""
    torch.manual_seed(cfg.seed if seed is None else seed)
    model = build_model(cfg.model.model, bundle.in_channels, bundle.num_classes, bundle.image_size,
                        **cfg.model.factory_kwargs())
    check_functional(model)
    return model


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


def resident_on(x: torch.Tensor | MappedImages, device: torch.device) -> bool:
    """Whether training copies ``x`` to ``device`` once: it is there already, or it fits a quarter of the free
    memory. Otherwise it stays where it is (host memory or a memory map) and each minibatch is gathered
    there and moved. Mapped images are never copied whole into host memory: on the CPU every minibatch
    is read from the map."""
    def fits() -> bool:
        return x.numel() * x.element_size() <= memory_budget_bytes(device)

    if isinstance(x, MappedImages):
        return device.type != "cpu" and fits()
    return x.device == device or fits()


def _fetch(x: torch.Tensor | MappedImages, idx: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` where it lives: a tensor's rows, or a mapped set's raw (uint8) rows."""
    return x.rows(idx) if isinstance(x, MappedImages) else x[idx.to(x.device)]


def _finish(x: torch.Tensor | MappedImages, rows: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Fetched rows as normalised images on ``device`` (a mapped set's are converted there)."""
    return x.normalise(rows, device) if isinstance(x, MappedImages) else rows.to(device, non_blocking=True)


class _Rows(torch.utils.data.Dataset):
    """``(_fetch(x, rows), y[rows])`` per batch of rows, for a DataLoader whose workers gather minibatches."""

    def __init__(self, x: torch.Tensor | MappedImages, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitems__(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.tensor(rows, dtype=torch.int64)
        return _fetch(self.x, idx), self.y[idx]


def minibatches(x: torch.Tensor | MappedImages, y: torch.Tensor, batches: list[torch.Tensor], device: torch.device,
                workers: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(x[b], y[b])`` on ``device`` for each index tensor ``b`` of ``batches``, in order.

    A mapped set's rows are read raw (uint8) and converted on ``device``: a GPU receives a quarter
    of the bytes and does the conversion. With ``workers`` > 0 a DataLoader's worker processes read
    the rows (a mapped set is mapped again in each worker, never copied; on a GPU the batches come
    in pinned memory), so reading the next batches overlaps the training step.
    """
    if workers == 0:
        for idx in batches:
            yield _finish(x, _fetch(x, idx), device), y[idx.to(y.device)].to(device)
        return
    from torch.utils.data import DataLoader

    from ddm_hpc.stream import _first

    loader = DataLoader(_Rows(x, y.cpu()), batch_sampler=[b.tolist() for b in batches], collate_fn=_first,
                        num_workers=workers, pin_memory=device.type == "cuda")
    for xb, yb in loader:
        yield _finish(x, xb, device), yb.to(device, non_blocking=True)


def train_trajectory(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    x_test: torch.Tensor,
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
        loader_workers: when ``x`` is not copied to ``device`` whole (:func:`resident_on`), processes that
            gather the minibatches (same batches, same order, same values); 0 = this process.
    """
    model.to(device).train()
    table = ParamTable.from_module(model)
    opt = torch.optim.SGD(model.parameters(), lr=tcfg.lr, momentum=tcfg.momentum, weight_decay=tcfg.weight_decay)
    resident = resident_on(x, device)
    x_dev, y_dev = (x.to(device), y.to(device)) if resident else (x, y)
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
        for xb, yb in minibatches(x_dev, y_dev, batches, device, 0 if resident else loader_workers):
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


def run_train(cfg: Config, bundle: DatasetBundle | None = None) -> Path:
    """Run the stage and write ``train.h5`` atomically; returns its path."""
    t0 = time.perf_counter()
    device = resolve_device(cfg.runtime.device)
    bundle = bundle or load_data(cfg)
    model = build_target(cfg, bundle)
    log.info("train: %s on %s, %d train / %d test images, %d parameters, %d epochs on %s",
             cfg.model.model, bundle.name, len(bundle.y_train), len(bundle.y_test),
             sum(p.numel() for p in model.parameters()), cfg.train.epochs, device)
    traj = train_trajectory(model, bundle.x_train, bundle.y_train, bundle.x_test, bundle.y_test, cfg.train,
                            cfg.seed, device, show_progress=cfg.runtime.progress,
                            loader_workers=cfg.runtime.loader_workers)
    path = artifact_path(cfg.runtime.out, "train")
    with atomic_h5(path) as f:
        g = f.create_group("trajectory")
        g.create_dataset("params", data=traj.params.numpy(), chunks=(1, traj.params.shape[1]))
        g.create_dataset("epoch", data=np.array(traj.epochs, dtype=np.int64))
        g.create_dataset("test_accuracy", data=np.array(traj.test_accuracy, dtype=np.float32))
        g.create_dataset("train_loss", data=np.array(traj.train_loss, dtype=np.float32))
        traj.table.write(f.create_group("params"))
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


class TrajectoryReader:
    """Reads trajectory rows from ``train.h5`` one at a time, keeping a small cache.

    Never loads the whole trajectory: memory is ``cache`` rows of P float32.
    """

    def __init__(self, path: str | Path, device: torch.device | str = "cpu", cache: int = 8):
        self.path = Path(path)
        with open_read(self.path) as f:
            self.table = ParamTable.read(f["params"])
            self.epochs = f["trajectory/epoch"][()].tolist()
            self.test_accuracy = f["trajectory/test_accuracy"][()].tolist()
        self.device = torch.device(device)
        self._cache: dict[int, torch.Tensor] = {}
        self._order: list[int] = []
        self._max = cache

    def __len__(self) -> int:
        return len(self.epochs)

    @property
    def tau(self) -> int:
        """Index of the last checkpoint (theta_tau)."""
        return len(self.epochs) - 1

    def flat(self, i: int) -> torch.Tensor:
        """Row ``i`` as float32 [P] on the reader's device."""
        i = i % len(self)
        if i not in self._cache:
            with h5py.File(self.path, "r", locking=False) as f:
                row = torch.from_numpy(f["trajectory/params"][i])
            self._cache[i] = row.to(self.device)
            self._order.append(i)
            if len(self._order) > self._max:
                self._cache.pop(self._order.pop(0))
        return self._cache[i]

    def params(self, i: int) -> dict[str, torch.Tensor]:
        return self.table.unflatten(self.flat(i))


class MemoryTrajectory:
    """A trajectory held in memory, with the reader interface the distill stage uses.

    For small problems and tests: ``MemoryTrajectory(traj.table, traj.params)``.
    """

    def __init__(self, table: ParamTable, rows: torch.Tensor, device: torch.device | str = "cpu"):
        self.table, self.rows, self.device = table, rows, torch.device(device)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def tau(self) -> int:
        return len(self.rows) - 1

    def flat(self, i: int) -> torch.Tensor:
        return self.rows[i].to(self.device)

    def params(self, i: int) -> dict[str, torch.Tensor]:
        return self.table.unflatten(self.flat(i))


def load_into(model: nn.Module, table: ParamTable, flat: torch.Tensor) -> nn.Module:
    """Copy a flat parameter row into ``model`` (names must match the table)."""
    params = table.unflatten(flat)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(params[name].to(p.device))
    return model
