"""Benchmark the fused matching loss against the eager and torch.compile'd reference.

    python benchmarks/bench_matching_loss.py                      # GPU: full table; CPU: reference only
    python benchmarks/bench_matching_loss.py --models convnet --ks 100 --csv benchmarks/results.csv
    ncu --kernel-name regex:_matching_loss --launch-count 3 --set full -o matching_loss \\
        python benchmarks/bench_matching_loss.py --models convnet --ks 100 --once

For each model's parameter shapes (ddm_hpc.models when importable, else the hard-coded
lists below) and each number of clusters K, it times ``loss = f(real, syn)`` (fwd) and
``loss`` plus ``d loss.sum() / d syn`` (fwd+bwd) with ``triton.testing.do_bench`` medians
(20th/80th percentiles beside them), for the fused kernel (``kernels.matching_loss``), the
eager reference and ``torch.compile`` of the reference. GB/s counts the bytes that must
move: fwd reads real and syn once and writes loss [K]; fwd+bwd also writes d syn once
(the fused backward reads real and syn a second time, so its own traffic is higher). The
device's copy bandwidth (a 1 GiB ``copy_``: read + write) is measured in the same run;
peak memory is ``torch.cuda.max_memory_allocated`` above the inputs.

Without a CUDA GPU the kernel runs only under Triton's interpreter, which says nothing
about speed: the script says so and times the eager reference on the CPU instead (median
of several runs after a warm-up; ``--cpu-compile`` adds torch.compile).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from kernels import matching_loss  # noqa: E402
from kernels.reference import matching_loss_reference  # noqa: E402

# Fallback parameter shapes (ddm_hpc.models is the source of truth when importable).
# convnet: width 128, depth 3, 1x28x28 input (padding 3 -> 32 -> 16 -> 8 -> 4), 10 classes;
# per conv block: weight, bias, GroupNorm weight, bias.
CONVNET_SHAPES = [(128, 1, 3, 3), (128,), (128,), (128,)]
CONVNET_SHAPES += [(128, 128, 3, 3), (128,), (128,), (128,)] * 2 + [(10, 2048), (10,)]


def _resnet18_shapes(width: int = 64, in_channels: int = 3, num_classes: int = 10) -> list[tuple[int, ...]]:
    """ResNet-18 "AP" of ddm_hpc.models: bias-free convs, instance-norm affines, 1x1 shortcuts."""
    shapes: list[tuple[int, ...]] = [(width, in_channels, 3, 3), (width,), (width,)]
    planes = width
    for stage, out in enumerate((width, 2 * width, 4 * width, 8 * width)):
        for block in range(2):
            cin = planes if block == 0 else out
            shapes += [(out, cin, 3, 3), (out,), (out,), (out, out, 3, 3), (out,), (out,)]
            if block == 0 and stage > 0:
                shapes += [(out, cin, 1, 1), (out,), (out,)]
        planes = out
    return shapes + [(num_classes, 8 * width), (num_classes,)]


MODELS = {
    "convnet": (("convnet", 1, 10, (28, 28)), CONVNET_SHAPES),
    "resnet18": (("resnet18", 3, 10, (32, 32)), _resnet18_shapes()),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PROVIDERS = ("triton", "eager", "compile")


def param_shapes(model: str) -> tuple[list[tuple[int, ...]], str]:
    """The model's parameter shapes, and where they came from."""
    build_args, fallback = MODELS[model]
    try:
        from ddm_hpc.models import build_model

        return [tuple(p.shape) for p in build_model(*build_args).parameters()], "ddm_hpc.models"
    except Exception as exc:  # the models module may be missing or mid-edit
        return list(fallback), f"hard-coded ({type(exc).__name__})"


