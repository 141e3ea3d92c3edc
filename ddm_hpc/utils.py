"""Small shared helpers: device choice, seeding, progress bars, memory budget and peak-memory meter, error lines,
user plugins.

Room: a leaf beside ``errors`` (imports nothing else of ddm_hpc); every module may use it.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import os
import resource
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from tqdm.auto import tqdm

from ddm_hpc.errors import ConfigError

T = TypeVar("T")
log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available else cpu; a CUDA device asked for without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} asked for but no CUDA GPU is visible: use --device cpu or auto")
    return dev


def generator(seed: int, *salt: int) -> torch.Generator:
    """A CPU generator seeded from (seed, *salt): independent streams per purpose."""
    g = torch.Generator()
    s = seed
    for x in salt:
        s = (s * 1_000_003 + x) % (2**63 - 1)
    g.manual_seed(s)
    return g


def progress(it: Iterable[T], desc: str, enable: bool = True, total: int | None = None, **kw) -> Iterator[T]:
    """tqdm on stderr when enabled and attached to a terminal (or DDM_PROGRESS=1)."""
    force = os.environ.get("DDM_PROGRESS") == "1"
    disable = not enable or (None if not force else False)
    return tqdm(it, desc=desc, total=total, disable=disable, leave=False, dynamic_ncols=True, **kw)


def memory_budget_bytes(device: torch.device, fraction: float = 0.25) -> int:
    """A fraction of the free memory of ``device`` (host RAM for CPU)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * fraction)
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        avail = 4 << 30
    return int(avail * fraction)


def one_line(err: BaseException) -> str:
    """An exception's message folded onto one line (its type name if it has none)."""
    return " ".join(str(err).split()) or type(err).__name__


def import_object(spec: str, option: str) -> Any:
    """The object a user names as ``package.module:attr`` or ``path/to/file.py:attr``.

    A file path is imported as a module named after the file (once; later calls reuse it), so a
    factory in a script beside the run needs no package. Used by ``--model``, ``--features`` and
    ``--plugins`` (``option`` names the flag in the one-line error).

    Raises:
        ConfigError: the spec has no ``:``, or the module or attribute cannot be loaded.
    """
    mod_name, sep, attr = spec.rpartition(":")
    if not sep or not mod_name or not attr:
        raise ConfigError(f"{option} {spec!r}: name an object as package.module:name or path/to/file.py:name")
    try:
        return getattr(import_module(mod_name), attr)
    except (ImportError, AttributeError, OSError) as e:
        raise ConfigError(f"{option} {spec!r} cannot be loaded ({one_line(e)}): check the module path and the "
                          "name after ':'") from None


def import_module(name: str) -> Any:
    """Import ``name``: a dotted module path, or a ``.py`` file (registered in ``sys.modules`` under its stem)."""
    if not name.endswith(".py"):
        return importlib.import_module(name)
    path = Path(name).expanduser().resolve()
    key = f"ddm_hpc_plugin_{path.stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"  # same in every process
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, path)
    if spec is None or spec.loader is None or not path.is_file():
        raise ImportError(f"no such Python file: {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[key]
        raise
    return module


def load_plugins(names: str) -> None:
    """Import each comma-separated module or ``.py`` file in ``names`` (``--plugins``), for its registrations
    (``register_model``, attribution methods): in the CLI and again in every job process."""
    for name in (n.strip() for n in names.split(",")):
        if name:
            try:
                import_module(name)
            except (ImportError, OSError) as e:
                raise ConfigError(f"--plugins {name!r} cannot be imported ({one_line(e)}): pass a module on the "
                                  "Python path or a .py file") from None


Ids = Sequence[int] | torch.Tensor | np.ndarray  # cluster or row ids, in any integer container


def as_long(x: Ids) -> torch.Tensor:
    """Any integer sequence/array/tensor -> int64 tensor [n] on CPU."""
    return torch.as_tensor(np.asarray(x, dtype=np.int64).reshape(-1))


def _rss_bytes() -> tuple[int, int]:
    """(resident set size, private part) of this process now, in bytes (Linux /proc; zeros where
    unavailable). The private part leaves out file-backed and shared pages (the page cache of
    memory-mapped files, which the OS can drop and other processes share): the process's own memory."""
    try:
        with open("/proc/self/statm") as fh:
            fields = fh.read().split()
        page = os.sysconf("SC_PAGE_SIZE")
        return int(fields[1]) * page, (int(fields[1]) - int(fields[2])) * page
    except (OSError, ValueError, IndexError):
        return 0, 0


class PeakRSS:
    """Peak resident memory of a ``with`` block above the RSS at its start.

    A background thread samples ``/proc/self/statm`` every ``interval`` seconds (short spikes
    between samples can be missed); ``ru_maxrss`` (the kernel's exact high-water mark for the
    process lifetime) gives a conservative upper bound when the block sets a new process peak.

    Attributes:
        baseline: RSS bytes at entry. peak: highest sampled RSS bytes. delta: peak - baseline.
        private_delta: the same for private memory only (RSS less file-backed and shared pages, so
            pages of a memory-mapped file that were read do not count).
        maxrss_delta: ru_maxrss at exit - baseline (>= the true peak increase; an overestimate when
            the process peaked higher before the block).
    """

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.baseline = self.peak = 0
        self.private_baseline = self.private_peak = 0
        self.maxrss_delta = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._update()
            time.sleep(self.interval)

    def _update(self) -> None:
        rss, private = _rss_bytes()
        self.peak, self.private_peak = max(self.peak, rss), max(self.private_peak, private)

    def __enter__(self) -> PeakRSS:
        self.baseline, self.private_baseline = _rss_bytes()
        self.peak, self.private_peak = self.baseline, self.private_baseline
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._update()
        self.maxrss_delta = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.baseline

    @property
    def delta(self) -> int:
        return self.peak - self.baseline

    @property
    def private_delta(self) -> int:
        return self.private_peak - self.private_baseline
