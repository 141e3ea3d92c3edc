"""Datasets as normalised tensors: torchvision sets, ``.npz``/``.h5`` arrays, ``.npz`` chunk folders, image folders.

Two entry points give the same :class:`DatasetBundle` (bit for bit): float32 ``[N, C, H, W]``
images normalised per channel, int64 labels, and the index of every row in its source split (so
attribution scores can be traced back to source images). :func:`load_dataset` holds the images
in memory; :func:`mapped_dataset` streams the source into a raw cache once and maps it
(:class:`MappedImages`, ``--data-cache mmap``). Nothing is ever downloaded. Example::

    bundle = load_dataset("mnist", data_root="../shared/data", n_train=1000, seed=0)
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np
import torch

from ddm_hpc.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
ARRAY_SUFFIXES = (".npz", ".h5", ".hdf5")
_FORMS = ("a .npz/.h5/.hdf5 file with 'x' [N,H,W(,C)] and 'y' [N] (optionally 'x_test'/'y_test'), "
          "a folder of .npz chunks each with 'x' and 'y', or an image folder (TinyImageNet train/+val/val_annotations.txt, train/<class>/ with "
          "val/<class>/ or test/<class>/, or <class>/ subfolders)")


@dataclass(frozen=True)
class _TorchvisionSpec:
    """Where a torchvision dataset lives under data_root and how to normalise it."""

    cls_name: str
    folder: str
    files: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]


_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_TORCHVISION = {
    "mnist": _TorchvisionSpec("MNIST", "MNIST/raw", _MNIST_FILES, (0.1307,), (0.3081,)),
    "fashionmnist": _TorchvisionSpec("FashionMNIST", "FashionMNIST/raw", _MNIST_FILES, (0.2860,), (0.3530,)),
    "cifar10": _TorchvisionSpec("CIFAR10", "cifar-10-batches-py",
                                tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",),
                                (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": _TorchvisionSpec("CIFAR100", "cifar-100-python", ("train", "test"),
                                 (0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762)),
}


@dataclass
class DatasetBundle:
    """A loaded dataset, ready for training.

    Attributes:
        name: ``"mnist"`` etc., or the file/folder path as given.
        x_train: float32 ``[N, C, H, W]``, normalised with ``mean``/``std``.
        y_train: int64 ``[N]`` labels in ``0..num_classes-1``.
        x_test: float32 ``[M, C, H, W]``, normalised likewise.
        y_test: int64 ``[M]``.
        train_index: int64 ``[N]``, increasing: row of each sample in the source's training
            split (for a file or folder split here, the row in ``x`` / the sorted file list).
        test_index: int64 ``[M]``, increasing: row in the source's test split (same caveat).
        num_classes: number of classes.
        mean: per-channel mean used for normalisation (of images in [0, 1]).
        std: per-channel std used for normalisation.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    train_index: torch.Tensor
    test_index: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        c, h, w = self.x_train.shape[1:]
        return int(c), int(h), int(w)

    @property
    def in_channels(self) -> int:
        """Number of image channels C."""
        return self.image_shape[0]

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of one image."""
        return self.image_shape[1], self.image_shape[2]


@dataclass
class _Source:
    """Labels and source indices of both splits, plus a loader of raw images by source index.

    ``load(i, j)`` reads only the rows asked for (increasing indices into each split) and returns
    them as the source stores them: uint8 (or float in [0, 1]) ``[n, H, W]`` or ``[n, H, W, C]``.
    """

    y_train: torch.Tensor
    y_test: torch.Tensor
    train_index: torch.Tensor
    test_index: torch.Tensor
    num_classes: int
    load: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    where: str
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


def available_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset` besides file and folder paths."""
    return sorted(_TORCHVISION)


def normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Map images in [0, 1] to normalised values: ``(x - mean) / std`` per channel.

    Args:
        x: float ``[..., C, H, W]`` in [0, 1].
        mean: per-channel means, length C (e.g. ``bundle.mean``); std likewise.

    Returns:
        Normalised images, same shape and dtype as ``x``.
    """
    m, s = _channel_views(x, mean, std)
    return (x - m) / s


def denormalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Inverse of :func:`normalize`: ``x * std + mean`` (clamp to [0, 1] before saving PNGs).

    Args:
        x: float ``[..., C, H, W]`` normalised images.
        mean: per-channel means, length C (e.g. ``bundle.mean``); std likewise.

    Returns:
        Images on the [0, 1] scale, same shape and dtype as ``x``.
    """
    m, s = _channel_views(x, mean, std)
    return x * s + m


