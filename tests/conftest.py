"""Shared fixtures: where the real MNIST lives, and GPU skipping."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Reproducible cuBLAS on a GPU (utils.configure_cuda sets it too, but it must be there before the first cuBLAS
# call of the process, which a test may make before any device is resolved)
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
# No progress lines in the tests' captured (non-terminal) output; tests of the display set it themselves
os.environ.setdefault("DDM_PROGRESS", "0")

REPO = Path(__file__).resolve().parents[1]
# The project's data sits beside the repo (../shared/data); DDM_DATA_ROOT overrides.
DATA_ROOT = Path(os.environ.get("DDM_DATA_ROOT", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    """Folder holding MNIST/raw (fails loudly if the shared data is missing)."""
    if not (DATA_ROOT / "MNIST" / "raw").is_dir():
        pytest.fail(f"real MNIST not found under {DATA_ROOT}/MNIST/raw; set DDM_DATA_ROOT to the folder holding MNIST/")
    return DATA_ROOT


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        # the marker, not ``"gpu" in item.keywords``: keywords hold every parent node's name too, so a
        # checkout in a folder named gpu would skip every test
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
