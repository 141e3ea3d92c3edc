"""The run context: a run directory with its config, its data (loaded on first use) and its device.

Every consumer of a finished (or finishing) run takes a :class:`RunContext`: the attribution
methods of ``evaluate``, the ``diagnose`` tasks, the benchmarks. Each thing it reads is read once,
when first asked for: the dataset (:func:`load_data`), the attribute stage's queries
(``attribution.h5``), the clusters (``clusters.h5``), the trajectory (``train.h5``).

Room: imports ``config``, ``data``, ``models``, ``storage`` and ``trajectory``; the stage modules,
methods and diagnostics import it.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ddm_hpc.config import Config
from ddm_hpc.data import DatasetBundle, load_dataset, mapped_dataset
from ddm_hpc.models import build_target
from ddm_hpc.storage import artifact_path, open_read
from ddm_hpc.trajectory import TrajectoryReader


def load_data(cfg: Config) -> DatasetBundle:
    """The run's dataset: loaded into memory, or streamed into the run's cache and memory-mapped from it
    (``--data-cache mmap``)."""
    d = cfg.data
    if cfg.runtime.data_cache == "mmap":
        return mapped_dataset(d.dataset, d.data_root, Path(cfg.runtime.out) / ".data", n_train=d.train_size,
                              n_test=d.test_size, seed=cfg.seed, image_size=d.image_size,
                              show_progress=cfg.runtime.progress)
    return load_dataset(d.dataset, d.data_root, n_train=d.train_size, n_test=d.test_size, seed=cfg.seed,
                        image_size=d.image_size)


class RunContext:
    """A run directory and what its consumers read from it, each read once on first use.

    Args:
        cfg: the run's config (``cfg.runtime.out`` is the run directory).
        bundle: the dataset if already loaded (else :func:`load_data` on first use).
        device: where to compute (default ``cfg.runtime.torch_device()``).
    """

    def __init__(self, cfg: Config, bundle: DatasetBundle | None = None, device: torch.device | None = None):
        self.cfg = cfg
        self._bundle = bundle
        self.device = device if device is not None else cfg.runtime.torch_device()

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.runtime.out)

    @property
    def bundle(self) -> DatasetBundle:
        if self._bundle is None:
            self._bundle = load_data(self.cfg)
        return self._bundle

    @property
    def show_progress(self) -> bool:
        return self.cfg.runtime.progress

    # ------------------------------------------------------------------ the attribute stage's queries
    @functools.cached_property
    def queries(self) -> dict[str, np.ndarray]:
        """The attribute stage's queries: ``query_position`` (rows of the test subset), ``query_index`` (test-split
        indices), ``query_label`` and ``base_probs`` (softmax of theta_tau)."""
        with open_read(artifact_path(self.run_dir, "attribute")) as f:
            return {k: f[k][()] for k in ("query_position", "query_index", "query_label", "base_probs")}

    @property
    def query_pos(self) -> torch.Tensor:
        """int64 [Q]: the queries' positions in the test subset."""
        return torch.from_numpy(self.queries["query_position"]).long()

    @property
    def query_x(self) -> torch.Tensor:
        """float32 [Q, C, H, W]: the query images."""
        return self.bundle.x_test[self.query_pos]

    @property
    def query_y(self) -> torch.Tensor:
        """int64 [Q]: the queries' true labels."""
        return torch.from_numpy(self.queries["query_label"]).long()

    # ------------------------------------------------------------------ the clusters
    @functools.cached_property
    def _clusters(self) -> tuple[torch.Tensor, torch.Tensor]:
        with open_read(artifact_path(self.run_dir, "cluster")) as f:
            return (torch.from_numpy(f["clusters/assignment"][()]).long(),
                    torch.from_numpy(f["clusters/class"][()]).long())

    @property
    def assignment(self) -> torch.Tensor:
        """int64 [N]: the cluster of every training row."""
        return self._clusters[0]

    @property
    def cluster_class(self) -> torch.Tensor:
        """int64 [K]: the class of every cluster."""
        return self._clusters[1]

    @property
    def k(self) -> int:
        """K, the number of clusters."""
        return len(self.cluster_class)

    # ------------------------------------------------------------------ the trajectory and the model
    def trajectory(self, device: torch.device | str = "cpu") -> TrajectoryReader:
        """A reader of the run's ``train.h5`` (rows placed on ``device``)."""
        return TrajectoryReader.of_run(self.run_dir, device)

    def build_model(self, seed: int | None = None) -> nn.Module:
        """The target architecture at its initialisation theta_0 (seed ``cfg.seed`` unless given), on the CPU."""
        return build_target(self.cfg, self.bundle, seed)

    def trained_model(self) -> nn.Module:
        """theta_tau loaded into the target architecture, in eval mode on the device."""
        reader = self.trajectory()
        return reader.load(self.build_model(), reader.tau).to(self.device).eval()


__all__ = ["RunContext", "load_data"]
