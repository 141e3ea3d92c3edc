"""Datasets as normalised tensors: torchvision sets, ``.npz``/``.h5`` arrays, ``.npz`` chunk folders, image folders.

Two entry points give the same :class:`DatasetBundle` (bit for bit): float32 ``[N, C, H, W]``
images normalised per channel, int64 labels, and the index of every row in its source split (so
attribution scores can be traced back to source images). :func:`load_dataset` holds the images
in memory; :func:`mapped_dataset` streams the source into a raw cache once and maps it
(:class:`MappedImages`, ``--data-cache mmap``). Nothing is ever downloaded. Example::

    bundle = load_dataset("mnist", data_root="../shared/data", n_train=1000, seed=0)

Rooms, bottom up (each imports only those above it; the package nothing of ddm_hpc but ``errors`` and
``utils``):
  ``images``   raw pixels to normalised tensors, channel statistics, image files, chunk sizes
  ``sources``  one class per storage format (labels up front, ``read(rows)``), the two splits of a dataset
  ``bundle``   :class:`DatasetBundle` and :func:`load_dataset` (in memory)
  ``stream``   batch streams over a source (:func:`open_stream`, :func:`stream_loader`)
  ``cache``    the memory-mapped cache (:func:`mapped_dataset`, :class:`MappedImages`, :func:`dense`)
  ``batches``  the one minibatch reader (:class:`MinibatchReader`: resident or mapped, in-process or workers)
"""
from ddm_hpc.data.batches import MinibatchReader, resident_on
from ddm_hpc.data.bundle import DatasetBundle, load_dataset
from ddm_hpc.data.cache import MappedImages, dense, mapped_dataset
from ddm_hpc.data.images import denormalize, normalize
from ddm_hpc.data.sources import available_datasets
from ddm_hpc.data.stream import StreamDataset, TensorStream, class_order, open_stream, stream_loader

__all__ = ["DatasetBundle", "load_dataset", "mapped_dataset", "MappedImages", "dense", "normalize", "denormalize",
           "available_datasets", "StreamDataset", "TensorStream", "open_stream", "stream_loader", "class_order",
           "MinibatchReader", "resident_on"]
