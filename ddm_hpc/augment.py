"""Differentiable Siamese Augmentation (DSA; Zhao & Bilen, ICML 2021) for gradient matching (``--augment``).

A *strategy* is a set of parts, written as DSA writes it, joined by ``_`` (``color_crop_cutout_scale_rotate``);
``--augment dsa`` is DSA's strategy for digits (MNIST, SVHN: every part but flip), and
``color_crop_cutout_flip_scale_rotate`` is its strategy for CIFAR and FashionMNIST. The parts and their ranges
(DSA's ``ParamDiffAug``):

  color    brightness: add b ~ U[-0.5, 0.5]; saturation: (x - channel mean) * s + channel mean, s ~ U[0, 2] (a no-op
           on one channel); contrast: (x - image mean) * c + image mean, c ~ U[0.5, 1.5]; in this order
  crop     translate by an integer (dy, dx), each ~ U{-r..r} with r = int(0.125 * side + 0.5), zeros shifted in
  cutout   zero a box of int(0.5 * side + 0.5) pixels per side centred at a uniform pixel (clipped to the image)
  flip     mirror left-right with probability 0.5
  scale    sample at (sx * u, sy * v) in normalised coordinates, sx, sy ~ U[1/1.2, 1.2] independently (DSA's code
           reseeds before each, so its two factors are equal; the paper's per-axis scale is what is drawn here)
  rotate   by an angle ~ U[-15, 15] degrees about the centre

scale and rotate resample through ``F.affine_grid`` + ``F.grid_sample`` (bilinear, zeros outside,
``align_corners=True`` as DSA); crop and cutout are slicing and masking. All of them are differentiable in the
images, so the matching loss backpropagates through the augmentation to the synthetic images. Pixel values are
in the normalised input space (as DSA augments its normalised tensors).

As DSA's default (its ``aug_mode 'S'``), one draw applies *one* part of the strategy, picked uniformly, with its
parameters. The siamese rule of the distill stage: one draw per group per matching step, from that group's own
generator, applied to every real image of the group's sampled minibatch and to every synthetic image of the group
(DSA's "batch mode": one seed per class and step, shared by the real and the synthetic batch). A draw consumes
the same numbers from the generator whatever part it picks, so a group's draws depend on its generator alone.

Room: imports ``config`` (the part names; and ``errors``, ``utils``); the distill stage uses it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ddm_hpc.config import AUGMENT_PARTS

BRIGHTNESS = 1.0  # b ~ (U[0, 1] - 0.5) * BRIGHTNESS
SATURATION = 2.0  # s ~ U[0, 1] * SATURATION
CONTRAST = 0.5  # c ~ U[0, 1] + CONTRAST
CROP_RATIO = 0.125  # largest shift, as a fraction of the side
CUTOUT_RATIO = 0.5  # the box's side, as a fraction of the image's
FLIP_PROB = 0.5
SCALE_RATIO = 1.2  # factors in [1 / ratio, ratio]
ROTATE_DEGREES = 15.0  # angles in [-15, 15] degrees


@dataclass(frozen=True)
class Draw:
    """One sample of augmentation parameters; :func:`apply` applies its ``part`` with them."""

    part: str  # which part of the strategy: one of AUGMENT_PARTS
    brightness: float = 0.0  # added
    saturation: float = 1.0  # factor
    contrast: float = 1.0  # factor
    shift: tuple[int, int] = (0, 0)  # (dy, dx): out[i, j] = x[i + dy, j + dx], 0 outside
    cutout: tuple[int, int] = (0, 0)  # (cy, cx): the centre pixel of the zeroed box
    flip: bool = False
    scale: tuple[float, float] = (1.0, 1.0)  # (sx, sy), along the width and the height
    angle: float = 0.0  # radians


def crop_radius(side: int) -> int:
    return int(side * CROP_RATIO + 0.5)


def cutout_size(side: int) -> int:
    return int(side * CUTOUT_RATIO + 0.5)


def draw(parts: tuple[str, ...], height: int, width: int, gen: torch.Generator) -> Draw:
    """One draw for images of ``height`` x ``width``: a part of ``parts`` and every part's parameters (the same
    amount of ``gen`` consumed whichever part is picked)."""
    unknown = set(parts) - set(AUGMENT_PARTS)
    if not parts or unknown:
        raise ValueError(f"augmentation parts must be among {', '.join(AUGMENT_PARTS)}; got {parts}")
    u = torch.rand(8, generator=gen).tolist()
    ry, rx = crop_radius(height), crop_radius(width)
    ch, cw = cutout_size(height), cutout_size(width)
    randint = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=gen).item())  # noqa: E731
    ints = [randint(-ry, ry + 1), randint(-rx, rx + 1), randint(0, height + (1 - ch % 2)), randint(0, width + (1 - cw % 2))]
    part = parts[randint(0, len(parts))]
    lo = 1.0 / SCALE_RATIO
    return Draw(part=part, brightness=(u[0] - 0.5) * BRIGHTNESS, saturation=u[1] * SATURATION, contrast=u[2] + CONTRAST,
                shift=(ints[0], ints[1]), cutout=(ints[2], ints[3]), flip=u[3] < FLIP_PROB,
                scale=(lo + u[4] * (SCALE_RATIO - lo), lo + u[5] * (SCALE_RATIO - lo)),
                angle=(u[6] - 0.5) * 2.0 * ROTATE_DEGREES * math.pi / 180.0)


def apply(x: torch.Tensor, d: Draw) -> torch.Tensor:
    """``x`` float [n, C, H, W] with draw ``d``'s part applied to every image (differentiable in ``x``)."""
    if d.part == "color":
        return contrast(saturation(brightness(x, d.brightness), d.saturation), d.contrast)
    if d.part == "crop":
        return translate(x, *d.shift)
    if d.part == "cutout":
        return cutout(x, *d.cutout)
    if d.part == "flip":
        return x.flip(3) if d.flip else x
    if d.part == "scale":
        return scale(x, *d.scale)
    if d.part == "rotate":
        return rotate(x, d.angle)
    raise ValueError(f"unknown augmentation part {d.part!r}; known: {', '.join(AUGMENT_PARTS)}")


