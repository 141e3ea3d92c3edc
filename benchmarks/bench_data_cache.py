"""Host memory of worker processes that load the dataset: ``--data-cache memory`` against ``mmap``.

Each of ``--procs`` processes loads the run's dataset the way a stage, a ``--workers`` process or a
SLURM task does (``ddm_hpc.train.load_data``), touches every training image (one pass, as an epoch
does) and reports its proportional set size (PSS: shared pages divided among the processes that map
them, from /proc/self/smaps_rollup, Linux only). The benchmark prints the summed PSS for both modes
and their ratio, measured in one run.

    python benchmarks/bench_data_cache.py                 # full local MNIST subset (17 435 images), 4 processes
    python benchmarks/bench_data_cache.py --n-train 2000 --procs 2
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
import time
from pathlib import Path


def _pss_mb() -> float:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no Pss line in /proc/self/smaps_rollup")


def _worker(cfg_dict: dict, ready, go, out) -> None:
    import torch

    from ddm_hpc.config import Config
    from ddm_hpc.train import load_data

    torch.set_num_threads(1)
    base = _pss_mb()
    bundle = load_data(Config.from_dict(cfg_dict))
    total = 0.0
    for i in range(0, len(bundle.y_train), 4096):  # touch every image once, as an epoch does
        total += float(bundle.x_train[i:i + 4096].sum())
    ready.set()
    go.wait()  # every process holds its data now: PSS divides the shared pages among all of them
    out.put((_pss_mb() - base, total))
    go.wait()


def measure(cfg_dict: dict, procs: int) -> tuple[float, float]:
    """(summed PSS growth in MB over ``procs`` processes, seconds)."""
    ctx = mp.get_context("spawn")
    ready = [ctx.Event() for _ in range(procs)]
    go, out = ctx.Event(), ctx.Queue()
    t0 = time.perf_counter()
    ps = [ctx.Process(target=_worker, args=(cfg_dict, r, go, out)) for r in ready]
    for p in ps:
        p.start()
    for r in ready:
        r.wait()
    go.set()
    res = [out.get() for _ in ps]
    for p in ps:
        p.join()
    return sum(r[0] for r in res), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default="../shared/data")
    ap.add_argument("--n-train", type=int, default=0, help="0 = every training image of the source")
    ap.add_argument("--procs", type=int, default=4)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = {"data": {"data_root": args.data_root, "n_train": args.n_train, "n_test": 1000},
               "runtime": {"out": tmp, "progress": False}}
        from ddm_hpc.config import Config
        from ddm_hpc.train import load_data

        mapped = {**cfg, "runtime": {**cfg["runtime"], "data_cache": "mmap"}}
        b = load_data(Config.from_dict(mapped))  # writes the cache once, as the first stage does
        size = (b.x_train.numel() + b.x_test.numel()) * 4 / 2**20
        del b
        mem, t_mem = measure(cfg, args.procs)
        mm, t_mm = measure(mapped, args.procs)
    print(f"{args.procs} processes, dataset {size:.1f} MB (float32, normalised)")
    print(f"  --data-cache memory: summed PSS {mem:8.1f} MB ({t_mem:.1f} s)")
    print(f"  --data-cache mmap:   summed PSS {mm:8.1f} MB ({t_mm:.1f} s)")
    print(f"  memory / mmap: {mem / max(mm, 1e-9):.2f}x")


if __name__ == "__main__":
    main()
