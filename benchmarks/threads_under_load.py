"""Thread counts on a loaded and an unloaded machine: ``ddm-hpc run --preset smoke`` at each ``--threads``, alone and
beside CPU-bound competitors.

Each competitor is a busy loop pinned to nothing (what another user's job looks like). Every cell is one fresh run
in its own directory (nothing reused); the table prints wall seconds and each cell's ratio to the fastest
unloaded cell, all measured in this one invocation.

    python benchmarks/threads_under_load.py                       # --threads 1 and 2, 0 and 1 competitors
    python benchmarks/threads_under_load.py --threads 1 2 --competitors 0 1 2
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def busy() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def run_once(threads: int, out: Path, data_root: str) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    cmd = [sys.executable, "-m", "ddm_hpc.cli", "run", "--preset", "smoke", "--no-progress", "--threads", str(threads),
           "--data-root", data_root, "--out", str(out)]
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--competitors", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--data-root", default="../shared/data")
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"{cores} cores; smoke preset, one fresh run per cell")
    work = Path(tempfile.mkdtemp(prefix="threads-"))
    cells: dict[tuple[int, int], float] = {}
    try:
        for n_busy in args.competitors:
            procs = [busy() for _ in range(n_busy)]
            try:
                for t in args.threads:
                    cells[(n_busy, t)] = run_once(t, work / f"b{n_busy}-t{t}", args.data_root)
                    print(f"  {n_busy} competitor(s), --threads {t}: {cells[(n_busy, t)]:.1f} s", flush=True)
            finally:
                for p in procs:
                    p.kill()
                    p.wait()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    best = min(v for (b, _), v in cells.items() if b == min(args.competitors))
    print("| competitors | " + " | ".join(f"--threads {t}" for t in args.threads) + " |")
    print("|---" * (len(args.threads) + 1) + "|")
    for b in args.competitors:
        print(f"| {b} | " + " | ".join(f"{cells[(b, t)]:.1f} s ({cells[(b, t)] / best:.2f}x)" for t in args.threads) + " |")


if __name__ == "__main__":
    main()
