"""Pixel-exact image grids and atomic PNG writes, shared by the ``pictures`` and ``privacy`` diagnostics.

Room: a leaf of ``diagnose`` (imports nothing of ddm_hpc). PIL is imported where a PNG is written
(deferred: only pictures need it).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch


def to_uint8(x: np.ndarray | torch.Tensor) -> np.ndarray:
    """Pixel values in [0, 1] -> uint8 ``floor(clip(x, 0, 1) * 255 + 0.5)``, same shape."""
    x = x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float64)
    return np.floor(np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def image_grid(images: np.ndarray | torch.Tensor, ncol: int, pad: int = 2, pad_value: float = 1.0, scale: int = 1,
               rgb: bool = False) -> np.ndarray:
    """Tile images row-major into one picture, deterministically (nearest-neighbour up-scaling only).

    Image ``i`` goes to grid row ``i // ncol``, column ``i % ncol``; its top-left pixel sits at
    (``pad + row * (H * scale + pad)``, ``pad + col * (W * scale + pad)``). Every pixel is repeated
    ``scale`` x ``scale`` times. Padding, empty cells after the last image and NaN pixels (a blank
    cell) have the value ``pad_value``.

    Args:
        images: float [N, C, H, W] on the [0, 1] scale (clipped), N >= 1, C = 1 (grey) or 3 (RGB).
        ncol: cells per row (>= 1); rows = ceil(N / ncol).
        rgb: replicate grey images to three channels.

    Returns:
        uint8 [rows * (H * scale + pad) + pad, ncol * (W * scale + pad) + pad, C (3 if rgb)], values
        :func:`to_uint8` of the pixels.
    """
    x = images.detach().cpu().double().numpy() if isinstance(images, torch.Tensor) else np.asarray(images, np.float64)
    if x.ndim != 4 or x.shape[0] == 0 or x.shape[1] not in (1, 3):
        raise ValueError(f"image_grid: expected [N>=1, C in (1, 3), H, W] images, got shape {x.shape}")
    if ncol < 1 or pad < 0 or scale < 1:
        raise ValueError(f"image_grid: need ncol >= 1, scale >= 1 and pad >= 0, got {ncol}, {scale}, {pad}")
    x = np.nan_to_num(x, nan=pad_value)
    if rgb and x.shape[1] == 1:
        x = np.repeat(x, 3, axis=1)
    arr = to_uint8(x).repeat(scale, axis=2).repeat(scale, axis=3).transpose(0, 2, 3, 1)  # [N, h, w, C]
    n, hs, ws, c = arr.shape
    rows = math.ceil(n / ncol)
    out = np.full((rows * (hs + pad) + pad, ncol * (ws + pad) + pad, c), to_uint8(np.float64(pad_value)), np.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        y0, x0 = pad + r * (hs + pad), pad + q * (ws + pad)
        out[y0:y0 + hs, x0:x0 + ws] = arr[i]
    return out


def write_png(array: np.ndarray, path: str | Path) -> Path:
    """Write uint8 [H, W], [H, W, 1] or [H, W, 3] as a PNG: temp file beside ``path``, then rename."""
    from PIL import Image  # deferred: see the module docstring

    path = Path(path)
    arr = np.asarray(array)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3)):
        raise ValueError(f"write_png: expected uint8 [H, W], [H, W, 1] or [H, W, 3], got {arr.dtype} {arr.shape}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}.png")
    try:
        Image.fromarray(arr).save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
