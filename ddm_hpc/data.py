"""Datasets as normalised tensors: torchvision sets, ``.npz``/``.h5`` arrays and image folders.

``load_dataset`` is the one entry point; every source ends as a :class:`DatasetBundle` of
float32 ``[N, C, H, W]`` images normalised per channel, int64 labels, and the index of
every row in its source split (so attribution scores can be traced back to source images).
Nothing is ever downloaded. Example::

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
from typing import Callable

import numpy as np
import torch

from ddm_hpc.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
ARRAY_SUFFIXES = (".npz", ".h5", ".hdf5")
_FORMS = ("a .npz/.h5/.hdf5 file with 'x' [N,H,W(,C)] and 'y' [N] (optionally 'x_test'/'y_test'), "
          "or an image folder (TinyImageNet train/+val/val_annotations.txt, train/<class>/ with "
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
    """Labels and source indices of both splits, plus a loader of images by source index."""

    y_train: torch.Tensor
    y_test: torch.Tensor
    train_index: torch.Tensor
    test_index: torch.Tensor
    num_classes: int
    load: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
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
                 n_test: int | None = None, seed: int = 0, test_fraction: float = 0.2) -> DatasetBundle:
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

    Returns:
        The bundle. Torchvision sets use fixed published mean/std; files and folders use the
        per-channel mean/std of the returned training images (std floored at 1e-6).

    Raises:
        DataError: the data is missing, unreadable or malformed, or the name is unknown.
        ConfigError: a size or fraction is out of range.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction={test_fraction} must be strictly between 0 and 1; pass e.g. 0.2")
    root = Path(data_root)
    key = dataset.lower().replace("-", "").replace("_", "")
    if key in _TORCHVISION:
        name, source = key, _torchvision_source(key, root)
    else:
        name, path = dataset, _resolve_path(dataset, root)
        if path.is_file() and path.suffix.lower() in ARRAY_SUFFIXES:
            source = _array_source(path, seed, test_fraction)
        elif path.is_dir():
            source = _folder_source(path, seed, test_fraction)
        else:
            raise DataError(f"unknown dataset {dataset!r}: not one of {', '.join(available_datasets())} "
                            f"and not an existing file or folder (also tried under {root}); pass one of "
                            f"those names, {_FORMS}")
    train_rows = _stratified_subset(source.y_train, n_train, seed, "n_train")
    test_rows = _stratified_subset(source.y_test, n_test, seed, "n_test")
    train_index, test_index = source.train_index[train_rows], source.test_index[test_rows]
    x_train, x_test = source.load(train_index, test_index)
    mean, std = (source.mean, source.std) if source.mean is not None else _channel_stats(x_train)
    bundle = DatasetBundle(
        name=name, x_train=normalize(x_train, mean, std), x_test=normalize(x_test, mean, std),
        y_train=source.y_train[train_rows], y_test=source.y_test[test_rows],
        train_index=train_index, test_index=test_index, num_classes=source.num_classes, mean=mean, std=std)
    logger.info("loaded %s: %d train / %d test images of shape %s, %d classes", name, len(train_index),
                len(test_index), bundle.image_shape, bundle.num_classes)
    return bundle


MAPPED = ("x_train", "y_train", "x_test", "y_test", "train_index", "test_index")


def mapped_dataset(dataset: str, data_root: str | Path, cache_root: str | Path, n_train: int | None = None,
                   n_test: int | None = None, seed: int = 0) -> DatasetBundle:
    """:func:`load_dataset`, memory-mapped from a cache of ``.npy`` files under ``cache_root/<key>/``.

    The first call loads the dataset (into memory, once), writes its normalised arrays there (each
    through a temp file, ``meta.json`` last) and maps them; later calls (other stages, worker
    processes, SLURM tasks) only map them, so the processes share the OS page cache and none holds a
    private copy. The key hashes every argument; the arrays are copy-on-write maps (never written).
    """
    args = {"dataset": str(dataset), "data_root": str(data_root), "n_train": n_train, "n_test": n_test, "seed": seed}
    folder = Path(cache_root) / hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:16]
    meta = folder / "meta.json"
    if not meta.is_file():
        bundle = load_dataset(dataset, data_root, n_train=n_train, n_test=n_test, seed=seed)
        folder.mkdir(parents=True, exist_ok=True)
        for name in MAPPED:
            tmp = folder / f".{name}.tmp.{os.getpid()}.npy"
            np.save(tmp, getattr(bundle, name).numpy())
            os.replace(tmp, folder / f"{name}.npy")
        tmp = folder / f".meta.tmp.{os.getpid()}"
        tmp.write_text(json.dumps({**args, "name": bundle.name, "num_classes": bundle.num_classes,
                                   "mean": list(bundle.mean), "std": list(bundle.std)}))
        os.replace(tmp, meta)
        logger.info("data cache: wrote %s (memory-mapped by later loads)", folder)
    info = json.loads(meta.read_text())
    arrays = {name: torch.from_numpy(np.load(folder / f"{name}.npy", mmap_mode="c")) for name in MAPPED}
    return DatasetBundle(name=info["name"], num_classes=info["num_classes"], mean=tuple(info["mean"]),
                         std=tuple(info["std"]), **arrays)


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


def _channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (floored at 1e-6) of float ``[N, C, H, W]``, accumulated in float64."""
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for chunk in x.split(1024):  # bounded float64 copies, even for large folders
        c = chunk.double()
        total += c.sum((0, 2, 3))
        squares += (c * c).sum((0, 2, 3))
    count = x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    std = (squares / count - mean * mean).clamp_min(0).sqrt().clamp_min(1e-6)
    return tuple(mean.tolist()), tuple(std.tolist())


