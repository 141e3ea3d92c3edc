"""The source layer: one class per storage format, each giving labels up front and images by row.

A :class:`Source` is one table of images: ``labels`` (int64 ``[N]``, read when it is opened) and
``read(rows)``, the raw images of sorted unique rows as stored (uint8, or float in [0, 1],
``[n, H, W]`` or channels-last ``[n, H, W, C]``). Nothing else is ever read, so a source can be an
HDF5 file or a folder of a million JPEGs:

  ArraySource  an array in memory, an HDF5 dataset (one hyperslab per contiguous run of rows), a
               ``.npy`` file or an uncompressed ``.npz`` member (memory-mapped)
  ChunkSource  a folder of ``.npz`` chunk files (sorted by name, each with ``x`` and ``y``), one chunk
               file read at a time
  FileSource   image files (png/jpg/jpeg), decoded file by file, optionally resized

:class:`Splits` pairs a training and a test source with the source rows of each split, and
:func:`open_splits` builds it for every dataset the toolkit accepts (torchvision sets, ``.npz``/``.h5``
files, ``.npz`` chunk folders, image folders and TinyImageNet trees; a source without a test split
is split here, per class). The in-memory load (``bundle``), the streamed cache (``cache``) and the
batch streams (``stream``) all read images through these classes and nothing else.

Room: imports ``data.images`` (and ``errors``, ``utils``).
"""
from __future__ import annotations

import logging
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from ddm_hpc.data.images import IMAGE_SUFFIXES, load_images
from ddm_hpc.errors import ConfigError, DataError
from ddm_hpc.utils import one_line

logger = logging.getLogger(__name__)

ARRAY_SUFFIXES = (".npz", ".h5", ".hdf5")
FORMS = ("a .npz/.h5/.hdf5 file with 'x' [N,H,W(,C)] and 'y' [N] (optionally 'x_test'/'y_test'), "
         "a folder of .npz chunks each with 'x' and 'y', or an image folder (TinyImageNet train/+val/val_annotations.txt, "
         "train/<class>/ with val/<class>/ or test/<class>/, or <class>/ subfolders)")
_STORE = "store images as 'x' [N,H,W] or [N,H,W,C] and integer labels as 'y' [N] (optionally 'x_test'/'y_test')"


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


def available_datasets() -> list[str]:
    """Names accepted by :func:`ddm_hpc.data.load_dataset` besides file and folder paths."""
    return sorted(_TORCHVISION)


# ----------------------------------------------------------------------------- sources
def runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """Maximal contiguous (start, stop) runs of sorted unique rows."""
    if len(rows) == 0:
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(rows)]])
    return [(int(rows[a]), int(rows[b - 1]) + 1) for a, b in zip(starts, stops)]


