"""Perturbation fine-tunings per second: the batched vmap path against a Python loop, same work.

The attribute stage fine-tunes one copy of theta_tau per perturbation on the removed clusters'
synsets (T full-batch SGD steps) and evaluates it. ``attribute.finetune_many`` stacks the copies
and runs one ``vmap(grad(...))`` per step, in chunks chosen by ``attribute.auto_chunk`` from free
memory; the baseline here is the loop a user would write: per perturbation, T autograd steps on
the plain module. Both start from the same parameters and data, the outputs are compared (max
absolute difference of the softmax), and the ratio is measured in one run, after a warm-up.
Peak memory: ``torch.cuda.max_memory_allocated`` on GPU; on CPU the resident-set increase above
the start of the call (sampled, see ``ddm_hpc.utils.PeakRSS``).

    python benchmarks/bench_finetune.py            # GPU size: 256 perturbations, T = 30, CIFAR-sized images
    python benchmarks/bench_finetune.py --quick    # CPU size: seconds per model
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call

from ddm_hpc.unlearn import FinetuneSpec, auto_chunk, finetune_many
from ddm_hpc.utils import PeakRSS
from ddm_hpc.models import build_model


def finetune_loop(model, theta, syn_x, syn_y, spec: FinetuneSpec, steps: int, lr: float, eval_x) -> torch.Tensor:
    """Baseline: one perturbed model at a time, plain autograd; float32 [M, E, L] softmax on CPU."""
    outs = []
    for rows, w in zip(spec.rows, spec.weights):
        params = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
        xb, yb, wb = syn_x[rows], syn_y[rows], w.to(syn_x.device)
        for _ in range(steps):
            loss = (F.cross_entropy(functional_call(model, params, (xb,)), yb, reduction="none") * wb).sum()
            grads = torch.autograd.grad(loss, list(params.values()))
            with torch.no_grad():
                params = {k: (v - lr * g).requires_grad_(True) for (k, v), g in zip(params.items(), grads)}
        with torch.no_grad():
            outs.append(functional_call(model, params, (eval_x,)).softmax(-1).float().cpu())
    return torch.stack(outs)


def measure(fn, device: torch.device) -> tuple[float, int, torch.Tensor]:
    """(seconds, peak bytes, result) of one call."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t0, torch.cuda.max_memory_allocated() - base, out
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        out = fn()
        t = time.perf_counter() - t0
    return t, mem.delta, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CPU size: 64 convnet / 8 resnet18 perturbations, T = 5, width 16")
    ap.add_argument("--models", nargs="+", default=["convnet", "resnet18"])
    ap.add_argument("--perturbations", type=int, default=256, help="M perturbed models")
    ap.add_argument("--steps", type=int, default=30, help="T fine-tune steps")
    ap.add_argument("--removed", type=int, default=1, help="clusters removed per perturbation (leave-one-out: 1)")
    ap.add_argument("--ipc", type=int, default=1)
    ap.add_argument("--eval", type=int, default=64, help="query + validation images evaluated per model")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--width", type=int, default=0, help="model width; 0 = the model's default")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--one", nargs=3, metavar=("ARCH", "PATH", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if os.environ.get("DDM_ARGCHECK"):  # benchmarks/gpu_suite.sh --check: the suite's flags parse; nothing runs
        print(f"{Path(__file__).name}: arguments ok")
        return
    dev = torch.device(args.device)
    if args.quick:
        args.steps, args.eval, args.width = 5, 16, args.width or 16
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    if not args.one:
        print(f"device: {name}; torch {torch.__version__}; {args.channels}x{args.image_size}x{args.image_size} images, "
              f"{args.classes} classes, T = {args.steps}, {args.removed} cluster(s) x {args.ipc} image(s) removed, "
              f"{args.eval} eval images")
    if args.one:
        arch, which, out = args.one
        t, peak, probs, m, chunk, n_params = run_one(arch, which, args, dev)
        torch.save({"seconds": t, "peak": peak, "probs": probs, "m": m, "chunk": chunk, "n_params": n_params}, out)
        return
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.models:
            res = {}
            for which in ("batched", "loop"):  # each in a fresh process: freed memory cannot hide allocations
                out = f"{tmp}/{arch}-{which}.pt"
                cmd = [sys.executable, __file__, *sys.argv[1:], "--one", arch, which, out]
                done = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if done.returncode:
                    raise SystemExit(f"{arch} {which} failed: {done.stderr.strip().splitlines()[-1]}")
                res[which] = torch.load(out)
            b, lp = res["batched"], res["loop"]
            diff = (b["probs"] - lp["probs"]).abs().max().item()
            m = b["m"]
            print(f"  {arch:9s} {b['n_params'] / 1e6:6.2f} M params, {m} perturbations, auto chunk {b['chunk']}:")
            for label, r in (("batched (vmap)", b), ("python loop   ", lp)):
                print(f"    {label} {m / r['seconds']:9.2f} fine-tunings/s  ({r['seconds']:7.2f} s, peak "
                      f"+{r['peak'] / 2**20:7.1f} MiB)")
            print(f"    batched/loop throughput {lp['seconds'] / b['seconds']:.2f}x; max |softmax difference| "
                  f"{diff:.2e} (float32 rounding, amplified by the T steps)")


def run_one(arch: str, which: str, args: argparse.Namespace, dev: torch.device):
    """One measured call of one path (after a 2-model warm-up): (s, peak bytes, probs, M, chunk, n_params)."""
    m = args.perturbations if not args.quick else (64 if arch == "convnet" else 8)
    torch.manual_seed(0)
    kw = {"width": args.width} if args.width else {}
    model = build_model(arch, args.channels, args.classes, (args.image_size,) * 2, **kw).to(dev)
    theta = {k: v.detach() for k, v in model.named_parameters()}
    n_params = sum(v.numel() for v in theta.values())
    k = max(m, args.removed)  # synset groups
    syn_x = torch.randn(k * args.ipc, args.channels, args.image_size, args.image_size, device=dev)
    syn_y = torch.randint(0, args.classes, (k * args.ipc,), device=dev)
    g = torch.Generator().manual_seed(1)
    groups = torch.stack([torch.randperm(k, generator=g)[:args.removed] for _ in range(m)])
    rows = (groups[:, :, None] * args.ipc + torch.arange(args.ipc)).reshape(m, -1)
    spec = FinetuneSpec(rows, torch.full(rows.shape, 1.0 / args.ipc))
    eval_x = torch.randn(args.eval, args.channels, args.image_size, args.image_size, device=dev)
    chunk = auto_chunk(model, n_params, max(rows.shape[1], min(args.eval, 256)), eval_x, dev)
    lr = 0.01

    def call(spec: FinetuneSpec) -> torch.Tensor:
        if which == "batched":
            return finetune_many(model, theta, syn_x, syn_y, spec, args.steps, lr, 1.0, eval_x, chunk, dev,
                                 show_progress=False)
        return finetune_loop(model, theta, syn_x, syn_y, spec, args.steps, lr, eval_x)

    call(FinetuneSpec(rows[:2], spec.weights[:2]))
    t, peak, probs = measure(lambda: call(spec), dev)
    return t, peak, probs, m, chunk, n_params

if __name__ == "__main__":
    main()
