"""Small shared helpers: device choice, seeding, progress bars, memory budget."""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

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
