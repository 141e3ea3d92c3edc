"""Batch streams over a source, for passes over a whole training set (features for clustering, say).

``load_dataset`` holds every image in memory, which is fine up to CIFAR and impossible at ImageNet
scale (1.28 M images). A :class:`StreamDataset` reads only the rows a batch asks for from a
``data.sources`` source and yields *batches* ``(x float32 [B, C, H, W] normalised, y int64 [B],
row int64 [B])`` through :meth:`StreamDataset.__getitems__`, so a ``DataLoader`` with worker
processes reads one contiguous slice per batch instead of B single rows. Labels are read up front
(8 bytes per row), images never are. Example::

    ds = open_stream("imagenet_train.h5")                # x [N, H, W, C] uint8, y [N]
    for x, y, rows in stream_loader(ds, class_order(ds.labels), batch_size=512, num_workers=4):
        ...

File handles are opened lazily in each process (HDF5 handles do not survive ``fork``).

Room: imports ``data.images`` and ``data.sources`` (and ``utils`` for progress bars).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ddm_hpc.data.images import ChannelStats, chunk_rows, normalize, to_unit
from ddm_hpc.data.sources import ArraySource, ChunkSource, FileSource, Source, check_contiguous
from ddm_hpc.errors import DataError
from ddm_hpc.utils import progress

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class StreamDataset(Dataset):
    """Labels in memory, images read on demand from ``source``, normalised per channel.

    ``mean``/``std`` of None are computed by :func:`channel_stats` when first needed.

    Attributes:
        labels: int64 ``[N]`` label of every row.
        num_classes: L (labels are checked to be exactly 0..L-1, unless given).
        mean, std: per-channel normalisation of images in [0, 1].
    """

    def __init__(self, source: Source, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 num_classes: int | None = None) -> None:
        self.source = source
        self.labels = source.labels
        self.where = source.where
        if len(self.labels) == 0:
            raise DataError(f"{self.where} holds no labelled rows; store at least one image per class")
        self.num_classes = num_classes or check_contiguous(torch.from_numpy(self.labels), self.where, "y")
        self.mean: tuple[float, ...] | None = None if mean is None else tuple(float(v) for v in mean)
        self.std: tuple[float, ...] | None = None if std is None else tuple(float(v) for v in std)

    def __len__(self) -> int:
        return len(self.labels)

    def read_raw(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """Images of sorted unique ``rows`` as stored: uint8 or float ``[B, H, W(, C)]``."""
        return self.source.read(np.asarray(rows, dtype=np.int64))

    def read_unit(self, rows: Sequence[int] | np.ndarray) -> torch.Tensor:
        """Images of ``rows`` (any order, repeats allowed) in [0, 1]: float32 ``[B, C, H, W]``."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"rows {rows.min()}..{rows.max()} out of range for {len(self)} images in {self.where}")
        uniq, inverse = np.unique(rows, return_inverse=True)
        raw = self.read_raw(uniq)
        return to_unit(torch.from_numpy(np.ascontiguousarray(raw)))[torch.from_numpy(inverse)]

    def __getitems__(self, rows: list[int]) -> Batch:
        """One batch: (normalised float32 [B, C, H, W], labels int64 [B], rows int64 [B])."""
        if self.mean is None or self.std is None:
            self.mean, self.std = channel_stats(self)
        x = normalize(self.read_unit(rows), self.mean, self.std)
        idx = np.asarray(rows, dtype=np.int64)
        return x, torch.from_numpy(self.labels[idx]), torch.from_numpy(idx)

    def __getitem__(self, row: int) -> tuple[torch.Tensor, int, int]:
        x, y, r = self.__getitems__([int(row)])
        return x[0], int(y[0]), int(r[0])


class ArrayStream(StreamDataset):
    """Images from an array on disk: an HDF5 dataset, a ``.npy`` file, or an uncompressed ``.npz`` member
    (:class:`~ddm_hpc.data.sources.ArraySource`; a compressed ``.npz`` cannot be mapped and is refused)."""

    def __init__(self, path: str | Path, key: str = "x", label_key: str = "y", mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None) -> None:
        super().__init__(ArraySource.open(path, key, label_key, whole_compressed=False), mean, std)


