"""A BatchNorm model outside the package (``--model tests/plugins/bn_model.py:factory``): buffers in every stage."""
from __future__ import annotations

from torch import nn


def factory(in_channels: int, num_classes: int, image_size: tuple[int, int], width: int = 8) -> nn.Module:
    """conv3x3 -> BatchNorm -> ReLU -> 2x2 average pool -> Linear."""
    h, w = image_size
    return nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.AvgPool2d(2), nn.Flatten(), nn.Linear(width * (h // 2) * (w // 2), num_classes))