def load_dataset(dataset: str, data_root: str | Path = "../shared/data", n_train: int | None = None,
                 n_test: int | None = None, seed: int = 0, test_fraction: float = 0.2,
                 image_size: int = 0) -> DatasetBundle:
    """Load a dataset, take seeded class-stratified subsets and normalise it.

    Args:
        dataset: ``"mnist"``, ``"fashionmnist"``, ``"cifar10"``, ``"cifar100"`` (any case), a
            ``.npz``/``.h5``/``.hdf5`` file, or an image folder; relative paths are also tried
            under ``data_root``.
        data_root: folder holding the torchvision datasets (``MNIST/``, ``cifar-10-batches-py/``).
        n_train: training rows to keep (None = all), balanced over classes.
        n_test: test rows to keep (None = all), balanced over classes.
        seed: seeds the subsets and, for sources without a test split, the held-out split.
        test_fraction: share of each class held out as test when the source has no test split.
        image_size: image folders only: shorter side resized to this, centre square cropped (0 = as stored).

    Returns:
        The bundle. Torchvision sets use fixed published mean/std; files and folders use the
        per-channel mean/std of the returned training images (std floored at 1e-6).

    Raises:
        DataError: the data is missing, unreadable or malformed, or the name is unknown.
        ConfigError: a size or fraction is out of range.
    """
    name, source = _open_source(dataset, Path(data_root), seed, test_fraction, image_size)
    train_rows = _stratified_subset(source.y_train, n_train, seed, "n_train")
    test_rows = _stratified_subset(source.y_test, n_test, seed, "n_test")
    train_index, test_index = source.train_index[train_rows], source.test_index[test_rows]
    x_train, x_test = (_checked_unit(raw, source.where) for raw in source.load(train_index, test_index))
    mean, std = (source.mean, source.std) if source.mean is not None else _channel_stats(x_train)
    bundle = DatasetBundle(
        name=name, x_train=normalize(x_train, mean, std), x_test=normalize(x_test, mean, std),
        y_train=source.y_train[train_rows], y_test=source.y_test[test_rows],
        train_index=train_index, test_index=test_index, num_classes=source.num_classes, mean=mean, std=std)
    logger.info("loaded %s: %d train / %d test images of shape %s, %d classes", name, len(train_index),
                len(test_index), bundle.image_shape, bundle.num_classes)
    return bundle


def _open_source(dataset: str, root: Path, seed: int, test_fraction: float,
                 image_size: int = 0) -> tuple[str, _Source]:
    """The dataset's name and source (labels read, images not yet)."""
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction={test_fraction} must be strictly between 0 and 1; pass e.g. 0.2")
    key = dataset.lower().replace("-", "").replace("_", "")
    path = _resolve_path(dataset, root)
    is_folder = key not in _TORCHVISION and path.is_dir() and not any(path.glob("*.npz"))
    if image_size and not is_folder:
        raise ConfigError(f"--image-size {image_size} applies to image folders only, but {dataset!r} is not one; "
                          "drop --image-size (arrays are used at their stored size)")
    if key in _TORCHVISION:
        return key, _torchvision_source(key, root)
    if path.is_file() and path.suffix.lower() in ARRAY_SUFFIXES:
        return dataset, _array_source(path, seed, test_fraction)
    if path.is_dir() and any(path.glob("*.npz")):
        return dataset, _chunks_source(path, seed, test_fraction)
    if path.is_dir():
        return dataset, _folder_source(path, seed, test_fraction, image_size)
    raise DataError(f"unknown dataset {dataset!r}: not one of {', '.join(available_datasets())} "
                    f"and not an existing file or folder (also tried under {root}); pass one of "
                    f"those names, {_FORMS}")


def _checked_unit(raw: torch.Tensor, where: str) -> torch.Tensor:
    """:func:`_to_unit` of raw source images, with a warning if float images leave [0, 1]."""
    if raw.dtype != torch.uint8 and raw.numel() and (raw.min() < 0 or raw.max() > 1):
        logger.warning("%s: float images span [%g, %g], not [0, 1]; using them as is", where, raw.min(), raw.max())
    return _to_unit(raw)


CACHE_FORMAT = 2  # raw channels-last images, normalised when read
CHUNK_BYTES = 32 << 20  # float32 bytes per chunk read while a cache is written or materialised
STATS_BYTES = 16 << 20  # float64 bytes per piece over which channel statistics are summed
_SMALL = ("y_train", "y_test", "train_index", "test_index")


