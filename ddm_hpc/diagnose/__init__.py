"""``ddm-hpc diagnose``: model behaviours beyond one prediction (paper sec. 4, supplementary sec. 9).

Each diagnostic is a function ``fn(dc: DiagnoseContext) -> Section`` in its own module:

  useless   Table 3: rank clusters by the global validation objective (Eq. 14, Dist2 summed over the
            validation images), remove the lowest-ranked 1-50 % of the training data, retrain exactly,
            report test accuracy against random removal of the same amount (``removal``).
  noisy     Table 6: corrupt a fraction of the training images (additive noise, label flips), run the
            pipeline on the corrupted copy, remove the worst-ranked 10-40 %, retrain; accuracy against
            random removal and a loss-ranking baseline, and precision/recall of the corrupted rows
            (``removal``).
  unlearn   Table 4: theta_tau fine-tuned on all synsets (DDM, DDM-match), and single clusters unlearned
            by their synset against exact retraining without them and gradient ascent on the cluster's
            real images (``unlearn``).
  privacy   Fig. 4/5: synset PNG grids (reverse GM beside forward GM), nearest real image by L2 and
            SSIM against real-vs-real nearest neighbours, loss-based membership inference of a model
            trained on the synset (``privacy``).
  transfer  Table 7: KL(student, teacher) as the objective; remove the top-ranked clusters from the
            teacher's data, retrain it, distil a student with Eq. 15 (``removal``).
  pictures  Fig. 3 class x class heat map, top-k responsible clusters per query as image grids of
            their members, predicted vs exact scatter (``pictures``).

Every diagnostic writes ``RUN/diagnose/<name>.h5`` (its numbers; temp file + rename) and PNGs under
``RUN/diagnose/``; :func:`run_diagnose` then writes ``RUN/diagnostics.md`` embedding them all.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch

from ddm_hpc.config import Config
from ddm_hpc.data import DatasetBundle
from ddm_hpc.storage import atomic_h5, write_provenance

log = logging.getLogger(__name__)


@dataclass
class Section:
    """What one diagnostic reports.

    Attributes:
        name: the diagnostic (``useless`` ...): its numbers go to ``RUN/diagnose/<name>.h5``.
        title: the Markdown heading.
        lines: the Markdown body (tables, findings), without the heading.
        images: PNG files under ``RUN/diagnose/``, embedded after the body.
        arrays: every number the body prints, as datasets of ``<name>.h5`` (so they can be recomputed).
        attrs: scalar results and settings, as root attrs of ``<name>.h5``.
    """

    name: str
    title: str
    lines: list[str]
    images: list[Path] = field(default_factory=list)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    attrs: dict[str, object] = field(default_factory=dict)


@dataclass
class DiagnoseContext:
    """What every diagnostic needs: the finished run (train .. attribute), its data and where to write."""

    cfg: Config
    bundle: DatasetBundle
    device: torch.device

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.runtime.out)

    @property
    def out_dir(self) -> Path:
        """``RUN/diagnose``: every diagnostic's HDF5 file and PNGs."""
        d = self.run_dir / "diagnose"
        d.mkdir(parents=True, exist_ok=True)
        return d


def variant(cfg: Config, bundle: DatasetBundle, device: torch.device, name: str, distill: dict,
            stages: tuple[str, ...]) -> Path:
    """``RUN/variants/<name>``: this run's train.h5/clusters.h5 with other ``distill`` options (flat search,
    cluster level), the same variants ``ddm-hpc evaluate`` makes, so either reuses the other's."""
    from ddm_hpc.cluster import read_clusters
    from ddm_hpc.config import merge
    from ddm_hpc.methods import VARIANT_ATTRIBUTE, Context, variant_run

    assignment, cluster_class = read_clusters(cfg.runtime.out)
    ctx = Context(cfg, bundle, torch.zeros(0, dtype=torch.long), torch.from_numpy(assignment).long(),
                  torch.from_numpy(cluster_class).long(), device)
    return variant_run(ctx, name, merge(VARIANT_ATTRIBUTE, {"distill": distill}), ("train", "cluster"), stages)


