"""The streamed, memory-mapped dataset cache (``--data-cache mmap``): :func:`mapped_dataset` and :class:`MappedImages`.

The first load streams the source (``data.sources``) chunk by chunk into raw channels-last arrays
under ``cache_root/<key>/``; every load then maps them and normalises only the rows it reads. The
bundle it returns equals :func:`~ddm_hpc.data.load_dataset`'s bit for bit.

Room: imports ``data.bundle``, ``data.images`` and ``data.sources`` (and ``utils`` for progress bars).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from ddm_hpc.data import images
from ddm_hpc.data.bundle import DatasetBundle
from ddm_hpc.data.images import ChannelStats, channel_views, checked_unit, to_unit
from ddm_hpc.data.sources import Splits, open_splits, stratified_subset
from ddm_hpc.errors import DataError
from ddm_hpc.utils import progress

logger = logging.getLogger(__name__)

CACHE_FORMAT = 2  # raw channels-last images, normalised when read
_SMALL = ("y_train", "y_test", "train_index", "test_index")


class MappedImages:
    """Normalised float32 images ``[N, C, H, W]`` read on demand from a memory-mapped ``.npy``.

    The file holds the raw images channels-last, ``[N, H, W, C]`` uint8 (or float32 in [0, 1]),
    a quarter of the normalised size for uint8. Indexing with an int, a slice, or an index or
    bool tensor/array reads only those rows and returns ``normalize(to_unit(raw))`` of them:
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
        x = to_unit(raw if device is None else raw.to(device, non_blocking=True))
        m, s = channel_views(x, self.mean, self.std)
        return x.sub_(m).div_(s)  # normalize() in place: the same operations, one buffer fewer

    def to(self, device: torch.device | str, non_blocking: bool = False) -> torch.Tensor:
        """Every row, normalised, as one tensor on ``device`` (filled ``images.chunk_rows`` rows at a time)."""
        out = torch.empty(self.shape, dtype=self.dtype, device=device)
        step = images.chunk_rows(self.shape[1:])
        for a in range(0, len(self), step):
            out[a:a + step] = self[a:a + step].to(device, non_blocking=non_blocking)
        return out


def dense(x: torch.Tensor | MappedImages) -> torch.Tensor:
    """``x`` as an ordinary host tensor (a :class:`MappedImages` is read whole), for code that needs one."""
    return x.to("cpu") if isinstance(x, MappedImages) else x


def mapped_dataset(dataset: str, data_root: str | Path, cache_root: str | Path, n_train: int | None = None,
                   n_test: int | None = None, seed: int = 0, test_fraction: float = 0.2, image_size: int = 0,
                   show_progress: bool = False) -> DatasetBundle:
    """:func:`~ddm_hpc.data.load_dataset` streamed through a cache under ``cache_root/<key>/``; images are
    :class:`MappedImages`.

    The first call reads the source :func:`~ddm_hpc.data.images.chunk_rows` rows at a time (HDF5 hyperslabs, memory
    maps, image files) and writes the selected rows' raw images to ``x_train.npy`` / ``x_test.npy``
    (uint8 stays uint8), the labels and indices, and the mean/std, which for files and folders is
    accumulated chunk by chunk exactly as ``load_dataset`` computes it. Each file goes through
    a temp file and ``meta.json`` comes last, so a cache is complete or absent. No call ever holds
    the dataset: later calls (other stages, ``--workers`` processes, SLURM tasks) map the files and
    share the OS page cache. The bundle's tensors equal ``load_dataset``'s bit for bit. The key
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
    name, source = open_splits(args["dataset"], Path(args["data_root"]), args["seed"], args["test_fraction"],
                               args["image_size"])
    y_train, y_test = source.y_train, source.y_test
    train_rows = stratified_subset(y_train, args["n_train"], args["seed"], "n_train")
    test_rows = stratified_subset(y_test, args["n_test"], args["seed"], "n_test")
    small = {"y_train": y_train[train_rows], "y_test": y_test[test_rows],
             "train_index": source.train_index[train_rows], "test_index": source.test_index[test_rows]}
    folder.mkdir(parents=True, exist_ok=True)
    tag = f".tmp.{os.getpid()}"
    stats = None if source.mean is not None else ChannelStats()
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


def _write_images(path: Path, source: Splits, index: torch.Tensor, which: int, stats: ChannelStats | None,
                  show_progress: bool) -> int:
    """Raw images of ``index`` in split ``which`` (0 train, 1 test), channels-last, to a ``.npy`` at ``path``;
    returns their channel count."""
    if len(index) == 0:
        raise DataError(f"{source.where}: a split selected no rows; pass a larger n_train/n_test")

    def read(rows: torch.Tensor) -> torch.Tensor:
        return source.read("train" if which == 0 else "test", rows)

    fh, shape, dtype = None, None, None
    step = images.chunk_rows(read(index[:1]).shape[1:])
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
                unit = checked_unit(raw, source.where)
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


def _widen(path: Path, shape: tuple[int, ...], written: int, stats: ChannelStats | None) -> BinaryIO:
    """Rewrite the first ``written`` single-channel rows of ``path`` as RGB (grayscale repeated), as
    :func:`~ddm_hpc.data.images.load_images` does for a folder that mixes both; returns the file open for
    the next rows."""
    with open(path, "rb") as f:  # the file is shorter than its header says: map only the rows written
        np.lib.format.read_magic(f)
        _, _, dtype = np.lib.format.read_array_header_2_0(f)
        offset = f.tell()
    old = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(written, *shape[1:-1], 1))
    wide_path = path.with_name(path.name + ".rgb")
    fh = _open_npy(wide_path, shape, dtype)
    step = images.chunk_rows(shape[1:])
    for a in range(0, written, step):
        np.repeat(np.asarray(old[a:min(a + step, written)]), 3, axis=-1).tofile(fh)
    del old
    os.replace(wide_path, path)
    if stats is not None:
        stats.widen(3)
    return fh
