"""Host memory and read speed of the dataset: ``--data-cache memory`` against ``mmap`` (the streamed cache).

Three measurements, each mode in fresh processes, in one run:

1. First load: peak private memory (RSS less file-backed pages) and time of ``ddm_hpc.context.load_data``
   in a fresh process. ``memory`` loads and normalises everything; ``mmap`` streams the source into
   the run's cache (raw uint8 images) chunk by chunk.
2. One shuffled epoch of minibatches (``x_train[rows]``, batch 256), as training reads them when the
   set is not resident on the device: images/s and peak private memory.
3. ``--procs`` processes each load the data the way a stage, a ``--workers`` process or a SLURM task
   does, touch every training image (one shuffled epoch of the run's batch size), and report their proportional set size (PSS: shared pages
   divided among the processes that map them, /proc/self/smaps_rollup, Linux only); summed.

    python benchmarks/bench_data_cache.py                 # full local MNIST subset (17 435 images), 4 processes
    python benchmarks/bench_data_cache.py --n-train 2000 --procs 2
    python benchmarks/bench_data_cache.py --synthetic 200000 --size 32   # an RGB HDF5 file written first
    python benchmarks/bench_data_cache.py --synthetic 20000 --size 64 --format folder   # <class>/*.jpg files

With ``--format folder`` it also times decoding the first 2048 files with one thread against one
per core (``ddm_hpc.data.images.DECODE_THREADS``; the default uses threads on machines with 4+ cores only).
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


def _shuffled_epoch(bundle, batch: int) -> float:
    """Read every training image once in shuffled minibatches of ``batch``, as an epoch of training does."""
    import torch

    order = torch.randperm(len(bundle.y_train), generator=torch.Generator().manual_seed(0))
    return sum(float(bundle.x_train[order[a:a + batch]].sum()) for a in range(0, len(order), batch))


def _worker(cfg_dict: dict, ready, go, out) -> None:
    import torch

    from ddm_hpc.config import Config
    from ddm_hpc.context import load_data

    torch.set_num_threads(1)
    base = _pss_mb()
    cfg = Config.from_dict(cfg_dict)
    bundle = load_data(cfg)
    total = _shuffled_epoch(bundle, cfg.train.batch_size)
    ready.set()
    go.wait()  # every process holds its data now: PSS divides the shared pages among all of them
    out.put((_pss_mb() - base, total))
    go.wait()


def _first_load(cfg_dict: dict, out) -> None:
    import torch

    from ddm_hpc.config import Config
    from ddm_hpc.utils import PeakRSS
    from ddm_hpc.context import load_data

    import h5py  # noqa: F401  (imports before the baseline: only the loading counts)
    import torchvision  # noqa: F401

    torch.set_num_threads(1)
    torch.zeros(4, 3, 2, 2).double().square_().sum((0, 2, 3))  # first-use allocations before the baseline
    t0 = time.perf_counter()
    with PeakRSS() as mem:
        load_data(Config.from_dict(cfg_dict))
    out.put((mem.private_delta / 2**20, time.perf_counter() - t0))


def _epoch(cfg_dict: dict, out) -> None:
    import torch

    from ddm_hpc.config import Config
    from ddm_hpc.utils import PeakRSS
    from ddm_hpc.context import load_data

    torch.set_num_threads(1)
    bundle = load_data(Config.from_dict(cfg_dict))
    bundle.x_train[torch.arange(256)].sum()  # warm up
    t0 = time.perf_counter()
    with PeakRSS() as mem:
        _shuffled_epoch(bundle, 256)
    out.put((len(bundle.y_train) / (time.perf_counter() - t0), mem.private_delta / 2**20))


def in_fresh_process(target, cfg_dict: dict) -> tuple:
    """``target(cfg_dict, queue)`` run in a spawned interpreter; what it put on the queue."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(cfg_dict, q))
    p.start()
    res = q.get()
    p.join()
    return res


def synthetic_h5(path: Path, n: int, size: int, seed: int = 0) -> Path:
    """An ImageNet-shaped file, scaled: ``x`` uint8 [n, size, size, 3] with 100 classes, plus a 1000-row test split."""
    import h5py
    import numpy as np

    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        x = f.create_dataset("x", (n, size, size, 3), dtype=np.uint8, chunks=(256, size, size, 3))
        for a in range(0, n, 8192):
            x[a:a + 8192] = rng.integers(0, 256, (min(8192, n - a), size, size, 3), dtype=np.uint8)
        f["y"] = np.arange(n) % 100
        f["x_test"] = rng.integers(0, 256, (1000, size, size, 3), dtype=np.uint8)
        f["y_test"] = np.arange(1000) % 100
    return path