def ddm_match_run(dc: DiagnoseContext) -> Path:
    """``RUN/variants/ddm-match``: forward-GM synsets on this run's clusters, distilled if missing."""
    return variant(dc.cfg, dc.bundle, dc.device, "ddm-match", {"method": "ddm-match"}, ("distill",))


def diagnostic_function(name: str) -> Callable[[DiagnoseContext], Section]:
    """The function of one diagnostic (imported lazily: each pulls in its own dependencies)."""
    if name in ("useless", "noisy", "transfer"):
        from ddm_hpc.diagnose import removal as mod
    elif name == "unlearn":
        from ddm_hpc.diagnose import unlearn as mod
    elif name == "privacy":
        from ddm_hpc.diagnose import privacy as mod
    else:
        from ddm_hpc.diagnose import pictures as mod
    return getattr(mod, f"{name}_section")


def write_section(dc: DiagnoseContext, sec: Section, seconds: float) -> Path:
    """``RUN/diagnose/<name>.h5``: the section's arrays and attrs, its Markdown and provenance."""
    path = dc.out_dir / f"{sec.name}.h5"
    with atomic_h5(path) as f:
        for key, arr in sec.arrays.items():
            f.create_dataset(key, data=np.asarray(arr))
        for key, val in sec.attrs.items():
            f.attrs[key] = val if isinstance(val, (int, float, str, np.generic)) else json.dumps(val)
        f.attrs["markdown"] = "\n".join(sec.lines)
        f.attrs["title"] = sec.title
        f.attrs["images"] = json.dumps([p.name for p in sec.images])
        write_provenance(f, dc.cfg, "diagnose", seconds)
    return path


def read_section(path: str | Path) -> Section:
    """A section back from its HDF5 file (the report is rebuilt from these files alone)."""
    path = Path(path)
    with h5py.File(path, "r", locking=False) as f:
        arrays = {}
        f.visititems(lambda k, v: arrays.__setitem__(k, v[()]) if isinstance(v, h5py.Dataset) else None)
        attrs = {k: v for k, v in f.attrs.items()}
    images = [path.parent / n for n in json.loads(str(attrs.pop("images", "[]")))]
    return Section(path.stem, str(attrs.pop("title", path.stem)), str(attrs.pop("markdown", "")).splitlines(),
                   images, arrays, attrs)


def write_markdown(run_dir: str | Path, names: list[str] | None = None) -> Path:
    """``RUN/diagnostics.md`` from the sections under ``RUN/diagnose/`` (all, or ``names`` in order)."""
    from ddm_hpc.config import DIAGNOSTICS

    run_dir = Path(run_dir)
    d = run_dir / "diagnose"
    order = names or [n for n in DIAGNOSTICS if (d / f"{n}.h5").is_file()]
    lines = ["# DDM diagnostics", "",
             f"Run: `{run_dir}`. Each section's numbers are in `diagnose/<name>.h5`; regenerate this file with "
             "`python -m ddm_hpc.diagnose RUN_DIR`.", ""]
    for name in order:
        path = d / f"{name}.h5"
        if not path.is_file():
            continue
        sec = read_section(path)
        lines += [f"## {sec.title}", "", *sec.lines, ""]
        lines += [f"![{p.stem}](diagnose/{p.name})" for p in sec.images if p.is_file()]
        lines.append("")
    out = run_dir / "diagnostics.md"
    tmp = out.with_name(f".{out.name}.tmp.{os.getpid()}")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, out)
    return out


def run_diagnose(cfg: Config, bundle: DatasetBundle | None = None) -> Path:
    """Run ``--tasks`` on a finished run (train .. attribute) and write ``RUN/diagnostics.md``."""
    from ddm_hpc.train import load_data
    from ddm_hpc.utils import resolve_device

    bundle = bundle or load_data(cfg)
    dc = DiagnoseContext(cfg, bundle, resolve_device(cfg.runtime.device))
    for name in cfg.diagnose.task_list():
        t0 = time.perf_counter()
        log.info("diagnose: %s", name)
        sec = diagnostic_function(name)(dc)
        path = write_section(dc, sec, time.perf_counter() - t0)
        log.info("diagnose: %s done in %.1f s -> %s", name, time.perf_counter() - t0, path)
    return write_markdown(cfg.runtime.out)
