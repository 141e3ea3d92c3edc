"""What every diagnostic shares: the section it reports, its registration, and the files it writes.

Each diagnostic is a :class:`Task` (registered in :data:`TASKS` by its module) whose ``run(ctx)``
returns a :class:`Section`: Markdown lines, PNGs, and every number they print as arrays and attrs.
:func:`write_section` stores it in ``RUN/diagnose/<name>.h5`` (temp file + rename) and
:func:`write_markdown` rebuilds ``RUN/diagnostics.md`` from those files alone.

Room: imports ``config``, ``context``, ``storage`` and ``variants``; the task modules import it.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from ddm_hpc.config import DIAGNOSTICS, Config
from ddm_hpc.context import RunContext
from ddm_hpc.errors import ConfigError
from ddm_hpc.storage import atomic_h5, create_dataset, verify, write_provenance
from ddm_hpc.variants import Variant

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


def diagnose_dir(run_dir: str | Path) -> Path:
    """``RUN/diagnose``: every diagnostic's HDF5 file and PNGs (made if missing)."""
    d = Path(run_dir) / "diagnose"
    d.mkdir(parents=True, exist_ok=True)
    return d


@dataclass(frozen=True)
class Task:
    """One diagnostic: ``run(ctx) -> Section``, and the variant runs it reads (``variants(cfg)``, made by the
    pipeline before the diagnose stage runs)."""

    name: str
    run: Callable[[RunContext], Section]
    variants: Callable[[Config], list[Variant]] = lambda cfg: []


TASKS: dict[str, Task] = {}  # name -> task; the names are config.DIAGNOSTICS (``--tasks``)


def register(task: Task) -> Task:
    """Add a diagnostic to :data:`TASKS` (its name must be one of ``config.DIAGNOSTICS``)."""
    if task.name not in DIAGNOSTICS:
        raise ConfigError(f"diagnostic {task.name!r} is not one of {', '.join(DIAGNOSTICS)} (config.DIAGNOSTICS)")
    TASKS[task.name] = task
    return task


def write_section(ctx: RunContext, sec: Section, seconds: float) -> Path:
    """``RUN/diagnose/<name>.h5``: the section's arrays and attrs, its Markdown and provenance."""
    path = diagnose_dir(ctx.run_dir) / f"{sec.name}.h5"
    with atomic_h5(path) as f:
        for key, arr in sec.arrays.items():
            create_dataset(f, key, data=np.asarray(arr))
        for key, val in sec.attrs.items():
            f.attrs[key] = val if isinstance(val, (int, float, str, np.generic)) else json.dumps(val)
        f.attrs["markdown"] = "\n".join(sec.lines)
        f.attrs["title"] = sec.title
        f.attrs["images"] = json.dumps([p.name for p in sec.images])
        write_provenance(f, ctx.cfg, "diagnose", seconds)
    return path


def read_section(path: str | Path) -> Section:
    """A section back from its HDF5 file (the report is rebuilt from these files alone)."""
    path = Path(path)
    verify(path, "diagnose")
    with h5py.File(path, "r", locking=False) as f:
        arrays = {}
        f.visititems(lambda k, v: arrays.__setitem__(k, v[()]) if isinstance(v, h5py.Dataset) else None)
        attrs = {k: v for k, v in f.attrs.items()}
    images = [path.parent / n for n in json.loads(str(attrs.pop("images", "[]")))]
    return Section(path.stem, str(attrs.pop("title", path.stem)), str(attrs.pop("markdown", "")).splitlines(),
                   images, arrays, attrs)


def write_markdown(run_dir: str | Path, names: list[str] | None = None) -> Path:
    """``RUN/diagnostics.md`` from the sections under ``RUN/diagnose/`` (all, or ``names`` in order)."""
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
