"""Pixels: raw images to normalised tensors, channel statistics, image files, and the sizes of chunked reads.

Every path that turns stored images into model inputs goes through :func:`to_unit` (uint8 or
float ``[N, H, W(, C)]`` -> float32 ``[N, C, H, W]`` in [0, 1], standard strides) and
:func:`normalize`, and every path that computes a dataset's mean and std goes through
:class:`ChannelStats`, which sums in pieces of :func:`stats_rows` rows: the in-memory load, the
streamed cache and the batch streams therefore give the same bits.

Room: imports ``errors`` and ``utils`` only (the rest of ``ddm_hpc.data`` builds on it).
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ddm_hpc.errors import ConfigError, DataError
from ddm_hpc.utils import one_line

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
CHUNK_BYTES = 32 << 20  # float32 bytes per chunk read while a cache is written or materialised
STATS_BYTES = 16 << 20  # float64 bytes per piece over which channel statistics are summed
# Threads decoding image files (PIL releases the GIL while decoding). On 2 cores they measured 0.76x
# (64x64 JPEGs) to 1.1x (224x224), so machines with fewer than 4 cores decode in one thread.
DECODE_THREADS = min(8, os.cpu_count() or 1) if (os.cpu_count() or 1) >= 4 else 1


def chunk_rows(image_shape: tuple[int, ...]) -> int:
    """Rows per chunk: about :data:`CHUNK_BYTES` of float32 images, and a whole number (at least one)
    of :func:`stats_rows` pieces, so channel statistics add up in the same pieces as in one pass."""
    piece = stats_rows(image_shape)
    return max(1, CHUNK_BYTES // (4 * int(np.prod(image_shape)) * piece)) * piece


def stats_rows(image_shape: tuple[int, ...]) -> int:
    """Rows per piece of the channel statistics: about :data:`STATS_BYTES` in float64, at least one."""
    return max(1, STATS_BYTES // (8 * int(np.prod(image_shape))))


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 / 255; float -> float32 (assumed in [0, 1]); ``[N,H,W(,C)]`` -> contiguous ``[N,C,H,W]``.

    The strides are always the standard ones (a single channel too, which ``contiguous`` would leave
    channels-last): convolutions choose kernels by strides, so every source gives the same bits.
    """
    if x.dim() == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
    return (x.float().div_(255) if x.dtype == torch.uint8 else x.float()).contiguous()


def checked_unit(raw: torch.Tensor, where: str) -> torch.Tensor:
    """:func:`to_unit` of raw source images, with a warning if float images leave [0, 1].

    Raises:
        DataError: NaN or infinite pixels (training on them diverges, and the message would blame the lr).
    """
    if raw.dtype.is_floating_point and raw.numel():
        bad = ~torch.isfinite(raw)
        if bad.any():
            rows = torch.nonzero(bad.reshape(len(raw), -1).any(1))[:, 0]
            raise DataError(f"{where}: {int(bad.sum())} NaN/inf pixel value(s) in {len(rows)} image(s) (first rows "
                            f"{rows[:5].tolist()}): clean or drop those images")
    if raw.dtype != torch.uint8 and raw.numel() and (raw.min() < 0 or raw.max() > 1):
        logger.warning("%s: float images span [%g, %g], not [0, 1]; using them as is", where, raw.min(), raw.max())
    return to_unit(raw)


def channel_views(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[torch.Tensor, ...]:
    """Mean and std as ``[C, 1, 1]`` tensors matching x's dtype and device."""
    if x.dim() < 3 or not len(mean) == len(std) == x.shape[-3]:
        raise ConfigError(f"normalisation stats have {len(mean)}/{len(std)} channels but images have shape "
                          f"{tuple(x.shape)}; pass [..., C, H, W] images and one mean/std per channel")
    return tuple(torch.tensor(v, dtype=x.dtype, device=x.device).view(-1, 1, 1) for v in (mean, std))


def normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Map images in [0, 1] to normalised values: ``(x - mean) / std`` per channel.

    Args:
        x: float ``[..., C, H, W]`` in [0, 1].
        mean: per-channel means, length C (e.g. ``bundle.mean``); std likewise.

    Returns:
        Normalised images, same shape and dtype as ``x``.
    """
    m, s = channel_views(x, mean, std)
    return (x - m) / s


def denormalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Inverse of :func:`normalize`: ``x * std + mean`` (clamp to [0, 1] before saving PNGs).

    Args:
        x: float ``[..., C, H, W]`` normalised images.
        mean: per-channel means, length C (e.g. ``bundle.mean``); std likewise.

    Returns:
        Images on the [0, 1] scale, same shape and dtype as ``x``.
    """
    m, s = channel_views(x, mean, std)
    return x * s + m


class ChannelStats:
    """Per-channel sums of images in [0, 1], accumulated in float64 over pieces of :func:`stats_rows` rows.

    Feeding the same rows in the same order gives the same bits whether they arrive at once or
    in chunks whose sizes are multiples of the piece, so a cache built chunk by chunk normalises
    exactly like :func:`ddm_hpc.data.load_dataset`.
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

    def widen(self, channels: int) -> None:
        """Repeat single-channel sums over ``channels`` (grey images widened to RGB have the grey sums per channel)."""
        if self.total is not None:
            self.total, self.squares = self.total.repeat(channels), self.squares.repeat(channels)

    def result(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) per channel, std floored at 1e-6."""
        mean = self.total / self.count
        std = (self.squares / self.count - mean * mean).clamp_min(0).sqrt().clamp_min(1e-6)
        return tuple(mean.tolist()), tuple(std.tolist())


def channel_stats_of(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (floored at 1e-6) of float ``[N, C, H, W]``, accumulated in float64."""
    stats = ChannelStats()
    stats.add(x)
    return stats.result()


def decode(f: Path, size: int = 0) -> np.ndarray:
    """One image file as uint8 ``[H, W]`` (mode 'L') or ``[H, W, 3]``; with ``size``, its shorter side
    resized to ``size`` (bilinear) and the centre ``size`` x ``size`` square cropped."""
    from PIL import Image  # deferred: only image folders need PIL

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
        raise DataError(f"could not read image {f}: {one_line(err)}; replace or remove the file") from err


def load_images(files: list[Path], size: int = 0) -> torch.Tensor:
    """uint8 ``[N, H, W, C]`` from image files: grayscale if all are mode 'L', else RGB; sizes must agree
    unless ``size`` resizes them (:func:`decode`).

    Files are decoded by :data:`DECODE_THREADS` threads when there are many (same result, in order).
    """
    if len(files) >= 64 and DECODE_THREADS > 1:
        with ThreadPoolExecutor(DECODE_THREADS) as pool:
            arrays = list(pool.map(decode, files, [size] * len(files)))
    else:
        arrays = [decode(f, size) for f in files]
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