def _to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 / 255; float -> float32 (assumed in [0, 1]); ``[N,H,W(,C)]`` -> ``[N,C,H,W]``."""
    x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
    return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


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
                   load=lambda i, j: (_to_unit(images[0][i]), _to_unit(images[1][j])),
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


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    """The x/y/x_test/y_test arrays present in a .npz or HDF5 file."""
    keys = ("x", "y", "x_test", "y_test")
    try:
        if path.suffix.lower() == ".npz":
            with np.load(path, allow_pickle=False) as f:
                return {k: f[k] for k in keys if k in f.files}
        import h5py

        with h5py.File(path, "r") as f:
            return {k: f[k][()] for k in keys if isinstance(f.get(k), h5py.Dataset)}
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise DataError(f"could not read {path}: {_one_line(err)}; pass a valid {path.suffix} file") from err


def _array(arrays: dict[str, np.ndarray], key: str, path: Path) -> np.ndarray:
    """arrays[key], or a DataError naming the file, the key and what was found."""
    if key not in arrays:
        raise DataError(f"{path} has no {key!r} array (found: {', '.join(arrays) or 'none'}); store images as "
                        "'x' [N,H,W] or [N,H,W,C] and integer labels as 'y' [N] (optionally 'x_test'/'y_test')")
    return arrays[key]


def _check_images(arrays: dict[str, np.ndarray], key: str, path: Path) -> torch.Tensor:
    """Validate an image array (uint8 or float, ``[N,H,W]`` or ``[N,H,W,C]`` with C <= 4)."""
    x = _array(arrays, key, path)
    if x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] > 4):
        raise DataError(f"{path}: {key!r} has shape {x.shape}; expected [N,H,W] or channels-last [N,H,W,C] "
                        "with C <= 4 (transpose [N,C,H,W] arrays with x.transpose(0, 2, 3, 1))")
    if x.dtype != np.uint8 and not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{path}: {key!r} has dtype {x.dtype}; store uint8 in 0..255 or float in [0, 1]")
    if x.dtype != np.uint8 and x.size and (x.min() < 0 or x.max() > 1):
        logger.warning("%s: float %r spans [%g, %g], not [0, 1]; using it as is", path, key, x.min(), x.max())
    return torch.from_numpy(np.ascontiguousarray(x))


def _check_labels(arrays: dict[str, np.ndarray], key: str, n: int, path: Path) -> torch.Tensor:
    """Validate a 1-D integer label array of length n."""
    y = _array(arrays, key, path)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: {key!r} has shape {y.shape} and dtype {y.dtype}; expected integer labels [N]")
    if len(y) != n:
        raise DataError(f"{path}: {key!r} has {len(y)} labels but the images have {n} rows; make them match")
    if n and y.min() < 0:
        raise DataError(f"{path}: {key!r} has negative labels (min {y.min()}); use class ids 0..L-1")
    return torch.from_numpy(y.astype(np.int64))


def _array_source(path: Path, seed: int, test_fraction: float) -> _Source:
    """Images and labels from a .npz/.h5 file, split per class if it has no x_test/y_test."""
    arrays = _read_arrays(path)
    x = _check_images(arrays, "x", path)
    y = _check_labels(arrays, "y", len(x), path)
    if len(y) == 0:
        raise DataError(f"{path}: 'x' and 'y' are empty; store at least one image per class")
    num_classes = _check_contiguous(y, path, "y")
    if "x_test" in arrays or "y_test" in arrays:
        x_test = _check_images(arrays, "x_test", path)
        y_test = _check_labels(arrays, "y_test", len(x_test), path)
        if x_test.shape[1:] != x.shape[1:]:
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
                   load=lambda i, j: (_to_unit(x[i]), _to_unit(x_test[j])))


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


def _folder_source(root: Path, seed: int, test_fraction: float) -> _Source:
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
        images = _load_images([train_files[k] for k in i.tolist()] + [test_files[k] for k in j.tolist()])
        return _to_unit(images[: len(i)]), _to_unit(images[len(i):])

    return _Source(y_train=y[train_index], y_test=y_test[test_index], train_index=train_index,
                   test_index=test_index, num_classes=len(classes), load=load)


def _load_images(files: list[Path]) -> torch.Tensor:
    """uint8 ``[N, H, W, C]`` from image files: grayscale if all are mode 'L', else RGB; sizes must agree."""
    from PIL import Image

    arrays = []
    for f in files:
        try:
            with Image.open(f) as im:
                arrays.append(np.asarray(im if im.mode == "L" else im.convert("RGB")))
        except (OSError, ValueError) as err:
            raise DataError(f"could not read image {f}: {_one_line(err)}; replace or remove the file") from err
        if arrays[-1].shape[:2] != arrays[0].shape[:2]:
            (h, w), (h0, w0) = arrays[-1].shape[:2], arrays[0].shape[:2]
            raise DataError(f"{f} is {w}x{h} but {files[0]} is {w0}x{h0}; all images of a dataset must share "
                            "one size (resize them first)")
    if any(a.ndim == 3 for a in arrays):
        arrays = [np.repeat(a[..., None], 3, axis=-1) if a.ndim == 2 else a for a in arrays]
    else:
        arrays = [a[..., None] for a in arrays]
    return torch.from_numpy(np.stack(arrays))
