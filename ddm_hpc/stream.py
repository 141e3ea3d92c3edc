"""Datasets that stream images from disk, batch by batch, for passes over a whole training set.

``load_dataset`` (``ddm_hpc.data``) holds every image in memory, which is fine up to CIFAR and
impossible at ImageNet scale (1.28 M images). The classes here read only the rows a batch
asks for: HDF5 datasets and ``.npy`` / uncompressed ``.npz`` members through memory maps or
hyperslab reads, folders of ``.npz`` chunks one chunk at a time, image folders file by file.
Every source yields *batches* ``(x float32 [B, C, H, W] normalised, y int64 [B], row int64 [B])``
through :meth:`StreamDataset.__getitems__`, so a ``DataLoader`` with worker processes reads one
contiguous slice per batch instead of B single rows. Labels are read up front (8 bytes per
row), images never are. Example::

    ds = open_stream("imagenet_train.h5")                # x [N, H, W, C] uint8, y [N]
    for x, y, rows in stream_loader(ds, class_order(ds.labels), batch_size=512, num_workers=4):
        ...

File handles are opened lazily in each process (HDF5 handles do not survive ``fork``).
"""
from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ddm_hpc.data import (IMAGE_SUFFIXES, _check_contiguous, _load_images, _to_unit, normalize)
from ddm_hpc.errors import DataError
from ddm_hpc.utils import progress

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class StreamDataset(Dataset):
    """Base class: labels in memory, images read on demand, normalised per channel.

    Subclasses implement :meth:`_read` (uint8 ``[B, H, W(, C)]`` or float in [0, 1] for sorted
    unique source rows). ``mean``/``std`` of None are computed by :func:`channel_stats`.

    Attributes:
        labels: int64 ``[N]`` label of every row.
        num_classes: L (labels are checked to be exactly 0..L-1).
        mean, std: per-channel normalisation of images in [0, 1].
    """

    def __init__(self, labels: np.ndarray, where: str, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, num_classes: int | None = None) -> None:
        self.labels = np.array(labels, dtype=np.int64)  # a writable copy (labels of a memmap are read-only)
        self.where = where
        if len(self.labels) == 0:
            raise DataError(f"{where} holds no labelled rows; store at least one image per class")
        self.num_classes = num_classes or _check_contiguous(torch.from_numpy(self.labels), Path(where), "y")
        self.mean: tuple[float, ...] | None = None if mean is None else tuple(float(v) for v in mean)
        self.std: tuple[float, ...] | None = None if std is None else tuple(float(v) for v in std)

    def __len__(self) -> int:
        return len(self.labels)

    def _read(self, rows: np.ndarray) -> np.ndarray:
        """Raw images of sorted unique ``rows``: uint8 or float ``[B, H, W(, C)]``."""
        raise NotImplementedError

    def read_raw(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """Images of sorted unique ``rows`` as stored: uint8 or float ``[B, H, W(, C)]``."""
        return self._read(np.asarray(rows, dtype=np.int64))

    def read_unit(self, rows: Sequence[int] | np.ndarray) -> torch.Tensor:
        """Images of ``rows`` (any order, repeats allowed) in [0, 1]: float32 ``[B, C, H, W]``."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"rows {rows.min()}..{rows.max()} out of range for {len(self)} images in {self.where}")
        uniq, inverse = np.unique(rows, return_inverse=True)
        raw = self._read(uniq)
        raw = raw if raw.flags.writeable else np.array(raw)  # memmap slices are read-only
        return _to_unit(torch.from_numpy(np.ascontiguousarray(raw)))[torch.from_numpy(inverse)]

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


def _runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """Maximal contiguous (start, stop) runs of sorted unique rows."""
    if len(rows) == 0:
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(rows)]])
    return [(int(rows[a]), int(rows[b - 1]) + 1) for a, b in zip(starts, stops)]


class ArrayStream(StreamDataset):
    """Images from an array on disk: an HDF5 dataset, a ``.npy`` file, or an uncompressed ``.npz`` member.

    ``.npy`` and ``.npz`` members are memory-mapped; HDF5 is read by one hyperslab per contiguous
    run of requested rows (class-sorted passes over class-sorted files are single slices).
    """

    def __init__(self, path: str | Path, key: str = "x", label_key: str = "y", mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None) -> None:
        self.path, self.key = Path(path), key
        self._handle: object | None = None
        self._pid = -1
        labels = np.asarray(self._open_array(label_key)[()] if self._is_h5 else self._open_array(label_key))
        self.shape = tuple(self._array().shape)
        if len(self.shape) not in (3, 4) or (len(self.shape) == 4 and self.shape[-1] > 4):
            raise DataError(f"{self.path}: {key!r} has shape {self.shape}; expected [N,H,W] or channels-last "
                            "[N,H,W,C] with C <= 4")
        if len(labels) != self.shape[0]:
            raise DataError(f"{self.path}: {label_key!r} has {len(labels)} labels but {key!r} has {self.shape[0]} "
                            "rows; make them match")
        if self._is_h5 and self._handle is not None:
            self._handle.close()
        self._handle, self._pid = None, -1  # reopened lazily in each worker
        super().__init__(labels, str(self.path), mean, std)

    @property
    def _is_h5(self) -> bool:
        return self.path.suffix.lower() in (".h5", ".hdf5")

    def _open_array(self, key: str):
        """The array ``key`` of the file: an h5py Dataset or a read-only memory map."""
        suffix = self.path.suffix.lower()
        try:
            if self._is_h5:
                import h5py

                if self._handle is None or self._pid != os.getpid():
                    self._handle, self._pid = h5py.File(self.path, "r", locking=False), os.getpid()
                if key not in self._handle:
                    raise DataError(f"{self.path} has no {key!r} dataset (found: {', '.join(self._handle)}); "
                                    "store images as 'x' and labels as 'y'")
                return self._handle[key]
            if suffix == ".npy":
                path = self.path if key == self.key else self.path.with_name(f"{key}.npy")
                return np.load(path, mmap_mode="r")
            if suffix == ".npz":
                return npz_memmap(self.path, key)
        except (OSError, ValueError) as err:
            raise DataError(f"could not read {key!r} from {self.path}: {' '.join(str(err).split())}; pass a "
                            "valid file") from err
        raise DataError(f"{self.path}: cannot stream {suffix} files; use .h5/.hdf5, .npy (x.npy beside y.npy) or "
                        "uncompressed .npz")

    def _array(self):
        """The image array, (re)opened in this process."""
        if self._is_h5:
            return self._open_array(self.key)
        if self._handle is None or self._pid != os.getpid():
            self._handle, self._pid = self._open_array(self.key), os.getpid()
        return self._handle

    def _read(self, rows: np.ndarray) -> np.ndarray:
        arr = self._array()
        parts = [np.asarray(arr[a:b]) for a, b in _runs(rows)]
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handle"], state["_pid"] = None, -1  # never pickle an open file into a worker
        return state


def npz_memmap(path: str | Path, key: str) -> np.memmap:
    """Memory-map member ``key`` of an uncompressed ``.npz`` (``np.savez``, not ``savez_compressed``)."""
    path = Path(path)
    with zipfile.ZipFile(path) as zf:
        try:
            info = zf.getinfo(f"{key}.npy")
        except KeyError:
            found = ", ".join(n[:-4] for n in zf.namelist() if n.endswith(".npy"))
            raise DataError(f"{path} has no {key!r} array (found: {found or 'none'}); store images as 'x' and "
                            "labels as 'y'") from None
        if info.compress_type != zipfile.ZIP_STORED:
            raise DataError(f"{path} is compressed, so {key!r} cannot be memory-mapped; re-save it with np.savez "
                            "(not savez_compressed) or split it into a folder of .npz chunks")
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        local = fh.read(30)  # zip local file header: name and extra lengths at bytes 26..29
        name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
        fh.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(fh)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(fh)
        offset = fh.tell()
    if fortran:
        raise DataError(f"{path}: {key!r} is stored in Fortran order; save np.ascontiguousarray(x) instead")
    return np.memmap(path, dtype=dtype, mode="r", shape=shape, offset=offset)


class NpzChunkStream(StreamDataset):
    """A folder of ``.npz`` chunk files (sorted by name), each with ``x`` and ``y``; one chunk in memory at a time."""

    def __init__(self, folder: str | Path, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None) -> None:
        self.files = sorted(Path(folder).glob("*.npz"))
        if not self.files:
            raise DataError(f"{folder} holds no .npz chunks; write chunks with np.savez(f, x=..., y=...)")
        labels, sizes = [], []
        for f in self.files:
            with np.load(f, allow_pickle=False) as z:
                if "x" not in z.files or "y" not in z.files:
                    raise DataError(f"chunk {f} lacks 'x' or 'y' (found: {', '.join(z.files)}); store both")
                labels.append(np.asarray(z["y"], dtype=np.int64))
                sizes.append(len(labels[-1]))
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._cached: tuple[int, np.ndarray] | None = None
        super().__init__(np.concatenate(labels), str(folder), mean, std)

    def _chunk(self, i: int) -> np.ndarray:
        """Images of chunk i (the last one read stays cached)."""
        if self._cached is None or self._cached[0] != i:
            with np.load(self.files[i], allow_pickle=False) as z:
                self._cached = (i, np.asarray(z["x"]))
        return self._cached[1]

    def _read(self, rows: np.ndarray) -> np.ndarray:
        which = np.searchsorted(self.offsets, rows, side="right") - 1
        return np.concatenate([self._chunk(int(c))[rows[which == c] - self.offsets[c]] for c in np.unique(which)])

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_cached"] = None
        return state


class FolderStream(StreamDataset):
    """``<root>/<class>/<image>`` files (png/jpg/jpeg), classes sorted by name, read file by file."""

    def __init__(self, root: str | Path, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None) -> None:
        root = Path(root)
        classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not classes:
            raise DataError(f"{root} has no class subfolders; use <class>/*.png folders")
        self.classes = classes
        self.files: list[Path] = []
        labels: list[int] = []
        for i, c in enumerate(classes):
            found = sorted(p for p in (root / c).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            self.files += found
            labels += [i] * len(found)
        super().__init__(np.array(labels, dtype=np.int64), str(root), mean, std)

    def _read(self, rows: np.ndarray) -> np.ndarray:
        return _load_images([self.files[i] for i in rows.tolist()]).numpy()


class TensorStream(StreamDataset):
    """Already-normalised in-memory images (a ``DatasetBundle``'s) behind the same batch interface.

    ``num_classes`` (default: max label + 1) may exceed the labels present: empty classes are
    left for the caller to report.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, num_classes: int | None = None) -> None:
        self.x = x
        super().__init__(y.numpy(), "in-memory tensors", (0.0,) * x.shape[1], (1.0,) * x.shape[1],
                         num_classes or int(y.max()) + 1)

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
        return NpzChunkStream(p, mean, std)
    if p.is_dir():
        return FolderStream(p, mean, std)
    raise DataError(f"cannot stream {path}: pass an .h5/.hdf5/uncompressed .npz with 'x' and 'y', an x.npy "
                    "beside y.npy, a folder of .npz chunks, or a <class>/ image folder")


def channel_stats(ds: StreamDataset, batch_rows: int = 4096, show_progress: bool = False
                  ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (floored at 1e-6) of images in [0, 1], accumulated in float64 batch by batch.

    The same statistics as ``load_dataset`` computes for files and folders, without loading them.
    """
    total = squares = None
    count = 0
    for a in progress(range(0, len(ds), batch_rows), "channel stats", show_progress):
        x = ds.read_unit(np.arange(a, min(a + batch_rows, len(ds)))).double()
        s, q = x.sum((0, 2, 3)), (x * x).sum((0, 2, 3))
        total, squares = (s, q) if total is None else (total + s, squares + q)
        count += x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    std = (squares / count - mean * mean).clamp_min(0).sqrt().clamp_min(1e-6)
    return tuple(mean.tolist()), tuple(std.tolist())


def class_order(labels: np.ndarray) -> np.ndarray:
    """int64 [N]: rows sorted by class, increasing within a class (stable), so each class is one run."""
    return np.argsort(np.asarray(labels), kind="stable").astype(np.int64)


def _batches(order: np.ndarray, batch_size: int) -> list[list[int]]:
    """``order`` cut into consecutive batches of row lists."""
    return [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]


def _first(batch: Batch) -> Batch:
    """collate_fn for datasets that already return a collated batch."""
    return batch


def stream_loader(ds: Dataset, order: np.ndarray, batch_size: int = 512, num_workers: int = 0,
                  pin_memory: bool = False) -> DataLoader:
    """A DataLoader reading ``ds`` in the row ``order`` given, one ``__getitems__`` call per batch.

    Workers each hold at most ``prefetch_factor`` (2) batches, so host memory is bounded by
    ``num_workers x 2 x batch`` images whatever the dataset's size.
    """
    if isinstance(ds, StreamDataset) and (ds.mean is None or ds.std is None):
        ds.mean, ds.std = channel_stats(ds)  # once here, not once per worker
    return DataLoader(ds, batch_sampler=_batches(np.asarray(order), batch_size), collate_fn=_first,
                      num_workers=num_workers, pin_memory=pin_memory, persistent_workers=False)


def iter_batches(ds: StreamDataset, order: np.ndarray, batch_size: int = 512) -> Iterator[Batch]:
    """The batches of :func:`stream_loader` read in this process (no workers)."""
    for rows in _batches(np.asarray(order), batch_size):
        yield ds.__getitems__(rows)