def make_grads(shapes, k: int, dtype: torch.dtype, device: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Random per-cluster gradients [K, *shape]: real constants, syn leaves requiring grad."""
    g = torch.Generator(device=device).manual_seed(0)
    real = [torch.randn(k, *s, generator=g, device=device, dtype=dtype) for s in shapes]
    syn = [torch.randn(k, *s, generator=g, device=device, dtype=dtype).requires_grad_() for s in shapes]
    return real, syn


def counted_bytes(real, syn, include_1d: bool, k: int) -> tuple[int, int]:
    """Bytes that must move for (fwd, fwd+bwd): every counted gradient read once, outputs written once."""
    counted = [(r, s) for r, s in zip(real, syn) if r.dim() > 2 or include_1d]
    reads = sum(r.numel() * r.element_size() + s.numel() * s.element_size() for r, s in counted)
    d_syn = sum(s.numel() * s.element_size() for _, s in counted)
    return reads + 4 * k, reads + 4 * k + d_syn


def copy_bandwidth_gbs(device: str) -> float:
    """Measured device copy bandwidth (GB/s, read + write) of a 1 GiB copy_."""
    import triton.testing

    src = torch.empty(1 << 28, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), quantiles=[0.5, 0.2, 0.8])[0]
    return 2 * src.numel() * 4 / ms / 1e6


def make_fns(provider: str, real, syn, kw) -> tuple[Callable[[], object], Callable[[], object]]:
    """(forward, forward+backward) closures for one provider."""
    if provider == "triton":
        fn = matching_loss
    elif provider == "eager":
        fn = matching_loss_reference
    else:
        torch._dynamo.reset()  # a static compile per configuration, no recompile-limit fallback
        fn = torch.compile(matching_loss_reference)

    def fwd():
        with torch.no_grad():
            return fn(real, syn, **kw)

    def fwd_bwd():
        return torch.autograd.grad(fn(real, syn, **kw).sum(), syn, allow_unused=True)

    return fwd, fwd_bwd


def peak_mib(fn: Callable[[], object]) -> float:
    """Peak CUDA memory (MiB) allocated by one call above what was allocated before."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def run_gpu(args, device: str = "cuda") -> list[dict]:
    import triton.testing

    name = torch.cuda.get_device_name()
    copy_gbs = copy_bandwidth_gbs(device)
    print(f"device: {name}; measured copy bandwidth {copy_gbs:.0f} GB/s (1 GiB copy_, read + write)")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("warning: TRITON_INTERPRET is set: the 'triton' rows time the interpreter, not the GPU kernel")
    kw = dict(sign=args.sign, include_1d=args.include_1d, distance=args.distance)
    rows = []
    header = f"{'model':9} {'K':>4} {'provider':8} {'mode':7} {'ms':>8} {'(p20-p80)':>17} {'GB/s':>7} {'%copy':>6} {'peak MiB':>9}"
    print(header)
    for model in args.models:
        shapes, source = param_shapes(model)
        print(f"# {model}: {len(shapes)} parameters from {source}")
        for k in args.ks:
            try:
                real, syn = make_grads(shapes, k, DTYPES[args.dtype], device)
            except torch.cuda.OutOfMemoryError:
                print(f"{model:9} {k:>4} inputs do not fit")
                continue
            fwd_bytes, fwd_bwd_bytes = counted_bytes(real, syn, args.include_1d, k)
            times = {}
            for provider in args.providers:
                fns = make_fns(provider, real, syn, kw)
                for mode, fn, nbytes in (("fwd", fns[0], fwd_bytes), ("fwd+bwd", fns[1], fwd_bwd_bytes)):
                    try:
                        fn()  # compile / autotune outside the timing
                        if args.once:
                            torch.cuda.synchronize()
                            continue
                        ms, lo, hi = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
                        peak = peak_mib(fn)
                    except torch.cuda.OutOfMemoryError:
                        print(f"{model:9} {k:>4} {provider:8} {mode:7} out of memory")
                        torch.cuda.empty_cache()
                        continue
                    gbs = nbytes / ms / 1e6
                    times[(provider, mode)] = ms
                    print(f"{model:9} {k:>4} {provider:8} {mode:7} {ms:8.3f} ({lo:7.3f}-{hi:7.3f}) "
                          f"{gbs:7.0f} {100 * gbs / copy_gbs:5.0f}% {peak:9.1f}")
                    rows.append(dict(model=model, k=k, provider=provider, mode=mode, ms=ms, p20=lo, p80=hi,
                                     gbs=gbs, copy_gbs=copy_gbs, peak_mib=peak, dtype=args.dtype,
                                     distance=args.distance, include_1d=args.include_1d, device=name))
            for mode in ("fwd", "fwd+bwd"):
                base = times.get(("triton", mode))
                if base:
                    ratios = ", ".join(f"{p} {times[(p, mode)] / base:.2f}x" for p in ("eager", "compile")
                                       if (p, mode) in times)
                    print(f"{'':9} {k:>4} speed-up of triton {mode}: {ratios}")
            del real, syn
            torch.cuda.empty_cache()
    return rows


def run_cpu(args) -> list[dict]:
    print("no CUDA GPU: the Triton kernel would only run under the interpreter (no meaningful timing);")
    print("timing the eager reference on the CPU instead"
          + (" and torch.compile of it" if args.cpu_compile else "") + f" ({torch.get_num_threads()} threads)")
    kw = dict(sign=args.sign, include_1d=args.include_1d, distance=args.distance)
    providers = ["eager"] + (["compile"] if args.cpu_compile else [])
    rows = []
    print(f"{'model':9} {'K':>4} {'provider':8} {'mode':7} {'median ms':>10} {'min ms':>8} {'GB/s':>6}")
    for model in args.models:
        shapes, source = param_shapes(model)
        print(f"# {model}: {len(shapes)} parameters from {source}")
        for k in args.cpu_ks.get(model, args.ks):
            real, syn = make_grads(shapes, k, torch.float32, "cpu")
            fwd_bytes, fwd_bwd_bytes = counted_bytes(real, syn, args.include_1d, k)
            for provider in providers:
                fns = make_fns(provider, real, syn, kw)
                for mode, fn, nbytes in (("fwd", fns[0], fwd_bytes), ("fwd+bwd", fns[1], fwd_bwd_bytes)):
                    fn()  # warm-up (and compile)
                    samples = []
                    for _ in range(args.reps):
                        t0 = time.perf_counter()
                        fn()
                        samples.append((time.perf_counter() - t0) * 1e3)
                    ms = statistics.median(samples)
                    print(f"{model:9} {k:>4} {provider:8} {mode:7} {ms:10.2f} {min(samples):8.2f} {nbytes / ms / 1e6:6.1f}")
                    rows.append(dict(model=model, k=k, provider=provider, mode=mode, ms=ms, p20=min(samples),
                                     p80=max(samples), gbs=nbytes / ms / 1e6, copy_gbs="", peak_mib="",
                                     dtype="fp32", distance=args.distance, include_1d=args.include_1d, device="cpu"))
    return rows


def append_csv(path: Path, rows: list[dict]) -> None:
    """Append rows with versions and a timestamp (header written once)."""
    import triton

    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    extra = dict(torch=torch.__version__, triton=triton.__version__, timestamp=stamp)
    rows = [{**r, **extra} for r in rows]
    if not rows:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)
    print(f"appended {len(rows)} rows to {path}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="convnet,resnet18", help="comma list of: " + ", ".join(MODELS))
    p.add_argument("--ks", default="1,10,100", help="numbers of clusters K (GPU)")
    p.add_argument("--cpu-ks", default="convnet:1,10;resnet18:1", help="K per model on the CPU, e.g. 'convnet:1,10'")
    p.add_argument("--providers", default=",".join(PROVIDERS), help="GPU providers: triton, eager, compile")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="gradient dtype on the GPU")
    p.add_argument("--distance", default="cos", choices=["cos", "mse"])
    p.add_argument("--sign", type=float, default=-1.0)
    p.add_argument("--include-1d", action="store_true", help="count 1-D parameters too")
    p.add_argument("--reps", type=int, default=5, help="timed runs per CPU measurement (median reported)")
    p.add_argument("--cpu-compile", action="store_true", help="also time torch.compile(reference) on the CPU")
    p.add_argument("--once", action="store_true", help="GPU: run each function once, no timing (for ncu/nsys)")
    p.add_argument("--csv", type=Path, default=None, help="append result rows to this CSV")
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown:
        p.error(f"unknown model(s) {unknown}; choose from {sorted(MODELS)}")
    args.ks = [int(k) for k in args.ks.split(",") if k]
    args.cpu_ks = {m: [int(k) for k in ks.split(",")] for m, ks in (e.split(":") for e in args.cpu_ks.split(";") if e)}
    args.providers = [q for q in args.providers.split(",") if q]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if os.environ.get("DDM_ARGCHECK"):  # benchmarks/gpu_suite.sh --check: the suite's flags parse; nothing runs
        print(f"{Path(__file__).name}: arguments ok")
        return
    print(f"torch {torch.__version__}; distance={args.distance} sign={args.sign} include_1d={args.include_1d}")
    rows = run_gpu(args) if torch.cuda.is_available() else run_cpu(args)
    if args.csv is not None:
        append_csv(args.csv, rows)


if __name__ == "__main__":
    main()