class Source:
    """One table of images: labels of every row up front, images read on demand by row.

    Attributes:
        labels: int64 ``[N]``, the label of every row.
        where: the file or folder, for messages.
    """

    def __init__(self, labels: np.ndarray, where: str) -> None:
        self.labels = np.array(labels, dtype=np.int64)  # a writable copy (labels of a memmap are read-only)
        self.where = where

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Raw images of sorted unique ``rows`` as stored: a new uint8 or float array ``[n, H, W(, C)]``."""
        raise NotImplementedError


class ArraySource(Source):
    """Images of one array: in memory, an HDF5 dataset, a ``.npy`` file or an ``.npz`` member.

    A file is opened lazily in each process (HDF5 handles do not survive ``fork``; memory maps are
    remapped), never pickled. ``.npy`` files and uncompressed ``.npz`` members are memory-mapped; a
    compressed ``.npz`` member is read whole when ``whole_compressed`` (the in-memory load and the
    cache accept it), else refused (a stream cannot map it). HDF5 is read by one hyperslab per run
    of consecutive rows.
    """

    def __init__(self, labels: np.ndarray, where: str, array: np.ndarray | None = None, path: Path | None = None,
                 key: str = "x", whole_compressed: bool = True) -> None:
        super().__init__(labels, where)
        self.path, self.key, self.whole_compressed = path, key, whole_compressed
        self._array = array
        self._owned = array is not None  # an in-memory array travels with the source
        self._file: h5py.File | None = None
        self._pid = os.getpid()

    @classmethod
    def open(cls, path: str | Path, key: str = "x", label_key: str = "y", whole_compressed: bool = False
             ) -> ArraySource:
        """The ``key`` images and ``label_key`` labels of one file: ``.h5``/``.hdf5``, ``.npy`` (``x.npy`` beside
        ``y.npy``) or ``.npz``; checks their shapes."""
        path = Path(path)
        labels = np.asarray(open_member(path, label_key, whole_compressed=True)[()])
        src = cls(labels, str(path), path=path, key=key, whole_compressed=whole_compressed)
        shape = src.shape
        if len(shape) not in (3, 4) or (len(shape) == 4 and shape[-1] > 4):
            raise DataError(f"{path}: {key!r} has shape {shape}; expected [N,H,W] or channels-last [N,H,W,C] with "
                            "C <= 4 (transpose [N,C,H,W] arrays with x.transpose(0, 2, 3, 1))")
        if len(labels) != shape[0]:
            raise DataError(f"{path}: {label_key!r} has {len(labels)} labels but {key!r} has {shape[0]} rows; "
                            "make them match")
        src.close()
        return src

    @property
    def array(self) -> np.ndarray | h5py.Dataset:
        """The image array, (re)opened in this process."""
        if self._owned:
            return self._array
        if self._array is None or self._pid != os.getpid():
            self._file = None
            if self.path.suffix.lower() in (".h5", ".hdf5"):
                self._file = _open_h5(self.path)
                self._array = _h5_member(self._file, self.path, self.key)
            else:
                self._array = open_member(self.path, self.key, self.whole_compressed)
            self._pid = os.getpid()
        return self._array

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.array.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.array.dtype)

    def read(self, rows: np.ndarray) -> np.ndarray:
        arr = self.array
        if isinstance(arr, np.ndarray) and not isinstance(arr, np.memmap):
            return arr[np.asarray(rows, dtype=np.int64)]
        parts = [np.asarray(arr[a:b]) for a, b in runs(np.asarray(rows))]
        if not parts:
            return np.empty((0, *arr.shape[1:]), dtype=arr.dtype)
        if len(parts) > 1:
            return np.concatenate(parts)
        return parts[0] if parts[0].flags.writeable else np.array(parts[0])  # a memory map's slice is read-only

    def close(self) -> None:
        """Drop this process's handle (reopened on the next read)."""
        if not self._owned:
            if self._file is not None:
                self._file.close()
            self._file, self._array = None, None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if not self._owned:
            state["_file"], state["_array"], state["_pid"] = None, None, -1  # never pickle an open file
        return state