def chunk_rows(image_shape: tuple[int, ...]) -> int:
    """Rows per chunk: about :data:`CHUNK_BYTES` of float32 images, and a whole number (at least one)
    of :func:`stats_rows` pieces, so channel statistics add up in the same pieces as in one pass."""
    piece = stats_rows(image_shape)
    return max(1, CHUNK_BYTES // (4 * int(np.prod(image_shape)) * piece)) * piece


def stats_rows(image_shape: tuple[int, ...]) -> int:
    """Rows per piece of the channel statistics: about :data:`STATS_BYTES` in float64, at least one."""
    return max(1, STATS_BYTES // (8 * int(np.prod(image_shape))))


class MappedImages:
    """Normalised float32 images ``[N, C, H, W]`` read on demand from a memory-mapped ``.npy``.

    The file holds the raw images channels-last, ``[N, H, W, C]`` uint8 (or float32 in [0, 1]),
    a quarter of the normalised size for uint8. Indexing with an int, a slice, or an index or
    bool tensor/array reads only those rows and returns ``normalize(_to_unit(raw))`` of them:
    the same bits as indexing the in-memory tensor, since both steps are elementwise. Pages are
    shared between processes through the OS page cache; nothing else is kept.

    ``len``, ``shape``, ``dtype``, ``device``, ``numel`` and ``element_size`` describe the
    normalised tensor, so code written for a tensor that only indexes it works unchanged;
    :meth:`to` (and :func:`dense`) materialise every row, for code that needs the whole tensor.
    """

    dtype = torch.float32
    device = torch.device("cpu")

    def __init__(self, path: str | Path, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.path = Path(path)
        self.mean, self.std = tuple(mean), tuple(std)
        self._raw: np.ndarray | None = None
        self._pid = -1
        n, h, w, c = self.raw.shape
        self.shape = torch.Size((n, c, h, w))

    @property
    def raw(self) -> np.ndarray:
        """The read-only map of the file (reopened in a forked process)."""
        if self._raw is None or self._pid != os.getpid():
            self._raw, self._pid = np.load(self.path, mmap_mode="r"), os.getpid()
        return self._raw

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_raw": None, "_pid": -1}  # workers map the file, never pickle its pages

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"MappedImages({str(self.path)!r}, shape={tuple(self.shape)}, raw {self.raw.dtype})"

    def numel(self) -> int:
        return self.shape.numel()

    def element_size(self) -> int:
        return 4

    def dim(self) -> int:
        return 4

    def size(self, dim: int | None = None) -> torch.Size | int:
        return self.shape if dim is None else self.shape[dim]

    def __getitem__(self, idx: int | slice | torch.Tensor | np.ndarray) -> torch.Tensor:
        if isinstance(idx, (int, np.integer)):
            return self[np.array([int(idx)])][0]
        if isinstance(idx, torch.Tensor):
            idx = idx.cpu().numpy()
        if not isinstance(idx, slice):
            idx = np.asarray(idx)
            if idx.ndim != 1 and idx.dtype != np.bool_:  # an index array of any shape: rows read flat, then shaped
                return self[idx.reshape(-1)].reshape(*idx.shape, *self.shape[1:])
        return self.normalise(self.rows(idx))

    def rows(self, idx: slice | torch.Tensor | np.ndarray) -> torch.Tensor:
        """The raw images of ``idx`` (a slice, or a 1-D index or bool array), as stored: ``[n, H, W, C]``."""
        if isinstance(idx, torch.Tensor):
            idx = idx.cpu().numpy()
        return torch.from_numpy(np.array(self.raw[idx if isinstance(idx, slice) else np.asarray(idx)]))

    def normalise(self, raw: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
        """Raw rows (from :meth:`rows`) as normalised float32 ``[n, C, H, W]``, converted on ``device``
        (default: where they are), so a GPU receives a quarter of the bytes of the float images."""
        x = _to_unit(raw if device is None else raw.to(device, non_blocking=True))
        m, s = _channel_views(x, self.mean, self.std)
        return x.sub_(m).div_(s)  # normalize() in place: the same operations, one buffer fewer

    def to(self, device: torch.device | str, non_blocking: bool = False) -> torch.Tensor:
        """Every row, normalised, as one tensor on ``device`` (filled :func:`chunk_rows` rows at a time)."""
        out = torch.empty(self.shape, dtype=self.dtype, device=device)
        step = chunk_rows(self.shape[1:])
        for a in range(0, len(self), step):
            out[a:a + step] = self[a:a + step].to(device, non_blocking=non_blocking)
        return out


def dense(x: torch.Tensor | MappedImages) -> torch.Tensor:
    """``x`` as an ordinary host tensor (a :class:`MappedImages` is read whole), for code that needs one."""
    return x.to("cpu") if isinstance(x, MappedImages) else x


def mapped_dataset(dataset: str, data_root: str | Path, cache_root: str | Path, n_train: int | None = None,
                   n_test: int | None = None, seed: int = 0, test_fraction: float = 0.2, image_size: int = 0,
                   show_progress: bool = False) -> DatasetBundle:
    """:func:`load_dataset` streamed through a cache under ``cache_root/<key>/``; images are :class:`MappedImages`.

    The first call reads the source :func:`chunk_rows` rows at a time (HDF5 hyperslabs, memory
    maps, image files) and writes the selected rows' raw images to ``x_train.npy`` / ``x_test.npy``
    (uint8 stays uint8), the labels and indices, and the mean/std, which for files and folders is
    accumulated chunk by chunk exactly as :func:`load_dataset` computes it. Each file goes through
    a temp file and ``meta.json`` comes last, so a cache is complete or absent. No call ever holds
    the dataset: later calls (other stages, ``--workers`` processes, SLURM tasks) map the files and
    share the OS page cache. The bundle's tensors equal :func:`load_dataset`'s bit for bit. The key
    hashes every argument and the cache format.
    """
    args = {"dataset": str(dataset), "data_root": str(data_root), "n_train": n_train, "n_test": n_test, "seed": seed,
            "test_fraction": test_fraction, "image_size": image_size, "format": CACHE_FORMAT}
    folder = Path(cache_root) / hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:16]
    meta = folder / "meta.json"
    if not meta.is_file():
        _write_cache(folder, args, show_progress)
    info = json.loads(meta.read_text())
    mean, std = tuple(info["mean"]), tuple(info["std"])
    small = {name: torch.from_numpy(np.load(folder / f"{name}.npy")) for name in _SMALL}
    return DatasetBundle(name=info["name"], num_classes=info["num_classes"], mean=mean, std=std,
                         x_train=MappedImages(folder / "x_train.npy", mean, std),
                         x_test=MappedImages(folder / "x_test.npy", mean, std), **small)


def _write_cache(folder: Path, args: dict, show_progress: bool) -> None:
    """Write the cache of :func:`mapped_dataset` from the source, chunk by chunk."""
    name, source = _open_source(args["dataset"], Path(args["data_root"]), args["seed"], args["test_fraction"],
                                args["image_size"])
    train_rows = _stratified_subset(source.y_train, args["n_train"], args["seed"], "n_train")
    test_rows = _stratified_subset(source.y_test, args["n_test"], args["seed"], "n_test")
    small = {"y_train": source.y_train[train_rows], "y_test": source.y_test[test_rows],
             "train_index": source.train_index[train_rows], "test_index": source.test_index[test_rows]}
    folder.mkdir(parents=True, exist_ok=True)
    tag = f".tmp.{os.getpid()}"
    stats = None if source.mean is not None else _ChannelStats()
    files = {key: folder / f"{key}{tag}.npy" for key in ("x_train", "x_test", *small)}
    try:
        channels = {split: _write_images(files[f"x_{split}"], source, small[f"{split}_index"], which,
                                         stats if which == 0 else None, show_progress)
                    for split, which in (("train", 0), ("test", 1))}
        if sorted(channels.values()) == [1, 3]:  # a folder whose colour images are all in the other split
            grey = min(channels, key=channels.get)
            h, w = np.load(files[f"x_{grey}"], mmap_mode="r").shape[1:3]
            _widen(files[f"x_{grey}"], (len(small[f"{grey}_index"]), h, w, 3), len(small[f"{grey}_index"]),
                   stats if grey == "train" else None).close()
        mean, std = (source.mean, source.std) if stats is None else stats.result()
        for key, value in small.items():
            np.save(files[key], value.numpy())
        for key, tmp in files.items():
            os.replace(tmp, folder / f"{key}.npy")
        tmp = folder / f"meta{tag}.json"
        tmp.write_text(json.dumps({**args, "name": name, "num_classes": source.num_classes,
                                   "mean": list(mean), "std": list(std)}))
        os.replace(tmp, folder / "meta.json")
    finally:
        for tmp in folder.glob(f"*{tag}*"):  # what an interrupted write left
            tmp.unlink()
    logger.info("data cache: wrote %s (memory-mapped by every load)", folder)


def _write_images(path: Path, source: _Source, index: torch.Tensor, which: int, stats: _ChannelStats | None,
                  show_progress: bool) -> int:
    """Raw images of ``index`` in split ``which`` (0 train, 1 test), channels-last, to a ``.npy`` at ``path``;
    returns their channel count."""
    from ddm_hpc.utils import progress

    if len(index) == 0:
        raise DataError(f"{source.where}: a split selected no rows; pass a larger n_train/n_test")
    none = torch.zeros(0, dtype=torch.int64)

    def read(rows: torch.Tensor) -> torch.Tensor:
        return source.load(rows, none)[0] if which == 0 else source.load(none, rows)[1]

    fh, shape, dtype = None, None, None
    step = chunk_rows(read(index[:1]).shape[1:])
    try:
        for a in progress(range(0, len(index), step), f"data cache ({'train' if which == 0 else 'test'})",
                          show_progress):
            raw = read(index[a:a + step])
            raw = raw.unsqueeze(-1) if raw.dim() == 3 else raw
            if fh is None:
                shape, dtype = (len(index), *raw.shape[1:]), (np.uint8 if raw.dtype == torch.uint8 else np.float32)
                fh = _open_npy(path, shape, dtype)
            if raw.shape[-1] == 1 and shape[-1] == 3:  # a grayscale-only chunk of a colour folder
                raw = raw.expand(*raw.shape[:-1], 3)
            elif raw.shape[-1] == 3 and shape[-1] == 1:  # the folder's first colour image: widen what was written
                fh.close()
                shape = (*shape[:-1], 3)
                fh = _widen(path, shape, a, stats)
            if tuple(raw.shape[1:]) != shape[1:]:
                raise DataError(f"{source.where}: images at rows {a}..{a + len(raw) - 1} have shape "
                                f"{tuple(raw.shape[1:])} but earlier ones {shape[1:]}; all images of a dataset must "
                                "share one size: pass --image-size N to resize and centre-crop them to N x N")
            np.ascontiguousarray(raw.numpy(), dtype=dtype).tofile(fh)  # no copy for contiguous uint8
            if stats is not None or raw.dtype != torch.uint8:  # float images are range-checked
                unit = _checked_unit(raw, source.where)
                if stats is not None:
                    stats.add(unit)
    finally:
        if fh is not None:
            fh.close()
    return shape[-1]


def _open_npy(path: Path, shape: tuple[int, ...], dtype: type) -> BinaryIO:
    """A ``.npy`` file of ``shape``/``dtype`` opened after its header: the rows are appended in order,
    written sequentially rather than through a map (so writing never holds the pages in this process)."""
    fh = open(path, "wb")
    np.lib.format.write_array_header_2_0(fh, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                              "fortran_order": False, "shape": shape})
    return fh


def _widen(path: Path, shape: tuple[int, ...], written: int, stats: _ChannelStats | None) -> BinaryIO:
    """Rewrite the first ``written`` single-channel rows of ``path`` as RGB (grayscale repeated), as
    :func:`_load_images` does for a folder that mixes both; returns the file open for the next rows."""
    with open(path, "rb") as f:  # the file is shorter than its header says: map only the rows written
        np.lib.format.read_magic(f)
        _, _, dtype = np.lib.format.read_array_header_2_0(f)
        offset = f.tell()
    old = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(written, *shape[1:-1], 1))
    wide_path = path.with_name(path.name + ".rgb")
    fh = _open_npy(wide_path, shape, dtype)
    step = chunk_rows(shape[1:])
    for a in range(0, written, step):
        np.repeat(np.asarray(old[a:min(a + step, written)]), 3, axis=-1).tofile(fh)
    del old
    os.replace(wide_path, path)
    if stats is not None and stats.total is not None:  # each channel of a repeated grey image has the grey sums
        stats.total, stats.squares = stats.total.repeat(3), stats.squares.repeat(3)
    return fh


def _channel_views(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[torch.Tensor, ...]:
    """Mean and std as ``[C, 1, 1]`` tensors matching x's dtype and device."""
    if x.dim() < 3 or not len(mean) == len(std) == x.shape[-3]:
        raise ConfigError(f"normalisation stats have {len(mean)}/{len(std)} channels but images have shape "
                          f"{tuple(x.shape)}; pass [..., C, H, W] images and one mean/std per channel")
    return tuple(torch.tensor(v, dtype=x.dtype, device=x.device).view(-1, 1, 1) for v in (mean, std))


def _class_ranks(y: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded permutation of rows and each permuted row's rank within its class."""
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    order = torch.sort(y[perm], stable=True).indices  # groups classes, keeps permuted order inside
    sorted_labels = y[perm][order]
    counts = torch.bincount(sorted_labels)
    rank = torch.empty_like(perm)
    rank[order] = torch.arange(len(y)) - (torch.cumsum(counts, 0) - counts)[sorted_labels]
    return perm, rank


def _stratified_subset(y: torch.Tensor, n: int | None, seed: int, what: str) -> torch.Tensor:
    """Sorted positions of n rows balanced over classes (round-robin over a seeded permutation)."""
    if n is None:
        return torch.arange(len(y))
    if n < 1 or n > len(y):
        raise ConfigError(f"{what}={n} is out of range: {len(y)} rows are available; pass 1..{len(y)} or omit it")
    perm, rank = _class_ranks(y, seed)
    return torch.sort(perm[torch.sort(rank, stable=True).indices[:n]]).values


def _stratified_split(y: torch.Tensor, test_fraction: float, seed: int, where: Path) -> tuple[torch.Tensor, ...]:
    """Sorted (train, test) rows; round(test_fraction * n_c) of each class held out, >= 1 left to train."""
    perm, rank = _class_ranks(y, seed)
    counts = torch.bincount(y)
    n_test = torch.minimum(torch.floor(test_fraction * counts + 0.5).long(), counts - 1)
    is_test = rank < n_test[y[perm]]
    if not is_test.any():
        raise DataError(f"{where}: too few samples ({len(y)}) to hold out a test split with test_fraction="
                        f"{test_fraction}; add samples, raise test_fraction, or provide a test split")
    return torch.sort(perm[~is_test]).values, torch.sort(perm[is_test]).values


class _ChannelStats:
    """Per-channel sums of images in [0, 1], accumulated in float64 over pieces of :func:`stats_rows` rows.

    Feeding the same rows in the same order gives the same bits whether they arrive at once or
    in chunks whose sizes are multiples of the piece, so a cache built chunk by chunk normalises
    exactly like :func:`load_dataset`.
    """

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.squares: torch.Tensor | None = None
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        """Add float ``[n, C, H, W]`` images."""
        if self.total is None:
            self.total = torch.zeros(x.shape[1], dtype=torch.float64)
            self.squares = torch.zeros_like(self.total)
        for chunk in x.split(stats_rows(tuple(x.shape[1:]))):  # bounded float64 copies
            c = chunk.double()
            self.total += c.sum((0, 2, 3))
            self.squares += c.square_().sum((0, 2, 3))  # in place: one float64 copy at a time
        self.count += x.shape[0] * x.shape[2] * x.shape[3]

    def result(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) per channel, std floored at 1e-6."""
        mean = self.total / self.count
        std = (self.squares / self.count - mean * mean).clamp_min(0).sqrt().clamp_min(1e-6)
        return tuple(mean.tolist()), tuple(std.tolist())


def _channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (floored at 1e-6) of float ``[N, C, H, W]``, accumulated in float64."""
    stats = _ChannelStats()
    stats.add(x)
    return stats.result()


def _to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 / 255; float -> float32 (assumed in [0, 1]); ``[N,H,W(,C)]`` -> contiguous ``[N,C,H,W]``.

    The strides are always the standard ones (a single channel too, which ``contiguous`` would leave
    channels-last): convolutions choose kernels by strides, so every source gives the same bits.
    """
    if x.dim() == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
    return (x.float().div_(255) if x.dtype == torch.uint8 else x.float()).contiguous()


def _torchvision_source(key: str, root: Path) -> _Source:
    """A torchvision dataset read from root without downloading."""
    import torchvision

    spec = _TORCHVISION[key]
    folder = root / spec.folder
    cls = getattr(torchvision.datasets, spec.cls_name)
    try:
        train, test = (cls(root=str(root), train=flag, download=False) for flag in (True, False))
    except (RuntimeError, OSError, ValueError, EOFError, pickle.UnpicklingError) as err:
        if all((folder / f).is_file() for f in spec.files):
            raise DataError(f"could not read {spec.cls_name} from {folder}: {_one_line(err)}; the files look "
                            "damaged: replace them with intact copies") from err
        gz = " (found .gz archives: gunzip them first)" if list(folder.glob("*.gz")) else ""
        raise DataError(f"{spec.cls_name} not found under {folder}: expected {', '.join(spec.files)}{gz}; "
                        f"pass --data-root pointing at the folder that holds {spec.folder.split('/')[0]}/ "
                        "(downloads are disabled)") from err
    images = [torch.as_tensor(np.asarray(ds.data)) for ds in (train, test)]  # uint8 [N,H,W] or [N,H,W,3]
    labels = [torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64) for ds in (train, test)]
    return _Source(y_train=labels[0], y_test=labels[1], train_index=torch.arange(len(labels[0])),
                   test_index=torch.arange(len(labels[1])), num_classes=len(train.classes),
                   load=lambda i, j: (images[0][i], images[1][j]), where=str(folder),
                   mean=spec.mean, std=spec.std)


def _resolve_path(dataset: str, root: Path) -> Path:
    """The dataset path as given, else under data_root if it exists there."""
    path = Path(dataset).expanduser()
    if not path.exists() and not path.is_absolute() and (root / path).exists():
        return root / path
    return path


def _one_line(err: BaseException) -> str:
    """An exception's message folded onto one line."""
    return " ".join(str(err).split()) or type(err).__name__


def _open_arrays(path: Path) -> dict[str, object]:
    """The x/y/x_test/y_test arrays present in a .npz or HDF5 file, opened without reading the images.

    HDF5 datasets stay on disk (the file stays open while they are referenced); members of an
    uncompressed ``.npz`` are memory-mapped; a compressed ``.npz`` member has to be read whole.
    """
    keys = ("x", "y", "x_test", "y_test")
    try:
        if path.suffix.lower() == ".npz":
            from ddm_hpc.stream import npz_memmap

            with zipfile.ZipFile(path) as zf:
                stored = {n[:-4] for n in zf.namelist() if n.endswith(".npy")
                          and zf.getinfo(n).compress_type == zipfile.ZIP_STORED}
            with np.load(path, allow_pickle=False) as f:
                return {k: npz_memmap(path, k) if k in stored else f[k] for k in keys if k in f.files}
        import h5py

        f = h5py.File(path, "r", locking=False)
        return {k: f[k] for k in keys if isinstance(f.get(k), h5py.Dataset)}
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise DataError(f"could not read {path}: {_one_line(err)}; pass a valid {path.suffix} file") from err


def _take(array: object, rows: torch.Tensor) -> torch.Tensor:
    """``array[rows]`` for increasing ``rows``: one read per contiguous run (HDF5 datasets and memory maps)."""
    from ddm_hpc.stream import _runs

    runs = _runs(rows.numpy())
    if not runs:
        return torch.from_numpy(np.empty((0, *array.shape[1:]), dtype=array.dtype))
    parts = [np.asarray(array[a:b]) for a, b in runs]
    return torch.from_numpy(np.concatenate(parts) if len(parts) > 1 else np.array(parts[0]))


def _array(arrays: dict[str, object], key: str, path: Path) -> object:
    """arrays[key], or a DataError naming the file, the key and what was found."""
    if key not in arrays:
        raise DataError(f"{path} has no {key!r} array (found: {', '.join(arrays) or 'none'}); store images as "
                        "'x' [N,H,W] or [N,H,W,C] and integer labels as 'y' [N] (optionally 'x_test'/'y_test')")
    return arrays[key]


def _check_images(arrays: dict[str, object], key: str, path: Path) -> object:
    """Validate an image array's shape and dtype (uint8 or float, ``[N,H,W]`` or ``[N,H,W,C]`` with C <= 4)."""
    x = _array(arrays, key, path)
    if len(x.shape) not in (3, 4) or (len(x.shape) == 4 and x.shape[-1] > 4):
        raise DataError(f"{path}: {key!r} has shape {x.shape}; expected [N,H,W] or channels-last [N,H,W,C] "
                        "with C <= 4 (transpose [N,C,H,W] arrays with x.transpose(0, 2, 3, 1))")
    if x.dtype != np.uint8 and not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{path}: {key!r} has dtype {x.dtype}; store uint8 in 0..255 or float in [0, 1]")
    return x


def _check_labels(arrays: dict[str, np.ndarray], key: str, n: int, path: Path) -> torch.Tensor:
    """Validate a 1-D integer label array of length n."""
    y = np.asarray(_array(arrays, key, path))
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: {key!r} has shape {y.shape} and dtype {y.dtype}; expected integer labels [N]")
    if len(y) != n:
        raise DataError(f"{path}: {key!r} has {len(y)} labels but the images have {n} rows; make them match")
    if n and y.min() < 0:
        raise DataError(f"{path}: {key!r} has negative labels (min {y.min()}); use class ids 0..L-1")
    return torch.from_numpy(y.astype(np.int64))


def _array_source(path: Path, seed: int, test_fraction: float) -> _Source:
    """Images and labels from a .npz/.h5 file, split per class if it has no x_test/y_test."""
    arrays = _open_arrays(path)
    x = _check_images(arrays, "x", path)
    y = _check_labels(arrays, "y", len(x), path)
    if len(y) == 0:
        raise DataError(f"{path}: 'x' and 'y' are empty; store at least one image per class")
    num_classes = _check_contiguous(y, path, "y")
    if "x_test" in arrays or "y_test" in arrays:
        x_test = _check_images(arrays, "x_test", path)
        y_test = _check_labels(arrays, "y_test", len(x_test), path)
        if tuple(x_test.shape[1:]) != tuple(x.shape[1:]):
            raise DataError(f"{path}: 'x_test' images have shape {tuple(x_test.shape[1:])} but 'x' images "
                            f"{tuple(x.shape[1:])}; store both splits at the same size")
        train_index, test_index = torch.arange(len(y)), torch.arange(len(y_test))
    else:
        x_test, y_test = x, y
        train_index, test_index = _stratified_split(y, test_fraction, seed, path)
    if len(y_test) and int(y_test.max()) >= num_classes:
        raise DataError(f"{path}: 'y_test' has label {int(y_test.max())} but 'y' only has classes "
                        f"0..{num_classes - 1}; use the same class ids in both splits")
    return _Source(y_train=y[train_index], y_test=y_test[test_index], train_index=train_index,
                   test_index=test_index, num_classes=num_classes,
                   load=lambda i, j: (_take(x, i), _take(x_test, j)), where=str(path))


def _chunks_source(folder: Path, seed: int, test_fraction: float) -> _Source:
    """A folder of ``.npz`` chunks (sorted by name, each with ``x`` and ``y``), split per class here.

    Only the labels are read up front; images are read one chunk file at a time
    (:class:`ddm_hpc.stream.NpzChunkStream`).
    """
    from ddm_hpc.stream import NpzChunkStream

    chunks = NpzChunkStream(folder)
    first = chunks.read_raw([0])
    if first.ndim not in (3, 4) or (first.ndim == 4 and first.shape[-1] > 4):
        raise DataError(f"{chunks.files[0]}: 'x' has shape {first.shape}; expected [N,H,W] or channels-last "
                        "[N,H,W,C] with C <= 4")
    y = torch.from_numpy(chunks.labels)
    train_index, test_index = _stratified_split(y, test_fraction, seed, folder)

    def load(i: torch.Tensor, j: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(torch.from_numpy(chunks.read_raw(k.numpy())) if len(k) else
                     torch.from_numpy(np.empty((0, *first.shape[1:]), dtype=first.dtype)) for k in (i, j))

    return _Source(y_train=y[train_index], y_test=y[test_index], train_index=train_index, test_index=test_index,
                   num_classes=chunks.num_classes, load=load, where=str(folder))


def _check_contiguous(y: torch.Tensor, where: Path, key: str) -> int:
    """Number of classes L, after checking the labels are exactly 0..L-1."""
    present = torch.unique(y)
    if int(present[-1]) + 1 != len(present):
        missing = sorted(set(range(int(present[-1]) + 1)) - set(present.tolist()))
        raise DataError(f"{where}: labels in {key!r} must be the contiguous ids 0..L-1 but {missing[:10]} "
                        "never occur; relabel the classes to 0..L-1")
    return len(present)


def _images_in(folder: Path) -> list[Path]:
    """Sorted image files (png/jpg/jpeg, any case) in folder, or in folder/images if that exists."""
    folder = folder / "images" if (folder / "images").is_dir() else folder
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise DataError(f"no {'/'.join(IMAGE_SUFFIXES)} images in {folder}; remove the folder or add images")
    return files


def _class_tree(folder: Path, class_to_idx: dict[str, int]) -> tuple[list[Path], torch.Tensor]:
    """Files and labels of a ``<class>/<image>`` tree whose classes must all be in class_to_idx."""
    files, labels = [], []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if sub.name not in class_to_idx:
            raise DataError(f"{sub} is not one of the {len(class_to_idx)} training classes; remove it or add "
                            "a training folder of that name")
        found = _images_in(sub)
        files += found
        labels += [class_to_idx[sub.name]] * len(found)
    return files, torch.tensor(labels, dtype=torch.int64)


def _tiny_val(val: Path, class_to_idx: dict[str, int]) -> tuple[list[Path], torch.Tensor]:
    """Files and labels listed in TinyImageNet's val/val_annotations.txt (filename, wnid, ...)."""
    files, labels = [], []
    notes = val / "val_annotations.txt"
    for line_no, line in enumerate(notes.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("\t")
        image = val / "images" / parts[0]
        if len(parts) < 2 or parts[1] not in class_to_idx or not image.is_file():
            raise DataError(f"{notes} line {line_no}: expected '<file in val/images>\\t<training class>' but got "
                            f"{line.strip()[:80]!r}; fix the line or the missing file")
        files.append(image)
        labels.append(class_to_idx[parts[1]])
    return files, torch.tensor(labels, dtype=torch.int64)


def _folder_source(root: Path, seed: int, test_fraction: float, image_size: int = 0) -> _Source:
    """An image-folder tree: TinyImageNet, train/ + val|test/, or <class>/ folders (split here)."""
    has_train = (root / "train").is_dir()
    train_dir = root / "train" if has_train else root
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{train_dir} has no class subfolders; use <class>/*.png folders, {_FORMS}")
    class_to_idx = {c: i for i, c in enumerate(classes)}
    train_files, y = _class_tree(train_dir, class_to_idx)
    test_dir = next((d for d in (root / "val", root / "test") if d.is_dir()), None) if has_train else None
    if test_dir is None:  # one labelled tree: hold out a stratified test split
        test_files, y_test = train_files, y
        train_index, test_index = _stratified_split(y, test_fraction, seed, root)
    else:
        tiny = (test_dir / "val_annotations.txt").is_file()
        test_files, y_test = (_tiny_val if tiny else _class_tree)(test_dir, class_to_idx)
        if not test_files:
            raise DataError(f"{test_dir} holds no labelled images; add <class>/ subfolders (or TinyImageNet's "
                            "val_annotations.txt), or remove it to split the training images instead")
        train_index, test_index = torch.arange(len(y)), torch.arange(len(y_test))

    def load(i: torch.Tensor, j: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = _load_images([train_files[k] for k in i.tolist()] + [test_files[k] for k in j.tolist()], image_size)
        return images[: len(i)], images[len(i):]

    return _Source(y_train=y[train_index], y_test=y_test[test_index], train_index=train_index,
                   test_index=test_index, num_classes=len(classes), load=load, where=str(root))


def _decode(f: Path, size: int = 0) -> np.ndarray:
    """One image file as uint8 ``[H, W]`` (mode 'L') or ``[H, W, 3]``; with ``size``, its shorter side
    resized to ``size`` (bilinear) and the centre ``size`` x ``size`` square cropped."""
    from PIL import Image

    try:
        with Image.open(f) as im:
            im = im if im.mode == "L" else im.convert("RGB")
            if size:
                w, h = im.size
                im = im.resize((max(size, round(w * size / min(w, h))), max(size, round(h * size / min(w, h)))),
                               Image.BILINEAR)
                left, top = (im.width - size) // 2, (im.height - size) // 2
                im = im.crop((left, top, left + size, top + size))
            return np.asarray(im)
    except (OSError, ValueError) as err:
        raise DataError(f"could not read image {f}: {_one_line(err)}; replace or remove the file") from err


# Threads decoding image files (PIL releases the GIL while decoding). On 2 cores they measured 0.76x
# (64x64 JPEGs) to 1.1x (224x224), so machines with fewer than 4 cores decode in one thread.
DECODE_THREADS = min(8, os.cpu_count() or 1) if (os.cpu_count() or 1) >= 4 else 1


def _load_images(files: list[Path], size: int = 0) -> torch.Tensor:
    """uint8 ``[N, H, W, C]`` from image files: grayscale if all are mode 'L', else RGB; sizes must agree
    unless ``size`` resizes them (:func:`_decode`).

    Files are decoded by :data:`DECODE_THREADS` threads when there are many (same result, in order).
    """
    if len(files) >= 64 and DECODE_THREADS > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(DECODE_THREADS) as pool:
            arrays = list(pool.map(_decode, files, [size] * len(files)))
    else:
        arrays = [_decode(f, size) for f in files]
    for f, a in zip(files, arrays):
        if a.shape[:2] != arrays[0].shape[:2]:
            (h, w), (h0, w0) = a.shape[:2], arrays[0].shape[:2]
            raise DataError(f"{f} is {w}x{h} but {files[0]} is {w0}x{h0}; all images of a dataset must share "
                            "one size: pass --image-size N to resize and centre-crop them to N x N")
    if any(a.ndim == 3 for a in arrays):
        arrays = [np.repeat(a[..., None], 3, axis=-1) if a.ndim == 2 else a for a in arrays]
    else:
        arrays = [a[..., None] for a in arrays]
    return torch.from_numpy(np.stack(arrays))
