"""Per-cluster real gradients: one vmap(grad) call against a loop of K backward passes.

The distill stage needs grad L(theta_t; D_k) for every cluster k each step. ``--group-grads
auto`` picks vmap on CUDA and the loop on CPU; this script measures both on this machine, in
one run, and prints the ratio (median of --reps after a warm-up).

    python benchmarks/bench_group_grads.py --clusters 50 --per-cluster 20 --width 32 128

``--synthetic``: the synthetic side of a matching step instead, differentiable (images requiring grad, soft
labels, ``create_graph``), then the backward of a scalar of the gradients to the images: what each
``--target influence`` distillation step computes per block of groups.

    python benchmarks/bench_group_grads.py --synthetic --clusters 32 --per-cluster 10 --width 16 32
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from ddm_hpc.distill import per_group_grads
from ddm_hpc.models import build_model


def timed(fn, reps: int, sync) -> float:
    fn()
    sync()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clusters", type=int, default=50)
    ap.add_argument("--per-cluster", type=int, default=20)
    ap.add_argument("--width", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--synthetic", action="store_true",
                    help="time the differentiable synthetic-gradient path (forward, create_graph, backward to images)")
    args = ap.parse_args()
    if os.environ.get("DDM_ARGCHECK"):  # benchmarks/gpu_suite.sh --check: the suite's flags parse; nothing runs
        print(f"{Path(__file__).name}: arguments ok")
        return
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; torch {torch.__version__}; K={args.clusters} clusters x {args.per_cluster} images, "
          f"convnet 28x28{', synthetic (create_graph + backward)' if args.synthetic else ''}")
    for width in args.width:
        torch.manual_seed(0)
        model = build_model("convnet", 1, 10, (28, 28), width=width).to(dev)
        params = {k: v.detach() for k, v in model.named_parameters()}
        x = torch.randn(args.clusters, args.per_cluster, 1, 28, 28, device=dev)
        y = torch.randint(0, 10, (args.clusters, args.per_cluster), device=dev)
        w = torch.ones(args.clusters, args.per_cluster, device=dev)
        if args.synthetic:
            x.requires_grad_(True)
            y = torch.softmax(torch.randn(args.clusters, args.per_cluster, 10, device=dev), -1)

            def step(impl: str) -> None:
                x.grad = None
                sum(g.pow(2).sum() for g in per_group_grads(model, params, x, y, w, impl)).backward()
        else:
            def step(impl: str) -> None:
                per_group_grads(model, params, x, y, w, impl)
        res = {impl: timed(lambda: step(impl), args.reps, sync) for impl in ("vmap", "loop")}
        print(f"  width {width:4d}: vmap {res['vmap'] * 1e3:8.1f} ms  loop {res['loop'] * 1e3:8.1f} ms  "
              f"loop/vmap time ratio {res['loop'] / res['vmap']:.2f}")


if __name__ == "__main__":
    main()