class ChunkSource(Source):
    """A folder of ``.npz`` chunk files (sorted by name), each with ``x`` and ``y``; one chunk in memory at a time.

    Only the labels are read when it is opened (and the first chunk, to check its images' shape).
    """

    def __init__(self, folder: str | Path) -> None:
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
        super().__init__(np.concatenate(labels), str(folder))
        first = self._chunk(0)
        if first.ndim not in (3, 4) or (first.ndim == 4 and first.shape[-1] > 4):
            raise DataError(f"{self.files[0]}: 'x' has shape {first.shape}; expected [N,H,W] or channels-last "
                            "[N,H,W,C] with C <= 4")

    def _chunk(self, i: int) -> np.ndarray:
        """Images of chunk i (the last one read stays cached)."""
        if self._cached is None or self._cached[0] != i:
            with np.load(self.files[i], allow_pickle=False) as z:
                self._cached = (i, np.asarray(z["x"]))
        return self._cached[1]

    def read(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            first = self._chunk(0)
            return np.empty((0, *first.shape[1:]), dtype=first.dtype)
        which = np.searchsorted(self.offsets, rows, side="right") - 1
        return np.concatenate([self._chunk(int(c))[rows[which == c] - self.offsets[c]] for c in np.unique(which)])

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_cached"] = None
        return state


class FileSource(Source):
    """Image files, decoded when read (grey if every file read together is grey, else RGB); ``size`` resizes the
    shorter side and crops the centre square (:func:`ddm_hpc.data.images.decode`)."""

    def __init__(self, files: list[Path], labels: np.ndarray, where: str, size: int = 0) -> None:
        super().__init__(labels, where)
        self.files, self.size = list(files), size

    @classmethod
    def class_tree(cls, root: str | Path, size: int = 0) -> FileSource:
        """A ``<root>/<class>/<image>`` tree, classes sorted by name (label = position)."""
        root = Path(root)
        classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not classes:
            raise DataError(f"{root} has no class subfolders; use <class>/*.png folders")
        files, labels = _class_tree(root, {c: i for i, c in enumerate(classes)})
        return cls(files, labels.numpy(), str(root), size)

    def read(self, rows: np.ndarray) -> np.ndarray:
        if len(rows) == 0:
            return np.empty((0, 0, 0, 1), dtype=np.uint8)
        return load_images([self.files[i] for i in np.asarray(rows).tolist()], self.size).numpy()


def npz_memmap(path: str | Path, key: str) -> np.memmap:
    """Memory-map member ``key`` of an uncompressed ``.npz`` (``np.savez``, not ``savez_compressed``)."""
    path = Path(path)
    with zipfile.ZipFile(path) as zf:
        try:
            info = zf.getinfo(f"{key}.npy")
        except KeyError:
            found = ", ".join(n[:-4] for n in zf.namelist() if n.endswith(".npy"))
            raise DataError(f"{path} has no {key!r} array (found: {found or 'none'}); {_STORE}") from None
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


def _open_h5(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r", locking=False)
    except OSError as err:
        raise DataError(f"could not read {path}: {one_line(err)}; pass a valid {path.suffix} file") from err


def _h5_member(f: h5py.File, path: Path, key: str) -> h5py.Dataset:
    if not isinstance(f.get(key), h5py.Dataset):
        found = ", ".join(k for k in f if isinstance(f[k], h5py.Dataset))
        raise DataError(f"{path} has no {key!r} array (found: {found or 'none'}); {_STORE}")
    return f[key]


def open_member(path: Path, key: str, whole_compressed: bool) -> np.ndarray | h5py.Dataset:
    """Array ``key`` of a file, opened without reading it where the format allows: an HDF5 dataset (its file
    stays open while referenced), a memory map (``.npy``, uncompressed ``.npz``), or a compressed ``.npz``
    member read whole (``whole_compressed``; else an error naming the fix)."""
    suffix = path.suffix.lower()
    try:
        if suffix in (".h5", ".hdf5"):
            return _h5_member(_open_h5(path), path, key)
        if suffix == ".npy":
            member = path if key == "x" else path.with_name(f"{key}.npy")
            return np.load(member, mmap_mode="r")
        if suffix == ".npz":
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
                stored = f"{key}.npy" in names and zf.getinfo(f"{key}.npy").compress_type == zipfile.ZIP_STORED
            if stored or f"{key}.npy" not in names or not whole_compressed:
                return npz_memmap(path, key)
            with np.load(path, allow_pickle=False) as f:
                return f[key]
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise DataError(f"could not read {path}: {one_line(err)}; pass a valid {suffix} file") from err
    raise DataError(f"{path}: cannot read {suffix} files; use .h5/.hdf5, .npy (x.npy beside y.npy) or .npz")


# ----------------------------------------------------------------------------- splits
@dataclass
class Splits:
    """A dataset's two splits: the source each is read from and the source rows that form it.

    ``train_index``/``test_index`` are increasing int64 rows of ``train``/``test``; both splits may read one
    source (a file without a test split is split here). ``mean``/``std`` are the published statistics of a
    torchvision set, or None (computed from the training images).
    """

    train: Source
    test: Source
    train_index: torch.Tensor
    test_index: torch.Tensor
    num_classes: int
    where: str
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @property
    def y_train(self) -> torch.Tensor:
        """int64 [N]: labels of the training split."""
        return torch.from_numpy(self.train.labels)[self.train_index]

    @property
    def y_test(self) -> torch.Tensor:
        """int64 [M]: labels of the test split."""
        return torch.from_numpy(self.test.labels)[self.test_index]

    def read(self, split: str, rows: torch.Tensor) -> torch.Tensor:
        """Raw images of source rows ``rows`` (increasing) of ``split`` ('train' or 'test')."""
        source = self.train if split == "train" else self.test
        return torch.from_numpy(source.read(rows.numpy()))

    def read_both(self, train_rows: torch.Tensor, test_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw images of both splits, with one channel layout: grey images become RGB when the other split is
        colour (as one folder mixing both is read), and both must share one size."""
        a, b = self.read("train", train_rows), self.read("test", test_rows)
        if len(a) and len(b) and a.dim() == b.dim() == 4 and {a.shape[-1], b.shape[-1]} == {1, 3}:
            a, b = (x.expand(*x.shape[:-1], 3).contiguous() if x.shape[-1] == 1 else x for x in (a, b))
        if len(a) and len(b) and a.shape[1:3] != b.shape[1:3]:
            (h, w), (h0, w0) = b.shape[1:3], a.shape[1:3]
            raise DataError(f"{self.where}: test images are {w}x{h} but training images {w0}x{h0}; all images of a "
                            "dataset must share one size: pass --image-size N to resize and centre-crop them to N x N")
        return a, b


def open_splits(dataset: str, root: Path, seed: int, test_fraction: float, image_size: int = 0
                ) -> tuple[str, Splits]:
    """The dataset's name and its splits (labels read, images not yet).

    Args:
        dataset: a torchvision name (``mnist``, ``fashionmnist``, ``cifar10``, ``cifar100``, any case), a
            ``.npz``/``.h5``/``.hdf5`` file, a folder of ``.npz`` chunks or an image folder; relative paths are
            also tried under ``root``.
        root: folder holding the torchvision datasets.
        seed: seeds the held-out split of a source without a test split.
        test_fraction: share of each class held out as test then.
        image_size: image folders only: shorter side resized to this, centre square cropped (0 = as stored).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction={test_fraction} must be strictly between 0 and 1; pass e.g. 0.2")
    key = dataset.lower().replace("-", "").replace("_", "")
    path = _resolve_path(dataset, root)
    is_folder = key not in _TORCHVISION and path.is_dir() and not any(path.glob("*.npz"))
    if image_size and not is_folder:
        raise ConfigError(f"--image-size {image_size} applies to image folders only, but {dataset!r} is not one; "
                          "drop --image-size (arrays are used at their stored size)")
    if key in _TORCHVISION:
        return key, _torchvision_splits(key, root)
    if path.is_file() and path.suffix.lower() in ARRAY_SUFFIXES:
        return dataset, _array_splits(path, seed, test_fraction)
    if path.is_dir() and any(path.glob("*.npz")):
        return dataset, _chunk_splits(path, seed, test_fraction)
    if path.is_dir():
        return dataset, _folder_splits(path, seed, test_fraction, image_size)
    raise DataError(f"unknown dataset {dataset!r}: not one of {', '.join(available_datasets())} "
                    f"and not an existing file or folder (also tried under {root}); pass one of "
                    f"those names, {FORMS}")


def _resolve_path(dataset: str, root: Path) -> Path:
    """The dataset path as given, else under data_root if it exists there."""
    path = Path(dataset).expanduser()
    if not path.exists() and not path.is_absolute() and (root / path).exists():
        return root / path
    return path


def _torchvision_splits(key: str, root: Path) -> Splits:
    """A torchvision dataset read from root without downloading (its files are loaded whole)."""
    import torchvision  # deferred: heavy, and only the torchvision datasets need it

    spec = _TORCHVISION[key]
    folder = root / spec.folder
    cls = getattr(torchvision.datasets, spec.cls_name)
    try:
        train, test = (cls(root=str(root), train=flag, download=False) for flag in (True, False))
    except (RuntimeError, OSError, ValueError, EOFError, pickle.UnpicklingError) as err:
        if all((folder / f).is_file() for f in spec.files):
            raise DataError(f"could not read {spec.cls_name} from {folder}: {one_line(err)}; the files look "
                            "damaged: replace them with intact copies") from err
        gz = " (found .gz archives: gunzip them first)" if list(folder.glob("*.gz")) else ""
        raise DataError(f"{spec.cls_name} not found under {folder}: expected {', '.join(spec.files)}{gz}; "
                        f"pass --data-root pointing at the folder that holds {spec.folder.split('/')[0]}/ "
                        "(downloads are disabled)") from err
    srcs = [ArraySource(np.asarray(ds.targets), str(folder), array=np.asarray(ds.data))  # uint8 [N,H,W(,3)]
            for ds in (train, test)]
    return Splits(srcs[0], srcs[1], torch.arange(len(srcs[0])), torch.arange(len(srcs[1])), len(train.classes),
                  str(folder), spec.mean, spec.std)


def _members(path: Path) -> list[str]:
    """Names of the arrays a ``.npz`` or HDF5 file holds."""
    try:
        if path.suffix.lower() == ".npz":
            with zipfile.ZipFile(path) as zf:
                return [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
        with _open_h5(path) as f:
            return [k for k in f if isinstance(f[k], h5py.Dataset)]
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise DataError(f"could not read {path}: {one_line(err)}; pass a valid {path.suffix} file") from err


def _split_source(path: Path, key: str, label_key: str, found: list[str]) -> ArraySource:
    """Images ``key`` and labels ``label_key`` of a file as a source: the images' shape and dtype checked, then
    the labels (:func:`_labels`), in that order."""
    if key not in found:
        raise DataError(f"{path} has no {key!r} array (found: {', '.join(found) or 'none'}); {_STORE}")
    src = ArraySource(np.zeros(0, np.int64), str(path), path=path, key=key)
    shape, dtype = src.shape, src.dtype
    if len(shape) not in (3, 4) or (len(shape) == 4 and shape[-1] > 4):
        raise DataError(f"{path}: {key!r} has shape {shape}; expected [N,H,W] or channels-last [N,H,W,C] "
                        "with C <= 4 (transpose [N,C,H,W] arrays with x.transpose(0, 2, 3, 1))")
    if dtype != np.uint8 and not np.issubdtype(dtype, np.floating):
        raise DataError(f"{path}: {key!r} has dtype {dtype}; store uint8 in 0..255 or float in [0, 1]")
    src.labels = _labels(path, label_key, shape[0], found)
    return src


def _labels(path: Path, key: str, n: int, found: list[str]) -> np.ndarray:
    """A validated 1-D integer label array of length n."""
    if key not in found:
        raise DataError(f"{path} has no {key!r} array (found: {', '.join(found) or 'none'}); {_STORE}")
    try:
        y = np.asarray(open_member(path, key, whole_compressed=True)[()])
    except (OSError, ValueError) as err:
        raise DataError(f"could not read {path}: {one_line(err)}; pass a valid {path.suffix} file") from err
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: {key!r} has shape {y.shape} and dtype {y.dtype}; expected integer labels [N]")
    if len(y) != n:
        raise DataError(f"{path}: {key!r} has {len(y)} labels but the images have {n} rows; make them match")
    if n and y.min() < 0:
        raise DataError(f"{path}: {key!r} has negative labels (min {y.min()}); use class ids 0..L-1")
    return y.astype(np.int64)


def _array_splits(path: Path, seed: int, test_fraction: float) -> Splits:
    """Images and labels from a .npz/.h5 file, split per class if it has no x_test/y_test."""
    found = _members(path)
    x = _split_source(path, "x", "y", found)
    if len(x.labels) == 0:
        raise DataError(f"{path}: 'x' and 'y' are empty; store at least one image per class")
    y = torch.from_numpy(x.labels)
    num_classes = check_contiguous(y, path, "y")
    if "x_test" in found or "y_test" in found:
        x_test = _split_source(path, "x_test", "y_test", found)
        if x_test.shape[1:] != x.shape[1:]:
            raise DataError(f"{path}: 'x_test' images have shape {x_test.shape[1:]} but 'x' images "
                            f"{x.shape[1:]}; store both splits at the same size")
        train_index, test_index = torch.arange(len(x.labels)), torch.arange(len(x_test.labels))
    else:
        x_test = x
        train_index, test_index = stratified_split(y, test_fraction, seed, path)
    if len(x_test.labels) and int(x_test.labels.max()) >= num_classes:
        raise DataError(f"{path}: 'y_test' has label {int(x_test.labels.max())} but 'y' only has classes "
                        f"0..{num_classes - 1}; use the same class ids in both splits")
    return Splits(x, x_test, train_index, test_index, num_classes, str(path))


def _chunk_splits(folder: Path, seed: int, test_fraction: float) -> Splits:
    """A folder of ``.npz`` chunks, split per class here; images are read one chunk file at a time."""
    chunks = ChunkSource(folder)
    y = torch.from_numpy(chunks.labels)
    num_classes = check_contiguous(y, folder, "y")
    train_index, test_index = stratified_split(y, test_fraction, seed, folder)
    return Splits(chunks, chunks, train_index, test_index, num_classes, str(folder))


def check_contiguous(y: torch.Tensor, where: Path | str, key: str) -> int:
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


def _folder_splits(root: Path, seed: int, test_fraction: float, image_size: int = 0) -> Splits:
    """An image-folder tree: TinyImageNet, train/ + val|test/, or <class>/ folders (split here)."""
    has_train = (root / "train").is_dir()
    train_dir = root / "train" if has_train else root
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{train_dir} has no class subfolders; use <class>/*.png folders, {FORMS}")
    class_to_idx = {c: i for i, c in enumerate(classes)}
    train_files, y = _class_tree(train_dir, class_to_idx)
    train = FileSource(train_files, y.numpy(), str(root), image_size)
    test_dir = next((d for d in (root / "val", root / "test") if d.is_dir()), None) if has_train else None
    if test_dir is None:  # one labelled tree: hold out a stratified test split
        test = train
        train_index, test_index = stratified_split(y, test_fraction, seed, root)
    else:
        tiny = (test_dir / "val_annotations.txt").is_file()
        test_files, y_test = (_tiny_val if tiny else _class_tree)(test_dir, class_to_idx)
        if not test_files:
            raise DataError(f"{test_dir} holds no labelled images; add <class>/ subfolders (or TinyImageNet's "
                            "val_annotations.txt), or remove it to split the training images instead")
        test = FileSource(test_files, y_test.numpy(), str(root), image_size)
        train_index, test_index = torch.arange(len(y)), torch.arange(len(y_test))
    return Splits(train, test, train_index, test_index, len(classes), str(root))


# ----------------------------------------------------------------------------- subsets
def _class_ranks(y: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded permutation of rows and each permuted row's rank within its class."""
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    order = torch.sort(y[perm], stable=True).indices  # groups classes, keeps permuted order inside
    sorted_labels = y[perm][order]
    counts = torch.bincount(sorted_labels)
    rank = torch.empty_like(perm)
    rank[order] = torch.arange(len(y)) - (torch.cumsum(counts, 0) - counts)[sorted_labels]
    return perm, rank


def stratified_subset(y: torch.Tensor, n: int | None, seed: int, what: str) -> torch.Tensor:
    """Sorted positions of n rows balanced over classes (round-robin over a seeded permutation)."""
    if n is None:
        return torch.arange(len(y))
    if n < 1 or n > len(y):
        raise ConfigError(f"{what}={n} is out of range: {len(y)} rows are available; pass 1..{len(y)} or omit it")
    perm, rank = _class_ranks(y, seed)
    return torch.sort(perm[torch.sort(rank, stable=True).indices[:n]]).values


def stratified_split(y: torch.Tensor, test_fraction: float, seed: int, where: Path) -> tuple[torch.Tensor, ...]:
    """Sorted (train, test) rows; round(test_fraction * n_c) of each class held out, >= 1 left to train."""
    perm, rank = _class_ranks(y, seed)
    counts = torch.bincount(y)
    n_test = torch.minimum(torch.floor(test_fraction * counts + 0.5).long(), counts - 1)
    is_test = rank < n_test[y[perm]]
    if not is_test.any():
        raise DataError(f"{where}: too few samples ({len(y)}) to hold out a test split with test_fraction="
                        f"{test_fraction}; add samples, raise test_fraction, or provide a test split")
    return torch.sort(perm[~is_test]).values, torch.sort(perm[is_test]).values
