"""A dataset held in memory: :class:`DatasetBundle` and :func:`load_dataset`.

Room: imports ``data.images`` and ``data.sources``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ddm_hpc.data.images import channel_stats_of, checked_unit, normalize
from ddm_hpc.data.sources import open_splits, stratified_subset

if TYPE_CHECKING:
    from ddm_hpc.data.cache import MappedImages

logger = logging.getLogger(__name__)


@dataclass
class DatasetBundle:
    """A loaded dataset, ready for training.

    Attributes:
        name: ``"mnist"`` etc., or the file/folder path as given.
        x_train: float32 ``[N, C, H, W]``, normalised with ``mean``/``std`` (a tensor, or
            :class:`~ddm_hpc.data.cache.MappedImages` read on demand from the ``--data-cache mmap`` cache).
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
    x_train: torch.Tensor | MappedImages
    y_train: torch.Tensor
    x_test: torch.Tensor | MappedImages
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
    name, splits = open_splits(dataset, Path(data_root), seed, test_fraction, image_size)
    y_train, y_test = splits.y_train, splits.y_test
    train_rows = stratified_subset(y_train, n_train, seed, "n_train")
    test_rows = stratified_subset(y_test, n_test, seed, "n_test")
    train_index, test_index = splits.train_index[train_rows], splits.test_index[test_rows]
    x_train, x_test = (checked_unit(raw, splits.where) for raw in splits.read_both(train_index, test_index))
    mean, std = (splits.mean, splits.std) if splits.mean is not None else channel_stats_of(x_train)
    bundle = DatasetBundle(
        name=name, x_train=normalize(x_train, mean, std), x_test=normalize(x_test, mean, std),
        y_train=y_train[train_rows], y_test=y_test[test_rows],
        train_index=train_index, test_index=test_index, num_classes=splits.num_classes, mean=mean, std=std)
    logger.info("loaded %s: %d train / %d test images of shape %s, %d classes", name, len(train_index),
                len(test_index), bundle.image_shape, bundle.num_classes)
    return bundle
