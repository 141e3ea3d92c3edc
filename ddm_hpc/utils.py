"""Small shared helpers: device choice (and the CUDA settings made once a GPU is chosen), seeding, progress bars,
memory budget and peak-memory meter, host-to-device copies, error lines, user plugins.

Device choice (:func:`resolve_device`). ``auto`` takes the GPU when torch can use one; when the machine
has an NVIDIA GPU that torch cannot use (driver older than the CUDA build, no driver library, a CPU-only
torch) it says so in one warning and runs on the CPU. The first time a CUDA device is chosen in a process
:func:`configure_cuda` fixes how it computes: with ``--deterministic`` (the default) cuDNN picks
deterministic algorithms without benchmarking, ``torch.use_deterministic_algorithms(True, warn_only=True)``
holds for every op (an op without a deterministic CUDA implementation warns instead of failing), and
``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (unless already set) makes cuBLAS reductions reproducible. Worker
processes of ``--workers N`` (:func:`set_worker_index`) take ``cuda:(i % device_count)``.

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


# Files that exist when the machine has an NVIDIA GPU and driver, whether or not torch can use them.
NVIDIA_PROBES = ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia/version")
CUBLAS_WORKSPACE = ":4096:8"  # CUBLAS_WORKSPACE_CONFIG for reproducible cuBLAS (PyTorch's reproducibility notes)
_worker_index: int | None = None
_warned_unusable = False
_cuda_mode: bool | None = None  # the deterministic setting made by configure_cuda, once


def cuda_unusable_reason() -> str | None:
    """Why torch cannot use the NVIDIA GPU this machine appears to have; None if CUDA works or no GPU is there.

    A GPU "appears" when one of :data:`NVIDIA_PROBES` exists (or ``CUDA_VISIBLE_DEVICES`` names one). The
    reason is torch's own error from initialising CUDA (e.g. "The NVIDIA driver on your system is too old").
    """
    if torch.cuda.is_available():
        return None
    if torch.version.cuda is None:
        hint = "this torch build has no CUDA (torch.version.cuda is None); install the CUDA build in constraints.txt"
    else:
        hint = None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    present = any(os.path.exists(p) for p in NVIDIA_PROBES) or visible not in ("", "-1")
    if not present:
        return None
    if hint:
        return hint
    try:
        torch.cuda.init()
    except Exception as e:  # noqa: BLE001 - torch's message is the reason
        return one_line(e)
    return "torch.cuda.is_available() is False"


_THREADS_LOGGED: dict[int, int] = {}


def configure_threads(threads: int) -> int:
    """Set this process's torch CPU threads (``--threads``; 0 = torch's own default, one per physical core) and
    log the choice, with a warning when other jobs already load the cores.

    The default does not follow the load: the last bits of CPU results depend on the thread count, so a choice
    made from the load would make reruns differ. ``--workers`` processes split the cores (``launch``). Returns the
    thread count.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if threads:
        torch.set_num_threads(threads)
    n = torch.get_num_threads()
    if _THREADS_LOGGED.get(threads) == n:
        return n  # variant runs of the same command: said once
    _THREADS_LOGGED[threads] = n
    others = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    log.log(logging.INFO if threads else logging.DEBUG, "threads: %d torch thread(s) per process on %d core(s)%s",
            n, cores, "" if threads else " (torch's default; --threads N to choose)")
    if not threads and n > 1 and others > cores - 0.5:
        log.warning("threads: the %d core(s) already carry a load of %.1f; %d threads per process may spin against "
                    "other jobs: pass --threads 1 if this runs slowly", cores, others, n)
    return n


def set_worker_index(index: int | None) -> None:
    """Make this process worker ``index`` of ``--workers``: ``auto``/``cuda`` then resolve to ``cuda:(index % n)``."""
    global _worker_index
    _worker_index = index


def resolve_device(name: str, deterministic: bool = True) -> torch.device:
    """The device named by ``--device``, with CUDA set up (:func:`configure_cuda`) when it is a GPU.

    ``auto`` -> cuda if torch can use it, else cpu (with one warning naming the cause when the machine has an
    NVIDIA GPU torch cannot use). ``auto`` and ``cuda`` in worker ``i`` of ``--workers`` give ``cuda:(i % n)``
    for n visible GPUs; ``cuda:N`` is taken as given.

    Raises:
        ConfigError: not a device name, a CUDA device without a usable GPU, or an index past the visible GPUs.
    """
    global _warned_unusable
    if name == "auto":
        if not torch.cuda.is_available():
            reason = cuda_unusable_reason()
            if reason and not _warned_unusable:
                _warned_unusable = True
                log.warning("--device auto: an NVIDIA GPU is present but torch cannot use it (%s); running on the "
                            "CPU. Fix the driver or the torch build, or pass --device cpu to say so", reason)
            return torch.device("cpu")
        name = "cuda"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        reason = cuda_unusable_reason() or "no CUDA GPU is visible"
        raise ConfigError(f"--device {name} asked for but {reason}: use --device cpu or auto")
    count = torch.cuda.device_count()
    if dev.index is None:
        dev = torch.device("cuda", (_worker_index or 0) % count)
    elif dev.index >= count:
        raise ConfigError(f"--device {name}: only {count} GPU(s) visible; use cuda:0..cuda:{count - 1}")
    configure_cuda(dev, deterministic)
    return dev


