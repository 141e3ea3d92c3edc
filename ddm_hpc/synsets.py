"""The distilled synsets as later stages read them: one level (``cluster`` or ``class``) of ``synsets.h5``.

Room: imports ``storage`` (the distill stage writes the file; attribute, unlearning, evaluate and
diagnose read it through here).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ddm_hpc.errors import ConfigError, StageError
from ddm_hpc.storage import artifact_path, open_read


@dataclass
class SynsetLevel:
    """One level of ``synsets.h5`` as the attribute stage uses it."""

    images: torch.Tensor  # float32 [G, ipc, C, H, W]
    labels: torch.Tensor  # int64 [G, ipc]
    group_class: torch.Tensor  # int64 [G]
    grad_norm_real: torch.Tensor  # float32 [G]
    grad_norm_syn: torch.Tensor  # float32 [G]
    size: torch.Tensor  # int64 [G]
    unlearn_direction: float  # +1 descent (ddm), -1 ascent (ddm-match)
    targets: torch.Tensor | None = None  # float32 [G, ipc, L] learned soft labels (None: train on ``labels``)
    # float32 [G, n_tensors] (--layer-rates), columns ``rate_names``: the fine-tune rates, each tensor's column
    # times synsets.h5's ``contraction`` factor where --contraction fitted one
    layer_rates: torch.Tensor | None = None
    rate_names: tuple[str, ...] = ()  # the parameter tensors of the rates' columns

    @property
    def train_targets(self) -> torch.Tensor:
        """What fine-tuning trains on: the soft labels if learned, else the hard labels."""
        return self.labels if self.targets is None else self.targets

    def flat_targets(self) -> torch.Tensor:
        """``train_targets`` with groups and images flattened: int64 [G*ipc] or float32 [G*ipc, L]."""
        t = self.train_targets
        return t.reshape(-1) if t.dim() == 2 else t.reshape(-1, t.shape[-1])

    def subset(self, ids: torch.Tensor) -> SynsetLevel:
        return SynsetLevel(self.images[ids], self.labels[ids], self.group_class[ids], self.grad_norm_real[ids],
                           self.grad_norm_syn[ids], self.size[ids], self.unlearn_direction,
                           None if self.targets is None else self.targets[ids],
                           None if self.layer_rates is None else self.layer_rates[ids], self.rate_names)


def _rates(f, g) -> torch.Tensor | None:
    """A level's fine-tune rates: ``layer_rates`` scaled per tensor by the file's ``contraction`` factors if any."""
    if "layer_rates" not in g:
        return None
    rates = torch.from_numpy(g["layer_rates"][()])
    return rates * torch.from_numpy(f["contraction"][()])[None] if "contraction" in f else rates


def read_synsets(run_dir: str | Path, level: str) -> SynsetLevel:
    """Read one level (``cluster`` or ``class``) of ``synsets.h5``."""
    with open_read(artifact_path(run_dir, "distill")) as f:
        if level not in f:
            raise ConfigError(f"synsets.h5 has no {level!r} synsets: re-run distill with --levels cluster,class")
        g = f[level]
        learned = str(f.attrs.get("syn_labels", "hard")) == "learn" and "targets" in g
        out = SynsetLevel(*(torch.from_numpy(g[k][()]) for k in ("images", "labels", "group_class",
                                                                  "grad_norm_real", "grad_norm_syn", "size")),
                          unlearn_direction=float(f.attrs["unlearn_direction"]),
                          targets=torch.from_numpy(g["targets"][()]) if learned else None,
                          layer_rates=_rates(f, g),
                          rate_names=tuple(json.loads(f.attrs["layer_rate_names"])) if "layer_rates" in g else ())
    for name in ("images", "grad_norm_real", "grad_norm_syn", "targets", "layer_rates"):
        t = getattr(out, name)
        if t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise StageError(f"{artifact_path(run_dir, 'distill')}: {level} {name} hold NaN/inf, so the file is "
                             "corrupt: rerun distill with --overwrite")
    return out