class TensorStream(StreamDataset):
    """Already-normalised in-memory images (a ``DatasetBundle``'s) behind the same batch interface.

    ``num_classes`` (default: max label + 1) may exceed the labels present: empty classes are
    left for the caller to report.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, num_classes: int | None = None) -> None:
        self.x = x
        source = Source(y.numpy(), "in-memory tensors")
        super().__init__(source, (0.0,) * x.shape[1], (1.0,) * x.shape[1], num_classes or int(y.max()) + 1)

    def __getitems__(self, rows: list[int]) -> Batch:
        idx = torch.as_tensor(np.asarray(rows, dtype=np.int64))
        return self.x[idx], torch.from_numpy(self.labels[idx.numpy()]), idx


def open_stream(path: str | Path, mean: Sequence[float] | None = None,
                std: Sequence[float] | None = None) -> StreamDataset:
    """A :class:`StreamDataset` for a file or folder: ``.h5``/``.hdf5``/``.npz`` with ``x``/``y``,
    ``x.npy`` (beside ``y.npy``), a folder of ``.npz`` chunks, or a ``<class>/`` image folder."""
    p = Path(path).expanduser()
    if p.is_file() and p.suffix.lower() in (".h5", ".hdf5", ".npz", ".npy"):
        return ArrayStream(p, mean=mean, std=std)
    if p.is_dir() and any(p.glob("*.npz")):
        return StreamDataset(ChunkSource(p), mean, std)
    if p.is_dir():
        return StreamDataset(FileSource.class_tree(p), mean, std)
    raise DataError(f"cannot stream {path}: pass an .h5/.hdf5/uncompressed .npz with 'x' and 'y', an x.npy "
                    "beside y.npy, a folder of .npz chunks, or a <class>/ image folder")


def channel_stats(ds: StreamDataset, batch_rows: int = 0, show_progress: bool = False
                  ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (floored at 1e-6) of images in [0, 1], read ``batch_rows`` rows at a time
    (0 = ``images.chunk_rows``) and summed by :class:`~ddm_hpc.data.images.ChannelStats`: the statistics
    ``load_dataset`` computes for files and folders, without loading them."""
    stats = ChannelStats()
    step = batch_rows or chunk_rows(tuple(ds.read_unit([0]).shape[1:]))
    for a in progress(range(0, len(ds), step), "channel stats", show_progress):
        stats.add(ds.read_unit(np.arange(a, min(a + step, len(ds)))))
    return stats.result()


def class_order(labels: np.ndarray) -> np.ndarray:
    """int64 [N]: rows sorted by class, increasing within a class (stable), so each class is one run."""
    return np.argsort(np.asarray(labels), kind="stable").astype(np.int64)


def _batches(order: np.ndarray, batch_size: int) -> list[list[int]]:
    """``order`` cut into consecutive batches of row lists."""
    return [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]


def collated(batch: Batch) -> Batch:
    """collate_fn for datasets whose ``__getitems__`` already returns a collated batch."""
    return batch


def stream_loader(ds: Dataset, order: np.ndarray, batch_size: int = 512, num_workers: int = 0,
                  pin_memory: bool = False) -> DataLoader:
    """A DataLoader reading ``ds`` in the row ``order`` given, one ``__getitems__`` call per batch.

    Workers each hold at most ``prefetch_factor`` (2) batches, so host memory is bounded by
    ``num_workers x 2 x batch`` images whatever the dataset's size.
    """
    if isinstance(ds, StreamDataset) and (ds.mean is None or ds.std is None):
        ds.mean, ds.std = channel_stats(ds)  # once here, not once per worker
    return DataLoader(ds, batch_sampler=_batches(np.asarray(order), batch_size), collate_fn=collated,
                      num_workers=num_workers, pin_memory=pin_memory, persistent_workers=False)


def iter_batches(ds: StreamDataset, order: np.ndarray, batch_size: int = 512) -> Iterator[Batch]:
    """The batches of :func:`stream_loader` read in this process (no workers)."""
    for rows in _batches(np.asarray(order), batch_size):
        yield ds.__getitems__(rows)
