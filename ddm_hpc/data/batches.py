"""The one minibatch reader: training minibatches on the device, whether the images are resident or mapped.

A training set is either copied to the device once (it is there already, or it fits a quarter of
the free memory: :func:`resident_on`) or left where it is, host memory or a memory map
(:class:`~ddm_hpc.data.cache.MappedImages`), and each minibatch is gathered there and moved. Rows of
a mapped set travel raw (uint8, a quarter of the bytes) and are converted on the device. With
``workers`` > 0, DataLoader processes gather the rows, so reading overlaps the training step. The
minibatches are the same bits every way. Nothing outside this module asks which kind of set it has.

Room: imports ``data.cache`` and ``data.stream`` (and ``utils``).
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from ddm_hpc.data.cache import MappedImages
from ddm_hpc.data.stream import collated
from ddm_hpc.utils import memory_budget_bytes


def resident_on(x: torch.Tensor | MappedImages, device: torch.device) -> bool:
    """Whether ``x`` is copied to ``device`` once: it is there already, or it fits a quarter of the free
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


class _Rows(Dataset):
    """``(_fetch(x, rows), y[rows])`` per batch of rows, for a DataLoader whose workers gather minibatches."""

    def __init__(self, x: torch.Tensor | MappedImages, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitems__(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.tensor(rows, dtype=torch.int64)
        return _fetch(self.x, idx), self.y[idx]


class MinibatchReader:
    """Minibatches ``(x[b], y[b])`` on ``device`` for index tensors ``b``, wherever ``x`` lives.

    Args:
        x: float32 images ``[N, C, H, W]``: a tensor or mapped images.
        y: int64 labels ``[N]``.
        device: where the minibatches are used.
        workers: DataLoader processes gathering rows when ``x`` is not resident on ``device``; 0 = this
            process. (A mapped set is mapped again in each worker, never copied; on a GPU the batches come
            in pinned memory.)
    """

    def __init__(self, x: torch.Tensor | MappedImages, y: torch.Tensor, device: torch.device, workers: int = 0):
        self.device = device
        self.resident = resident_on(x, device)
        self.x, self.y = (x.to(device), y.to(device)) if self.resident else (x, y)
        self.workers = 0 if self.resident else workers

    def __call__(self, batches: list[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The minibatches of ``batches`` (index tensors into the rows), in order."""
        x, y, device = self.x, self.y, self.device
        if self.workers == 0:
            for idx in batches:
                yield _finish(x, _fetch(x, idx), device), y[idx.to(y.device)].to(device)
            return
        loader = DataLoader(_Rows(x, y.cpu()), batch_sampler=[b.tolist() for b in batches], collate_fn=collated,
                            num_workers=self.workers, pin_memory=device.type == "cuda")
        for xb, yb in loader:
            yield _finish(x, xb, device), yb.to(device, non_blocking=True)