def brightness(x: torch.Tensor, b: float) -> torch.Tensor:
    return x + b


def saturation(x: torch.Tensor, s: float) -> torch.Tensor:
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * s + mean


def contrast(x: torch.Tensor, c: float) -> torch.Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * c + mean


def translate(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """out[..., i, j] = x[..., i + dy, j + dx], zeros where that falls outside."""
    h, w = x.shape[-2:]
    py, px = abs(dy), abs(dx)
    xp = F.pad(x, (px, px, py, py))
    return xp[..., py + dy:py + dy + h, px + dx:px + dx + w]


def cutout_box(height: int, width: int, cy: int, cx: int) -> tuple[int, int, int, int]:
    """(row0, row1, col0, col1): the zeroed box centred at (cy, cx), clipped to the image (end exclusive)."""
    ch, cw = cutout_size(height), cutout_size(width)
    r0, c0 = cy - ch // 2, cx - cw // 2
    clip = lambda v, n: min(max(v, 0), n)  # noqa: E731
    return clip(r0, height), clip(r0 + ch, height), clip(c0, width), clip(c0 + cw, width)


def cutout(x: torch.Tensor, cy: int, cx: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    r0, r1, c0, c1 = cutout_box(h, w, cy, cx)
    mask = torch.ones(h, w, dtype=x.dtype, device=x.device)
    mask[r0:r1, c0:c1] = 0
    return x * mask


def _affine(x: torch.Tensor, theta: list[list[float]]) -> torch.Tensor:
    t = torch.tensor(theta, dtype=x.dtype, device=x.device).expand(len(x), 2, 3)
    grid = F.affine_grid(t, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def scale(x: torch.Tensor, sx: float, sy: float) -> torch.Tensor:
    """Output pixel at normalised (u, v) reads the input at (sx u, sy v): factors > 1 shrink the content."""
    return _affine(x, [[sx, 0.0, 0.0], [0.0, sy, 0.0]])


def rotate(x: torch.Tensor, angle: float) -> torch.Tensor:
    """Output pixel at normalised (u, v) reads the input at R(angle) (u, v), about the image centre."""
    c, s = math.cos(angle), math.sin(angle)
    return _affine(x, [[c, -s, 0.0], [s, c, 0.0]])


__all__ = ["Draw", "draw", "apply", "brightness", "saturation", "contrast", "translate", "cutout", "cutout_box",
           "scale", "rotate", "crop_radius", "cutout_size"]
