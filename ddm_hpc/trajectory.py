"""The recorded trajectory theta_0..theta_tau: written into ``train.h5`` by the train stage, read by every later one.

``train.h5`` layout (the ``trajectory`` and ``params`` groups)::

  trajectory/params        float32 [n_ckpt, P]  flat parameters, row 0 = theta_0, last = theta_tau
  trajectory/epoch         int64 [n_ckpt]
  trajectory/test_accuracy float32 [n_ckpt]      on the test subset
  trajectory/train_loss    float32 [n_ckpt]      mean minibatch loss of the epoch (NaN for epoch 0)
  params/{name,shape,ndim,offset,numel}          the table that unflattens a row
  trajectory/buffers       float32 [n_ckpt, B]  only for models with buffers (BatchNorm running statistics and
  buffers/{name,shape,...}                       counters), row i saved with parameter row i; absent otherwise

Models with buffers are evaluated (features, per-cluster gradients, fine-tunes, peers) in eval mode with the
buffers of the checkpoint in use (``Checkpoints.buffers(i)``; ``models.forward_with``).

:class:`TrajectoryReader` reads rows one at a time through a cache sized to what fits (every row when
tau + 1 rows take at most a tenth of the device's free memory, else 8), so the distill stage, which draws
its pairs from all tau + 1 checkpoints, reads each row from HDF5 and copies it to the device once;
:class:`MemoryTrajectory` is the same interface (:class:`Checkpoints`) over rows in memory.

Room: imports ``storage``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import nn

from ddm_hpc.storage import ParamTable, artifact_path, create_dataset, open_read
from ddm_hpc.utils import memory_budget_bytes, to_device


@dataclass
class Trajectory:
    """A trajectory in memory, as training records it."""

    table: ParamTable
    params: torch.Tensor  # float32 [n_ckpt, P] on CPU
    epochs: list[int]
    test_accuracy: list[float]
    train_loss: list[float]
    buffer_table: ParamTable | None = None  # the saved buffers, when the model has any
    buffers: torch.Tensor | None = None  # float32 [n_ckpt, B] on CPU

    def state_row(self, i: int = -1) -> torch.Tensor:
        """Row ``i``'s parameters, then its buffers if any: what :func:`load_into` restores a model from."""
        return self.params[i] if self.buffers is None else torch.cat([self.params[i], self.buffers[i]])


def write_trajectory(f: h5py.File, traj: Trajectory) -> None:
    """The ``trajectory``, ``params`` (and ``buffers``) groups of ``train.h5`` (layout in the module docstring)."""
    g = f.create_group("trajectory")
    create_dataset(g, "params", data=traj.params.numpy(), chunks=(1, traj.params.shape[1]))
    create_dataset(g, "epoch", data=np.array(traj.epochs, dtype=np.int64))
    create_dataset(g, "test_accuracy", data=np.array(traj.test_accuracy, dtype=np.float32))
    create_dataset(g, "train_loss", data=np.array(traj.train_loss, dtype=np.float32))
    traj.table.write(f.create_group("params"))
    if traj.buffers is not None and traj.buffer_table is not None and traj.buffer_table.names:
        g.create_dataset("buffers", data=traj.buffers.numpy())
        traj.buffer_table.write(f.create_group("buffers"))


class Checkpoints:
    """The interface every stage reads a trajectory through: ``len``, ``tau``, ``flat(i)``, ``params(i)``,
    ``buffers(i)``."""

    table: ParamTable
    buffer_table: ParamTable | None = None
    buffer_rows: torch.Tensor | None = None  # float32 [n_ckpt, B] on the device (small: all rows are held)

    def __len__(self) -> int:
        raise NotImplementedError

    @property
    def tau(self) -> int:
        """Index of the last checkpoint (theta_tau)."""
        return len(self) - 1

    def flat(self, i: int) -> torch.Tensor:
        """Row ``i`` as float32 [P] on the device."""
        raise NotImplementedError

    def params(self, i: int) -> dict[str, torch.Tensor]:
        """Row ``i`` as name -> tensor (views of :meth:`flat`)."""
        return self.table.unflatten(self.flat(i))

    def buffers(self, i: int) -> dict[str, torch.Tensor]:
        """Row ``i``'s buffers as name -> float32 tensor ({} for a buffer-free model)."""
        if self.buffer_rows is None:
            return {}
        return self.buffer_table.unflatten(self.buffer_rows[i % len(self)])

    def load(self, model: nn.Module, i: int) -> nn.Module:
        """``model`` with row ``i``'s parameters and buffers copied in."""
        return load_into(model, self.table, self.flat(i), self.buffers(i))


