"""A model factory outside the package, named on the command line as ``--model tests/plugins/toy_model.py:factory``.

With ``DDM_TOY_MODEL_PIDS`` set to a file, every process that builds the model appends its pid there, so a test
can tell that worker processes imported this file and built it themselves.
"""
from __future__ import annotations

import os

from torch import nn


def factory(in_channels: int, num_classes: int, image_size: tuple[int, int], width: int = 8) -> nn.Module:
    """conv3x3 -> instance norm -> ReLU -> 2x2 average pool -> Linear (buffer-free)."""
    record = os.environ.get("DDM_TOY_MODEL_PIDS")
    if record:
        with open(record, "a") as f:
            f.write(f"{os.getpid()}\n")
    return nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.GroupNorm(width, width), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * width, num_classes))


def not_a_model(in_channels: int, num_classes: int, image_size: tuple[int, int], width: int = 8) -> object:
    """A factory that returns something else: ``--model`` must refuse it in one line."""
    return "a string"