def synthetic_folder(root: Path, n: int, size: int, seed: int = 0) -> Path:
    """``train/<class>/*.jpg`` and ``val/<class>/*.jpg`` (100 classes, 1000 validation images), smooth
    random images (JPEG-compressible, like photos, unlike noise)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", n), ("val", 1000)):
        for i in range(count):
            folder = root / split / f"c{i % 100:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(small).resize((size, size), Image.BILINEAR).save(folder / f"{i:07d}.jpg", quality=90)
    return root


def decode_speed(root: Path, n: int = 2048) -> tuple[float, float, int]:
    """(images/s with 1 thread, images/s with one thread per core, cores) decoding the first n training files."""
    import os

    import ddm_hpc.data.images as data

    files = sorted((root / "train").rglob("*.jpg"))[:n]
    threads, default = os.cpu_count() or 1, data.DECODE_THREADS
    rates = []
    for k in (1, threads):
        data.DECODE_THREADS = k
        t0 = time.perf_counter()
        data.load_images(files)
        rates.append(len(files) / (time.perf_counter() - t0))
    data.DECODE_THREADS = default
    return rates[0], rates[1], threads


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
    ap.add_argument("--synthetic", type=int, default=0, help="N > 0: write an RGB HDF5 file of N images and use it")
    ap.add_argument("--size", type=int, default=32, help="image side of --synthetic")
    ap.add_argument("--format", choices=("h5", "folder"), default="h5", help="what --synthetic writes")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        dataset = "mnist"
        if args.synthetic:
            t0 = time.perf_counter()
            if args.format == "h5":
                path = synthetic_h5(Path(tmp) / "synthetic.h5", args.synthetic, args.size)
                size_mb = path.stat().st_size / 2**20
            else:
                path = synthetic_folder(Path(tmp) / "synthetic", args.synthetic, args.size)
                size_mb = sum(f.stat().st_size for f in path.rglob("*.jpg")) / 2**20
            dataset = str(path)
            print(f"wrote {dataset}: {size_mb:.0f} MB in {time.perf_counter() - t0:.1f} s")
            if args.format == "folder":
                one, many, threads = decode_speed(path)
                print(f"decoding 2048 files: 1 thread {one:.0f} images/s, {threads} threads {many:.0f} images/s "
                      f"({many / one:.2f}x)")
        cfg = {"data": {"dataset": dataset, "data_root": args.data_root, "n_train": args.n_train, "n_test": 1000},
               "runtime": {"out": tmp, "progress": False}}
        mapped = {**cfg, "runtime": {**cfg["runtime"], "data_cache": "mmap"}}
        first = {"memory": in_fresh_process(_first_load, cfg), "mmap": in_fresh_process(_first_load, mapped)}
        epoch = {"memory": in_fresh_process(_epoch, cfg), "mmap": in_fresh_process(_epoch, mapped)}
        from ddm_hpc.config import Config
        from ddm_hpc.context import load_data

        b = load_data(Config.from_dict(mapped))
        n, shape = len(b.y_train), tuple(b.x_train.shape[1:])
        raw = (b.x_train.raw.nbytes + b.x_test.raw.nbytes) / 2**20
        size = (b.x_train.numel() + b.x_test.numel()) * 4 / 2**20
        del b
        mem, t_mem = measure(cfg, args.procs)
        mm, t_mm = measure(mapped, args.procs)
    print(f"dataset {dataset}: {n} training images {shape} + 1000 test; cache {raw:.1f} MB (uint8), "
          f"normalised float32 {size:.1f} MB")
    print("first load, fresh process (peak private memory):")
    for mode, (mb, sec) in first.items():
        print(f"  --data-cache {mode:6s}  {mb:8.1f} MB = {mb / size:5.2f} x the float32 set  ({sec:.1f} s)")
    print(f"  memory / mmap: {first['memory'][0] / max(first['mmap'][0], 1e-9):.2f}x")
    print("one shuffled epoch of 256-image minibatches, x_train[rows] (1 thread):")
    for mode, (rate, mb) in epoch.items():
        print(f"  --data-cache {mode:6s}  {rate:10.0f} images/s  peak private +{mb:.1f} MB")
    print(f"  mmap / memory speed: {epoch['mmap'][0] / epoch['memory'][0]:.2f}x")
    print(f"{args.procs} processes each holding the data (summed PSS):")
    print(f"  --data-cache memory: {mem:8.1f} MB ({t_mem:.1f} s)")
    print(f"  --data-cache mmap:   {mm:8.1f} MB ({t_mm:.1f} s)")
    print(f"  memory / mmap: {mem / max(mm, 1e-9):.2f}x")


if __name__ == "__main__":
    main()
