"""Per-sample features for clustering, written to HDF5 chunk by chunk and read back class by class.

At ImageNet scale the penultimate features of the training set (1.28 M x 512 float32 = 2.6 GB)
should never sit in host memory at once. :func:`extract_features` streams the dataset in
class-sorted order through the extractor and appends each batch's features to an HDF5 file,
so every class is one contiguous slice of the file. :class:`FeatureFile` then hands the
clustering stage one class at a time (or fixed-size chunks for a global k-means).

Feature file layout (``features.h5``)::

  features     float32 [N, D]   class-major: rows of class c are class_offset[c]:class_offset[c+1]
  rows         int64   [N]      source row (dataset index) of each feature row, increasing within a class
  labels       int64   [N]      class of each feature row (non-decreasing)
  class_offset int64   [L + 1]
  attrs: n, dim, num_classes, extractor, complete

Room: imports ``data``, ``models`` and ``storage``; the cluster stage uses it.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import nn

from ddm_hpc.data import StreamDataset, class_order, stream_loader
from ddm_hpc.errors import DataError, StageError
from ddm_hpc.models import penultimate_features
from ddm_hpc.storage import atomic_h5, create_dataset
from ddm_hpc.utils import progress

log = logging.getLogger(__name__)

# HDF5 chunk of ~1 MiB (512 rows of 512 float32 features): fits h5py's default 1 MiB chunk cache, and
# a class read touches at most ~1 MiB beyond its rows (4 MiB chunks measured 11 MB of read buffers).
CHUNK_BYTES = 1 << 20
IN_MEMORY_BYTES = 1 << 28  # feature files up to 256 MiB are built in memory (storage.atomic_h5)


def chunk_rows(dim: int, n: int) -> int:
    """Rows per HDF5 chunk of a float32 [n, dim] dataset (~CHUNK_BYTES, at least 1, at most n)."""
    return int(max(1, min(n, CHUNK_BYTES // max(4 * dim, 1))))


def class_offsets(sorted_labels: np.ndarray, num_classes: int) -> np.ndarray:
    """int64 [L + 1] start of each class in non-decreasing labels."""
    return np.concatenate([[0], np.cumsum(np.bincount(sorted_labels, minlength=num_classes))]).astype(np.int64)


def write_feature_file(path: str | Path, labels: np.ndarray, dim: int, chunks: Iterable[tuple[np.ndarray, np.ndarray]],
                       num_classes: int | None = None, extractor: str = "", show_progress: bool = False) -> Path:
    """Write a feature file atomically from a stream of class-sorted chunks.

    Args:
        path: destination ``.h5`` (written to a temp file, renamed when complete).
        labels: int64 [N] label of every *source* row (the file is ordered by ``class_order(labels)``).
        dim: feature dimension D.
        chunks: yields ``(rows int64 [b], features float32 [b, D])`` covering ``class_order(labels)``
            in order; only one chunk is held at a time.
        num_classes: L (default: max label + 1).

    Returns:
        ``path``.
    """
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    order = class_order(labels)
    with atomic_h5(path, in_memory=n * dim * 4 <= IN_MEMORY_BYTES) as f:  # a large one is streamed to disk
        feats = create_dataset(f, "features", shape=(n, dim), dtype=np.float32, chunks=(chunk_rows(dim, n), dim))
        create_dataset(f, "rows", data=order)
        create_dataset(f, "labels", data=labels[order])
        create_dataset(f, "class_offset", data=class_offsets(labels[order], num_classes))
        pos = 0
        for rows, x in progress(chunks, "features", show_progress, total=None):
            b = len(rows)
            if not np.array_equal(np.asarray(rows), order[pos:pos + b]):
                raise StageError(f"feature chunk at row {pos} is out of class order; iterate class_order(labels)")
            if x.shape != (b, dim):
                raise StageError(f"feature chunk has shape {x.shape}, expected ({b}, {dim})")
            feats[pos:pos + b] = np.asarray(x, dtype=np.float32)
            pos += b
        if pos != n:
            raise StageError(f"feature stream ended after {pos} of {n} rows; the dataset changed while reading")
        f.attrs.update({"n": n, "dim": dim, "num_classes": num_classes, "extractor": extractor})
    return Path(path)


@torch.no_grad()
def extract_features(ds: StreamDataset, extractor: nn.Module | None, path: str | Path, device: torch.device,
                     batch_size: int = 512, num_workers: int = 0, penultimate: bool = True,
                     show_progress: bool = True) -> Path:
    """Stream ``ds`` in class order through ``extractor`` and write its features to ``path``.

    Args:
        ds: any :class:`StreamDataset` (``TensorStream`` for an in-memory bundle).
        extractor: the model whose penultimate layer (or output, ``penultimate=False``) gives the
            features; None = flattened normalised pixels.
        path: the feature file (see the module docstring), written atomically.
        device: where the extractor runs; batches are pinned and copied asynchronously on CUDA.
        batch_size, num_workers: DataLoader batch and worker processes.

    Returns:
        ``path``. Host memory holds O(num_workers x batch_size) images and one batch of features.
    """
    if extractor is not None:
        extractor.to(device).eval()
    cuda = device.type == "cuda"
    loader = stream_loader(ds, class_order(ds.labels), batch_size, num_workers, pin_memory=cuda)

    def features() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for x, _, rows in loader:
            if extractor is None:
                f = x.reshape(len(x), -1)
            else:
                xb = x.to(device, non_blocking=cuda)
                f = penultimate_features(extractor, xb) if penultimate else extractor(xb)
                f = f.reshape(len(x), -1).float().cpu()
            yield rows.numpy(), f.numpy()

    it = features()
    try:
        first = next(it)
    except StopIteration:
        raise DataError(f"{ds.where} yielded no images; check the dataset") from None
    dim = first[1].shape[1]

    def chained() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        yield first
        yield from it

    name = "pixels" if extractor is None else type(extractor).__name__ + (".penultimate" if penultimate else "")
    bar = progress(chained(), "extract features", show_progress, total=len(loader))
    return write_feature_file(path, ds.labels, dim, bar, ds.num_classes, name)


class FeatureFile:
    """Read access to a feature file, one class or one chunk at a time.

    Attributes:
        n, dim, num_classes: N, D, L.
        rows: int64 [N] source row of each feature row; labels: int64 [N]; class_offset: int64 [L + 1].
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._f = h5py.File(self.path, "r", locking=False)
        except OSError as err:
            raise StageError(f"cannot open feature file {self.path} ({err}); re-run feature extraction") from None
        if not self._f.attrs.get("complete") or "features" not in self._f:
            self._f.close()
            raise StageError(f"{self.path} is not a complete feature file; re-run feature extraction")
        self.features = self._f["features"]
        self.n, self.dim = (int(v) for v in self.features.shape)
        self.rows = self._f["rows"][()]
        self.labels = self._f["labels"][()]
        self.class_offset = self._f["class_offset"][()]
        self.num_classes = len(self.class_offset) - 1

    @property
    def nbytes(self) -> int:
        """Bytes of the feature matrix (N x D x 4)."""
        return self.n * self.dim * 4

    def class_slice(self, c: int) -> slice:
        """Feature rows of class c."""
        return slice(int(self.class_offset[c]), int(self.class_offset[c + 1]))

    def class_features(self, c: int) -> np.ndarray:
        """float32 [n_c, D]: the features of class c (one contiguous read)."""
        return self.features[self.class_slice(c)]

    @property
    def read_rows(self) -> int:
        """Rows per sequential read: 64 HDF5 chunks (64 MiB) but at most ~1/16 of the file, >= 1 chunk."""
        c = chunk_rows(self.dim, self.n)
        return max(c, min(64 * c, self.n // 16))

    def chunks(self, rows_per_chunk: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (start, float32 [b, D]) over the whole file in file order."""
        step = rows_per_chunk or self.read_rows
        for a in range(0, self.n, step):
            yield a, self.features[a:a + step]

    def take(self, positions: np.ndarray, rows_per_chunk: int | None = None) -> np.ndarray:
        """float32 [len(positions), D]: file rows at sorted ``positions``, read chunk by chunk."""
        positions = np.asarray(positions, dtype=np.int64)
        out = np.empty((len(positions), self.dim), dtype=np.float32)
        step = rows_per_chunk or self.read_rows
        lo = 0
        for a in range(0, self.n, step):
            hi = int(np.searchsorted(positions, a + step))
            if hi > lo:
                out[lo:hi] = self.features[a:a + step][positions[lo:hi] - a]
            lo = hi
        return out

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> FeatureFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