def configure_cuda(device: torch.device, deterministic: bool = True) -> None:
    """Make ``device`` the current GPU and, once per process, fix how CUDA computes (module docstring).

    ``deterministic``: cuDNN deterministic and not benchmarking, deterministic algorithms (warn-only) and
    ``CUBLAS_WORKSPACE_CONFIG``; False: cuDNN benchmarks and picks its fastest algorithm (results may then
    differ between runs in the last bits). The first call's choice holds for the process.
    """
    _configure_cuda_once(deterministic)
    torch.cuda.set_device(device)


def _configure_cuda_once(deterministic: bool) -> None:
    """The process-wide CUDA settings, made by the first call only."""
    global _cuda_mode
    if _cuda_mode is not None:
        if _cuda_mode != deterministic:
            log.warning("CUDA already set up with deterministic=%s in this process; keeping it", _cuda_mode)
        return
    _cuda_mode = deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True
    log.info("CUDA: %s algorithms (cudnn.deterministic=%s, cudnn.benchmark=%s, CUBLAS_WORKSPACE_CONFIG=%s)",
             "deterministic" if deterministic else "fastest", torch.backends.cudnn.deterministic,
             torch.backends.cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG", "unset"))


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; a host tensor bound for a GPU goes through pinned memory, without blocking the host.

    Safe to drop the source at once: the pinned copy belongs to PyTorch's caching host allocator, which
    reuses it only after the copy has finished.
    """
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def generator(seed: int, *salt: int) -> torch.Generator:
    """A CPU generator seeded from (seed, *salt): independent streams per purpose."""
    g = torch.Generator()
    s = seed
    for x in salt:
        s = (s * 1_000_003 + x) % (2**63 - 1)
    g.manual_seed(s)
    return g


PROGRESS_EVERY_S = 60.0  # a non-terminal log gets a progress line at most this often (DDM_PROGRESS_EVERY overrides)


class LogProgress:
    """Progress for a log that is not a terminal (a SLURM log, ``2> file``): a line at most every ``every``
    seconds, ``desc: i/N (p%), t s, ~r s left[, postfix]``, on the ``ddm_hpc.progress`` logger; nothing for a
    loop that ends sooner. ``disable`` is True, as on a hidden bar, so callers skip device syncs made only for a
    bar's postfix; :meth:`set_postfix` values still appear on the next line."""

    disable = True

    def __init__(self, it: Iterable[T], desc: str, total: int | None, every: float) -> None:
        self.it, self.desc, self.every, self.postfix = it, desc, every, ""
        self.total = total if total is not None and total >= 0 else (len(it) if hasattr(it, "__len__") else None)

    def set_postfix(self, **kw: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in kw.items())

    def __iter__(self) -> Iterator[T]:
        t0 = last = time.perf_counter()
        plog = logging.getLogger("ddm_hpc.progress")
        for i, x in enumerate(self.it, 1):
            yield x
            now = time.perf_counter()
            if now - last >= self.every:
                last = now
                done, el = (f"{i}/{self.total} ({100 * i / self.total:.0f}%)" if self.total else f"{i}"), now - t0
                left = f", ~{el * (self.total - i) / i:.0f} s left" if self.total else ""
                plog.info("%s: %s, %.0f s%s%s", self.desc, done, el, left, f", {self.postfix}" if self.postfix else "")


def progress(it: Iterable[T], desc: str, enable: bool = True, total: int | None = None, **kw) -> Iterable[T]:
    """A progress display for a loop over ``it`` (when ``enable``, i.e. ``--progress``).

    A tqdm bar on a terminal (or with DDM_PROGRESS=1); in a log that is not a terminal a line at most every
    DDM_PROGRESS_EVERY seconds (:class:`LogProgress`, default :data:`PROGRESS_EVERY_S`); DDM_PROGRESS=0
    shows nothing (the test suite sets it). Returns an iterable with ``set_postfix``.
    """
    mode = os.environ.get("DDM_PROGRESS", "")
    if not enable or mode == "0":
        return tqdm(it, desc=desc, total=total, disable=True, **kw)
    if mode == "1" or sys.stderr.isatty():
        return tqdm(it, desc=desc, total=total, disable=False, leave=False, dynamic_ncols=True, **kw)
    return LogProgress(it, desc, total, float(os.environ.get("DDM_PROGRESS_EVERY", PROGRESS_EVERY_S)))


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