class TrajectoryReader(Checkpoints):
    """Reads trajectory rows from ``train.h5`` one at a time, keeping a cache of ``cache`` rows.

    ``cache`` None (the default): every row if all of them take at most ``CACHE_FRACTION`` of the device's
    free memory (host RAM for the CPU), else ``SMALL_CACHE``. Memory is at most that many rows of P float32;
    rows enter when first read, never all at once.
    """

    CACHE_FRACTION = 0.1
    SMALL_CACHE = 8

    def __init__(self, path: str | Path, device: torch.device | str = "cpu", cache: int | None = None):
        self.path = Path(path)
        with open_read(self.path) as f:
            self.table = ParamTable.read(f["params"])
            self.epochs = f["trajectory/epoch"][()].tolist()
            self.test_accuracy = f["trajectory/test_accuracy"][()].tolist()
            self.imported = bool(f.attrs.get("imported", ""))
            self.device = torch.device(device)
            if "buffers" in f:
                self.buffer_table = ParamTable.read(f["buffers"])
                self.buffer_rows = to_device(torch.from_numpy(f["trajectory/buffers"][()]), self.device)
        self._cache: dict[int, torch.Tensor] = {}
        self._order: list[int] = []
        self._max = self.SMALL_CACHE if cache is None else cache
        if cache is None and len(self) * self.table.total * 4 <= memory_budget_bytes(self.device, self.CACHE_FRACTION):
            self._max = len(self)

    @classmethod
    def of_run(cls, run_dir: str | Path, device: torch.device | str = "cpu") -> TrajectoryReader:
        """The reader of ``RUN/train.h5``."""
        return cls(artifact_path(run_dir, "train"), device)

    def __len__(self) -> int:
        return len(self.epochs)

    def flat(self, i: int) -> torch.Tensor:
        """Row ``i`` as float32 [P] on the reader's device."""
        i = i % len(self)
        if i not in self._cache:
            with h5py.File(self.path, "r", locking=False) as f:
                row = torch.from_numpy(f["trajectory/params"][i])
            self._cache[i] = to_device(row, self.device)
            self._order.append(i)
            if len(self._order) > self._max:
                self._cache.pop(self._order.pop(0))
        return self._cache[i]


class MemoryTrajectory(Checkpoints):
    """A trajectory held in memory, with the reader interface the distill stage uses.

    For small problems and tests: ``MemoryTrajectory(traj.table, traj.params)``.
    """

    def __init__(self, table: ParamTable, rows: torch.Tensor, device: torch.device | str = "cpu",
                 buffer_table: ParamTable | None = None, buffer_rows: torch.Tensor | None = None):
        self.table, self.rows, self.device = table, rows, torch.device(device)
        if buffer_rows is not None:
            self.buffer_table, self.buffer_rows = buffer_table, buffer_rows.to(self.device)

    @classmethod
    def of(cls, traj: Trajectory, device: torch.device | str = "cpu") -> MemoryTrajectory:
        """The checkpoints of a trajectory in memory, buffers included."""
        return cls(traj.table, traj.params, device, traj.buffer_table, traj.buffers)

    def __len__(self) -> int:
        return len(self.rows)

    def flat(self, i: int) -> torch.Tensor:
        return self.rows[i].to(self.device)


def load_into(model: nn.Module, table: ParamTable, flat: torch.Tensor,
              buffers: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Copy a flat parameter row (names must match the table) and ``buffers`` into ``model``.

    A row longer than the table is a state row (:meth:`Trajectory.state_row`, what a retraining returns): the
    parameters, then the model's saved buffers in ``ParamTable.buffers_of(model)`` order.
    """
    if buffers is None and flat.numel() > table.total:
        buffers = ParamTable.buffers_of(model).unflatten(flat[table.total:])
        flat = flat[:table.total]
    params = table.unflatten(flat)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(params[name].to(p.device))
        if buffers:
            for name, b in model.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name].to(b.device))  # copy_ casts: a float32 counter back to int64
    return model
