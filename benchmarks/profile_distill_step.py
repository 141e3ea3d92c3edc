"""Profile one distillation step: per-cluster real and synthetic gradients, matching loss, backward.

    python benchmarks/profile_distill_step.py --out /tmp/ddm_hpc_profile/distill_step.json
    # open the trace in https://ui.perfetto.dev or chrome://tracing

The step is the one the distill stage runs for a chunk of K clusters: per-cluster gradients
of a ConvNet (ddm_hpc.models' convnet when importable, else the plain torch.nn copy below)
on real batches (no grad) and on synthetic images (differentiable), via
``vmap(grad(cross_entropy))``; ``kernels.matching_loss`` between them; ``backward`` to the
synthetic images (double backward through the model); an SGD step on the images. One
warm-up step (Triton compilation, cuDNN autotuning) runs before the profiled ones.

It writes a Chrome trace to ``--out``, prints the top operators/kernels by device time
(CPU time without a GPU), and prints the ``ncu`` command that profiles the fused kernel
alone. Without a GPU the matching loss runs the pure-torch reference (or the Triton
interpreter when TRITON_INTERPRET=1), which the script says.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
from pathlib import Path

if not (Path("/proc/driver/nvidia").exists() or Path("/dev/nvidiactl").exists()):
    # No NVIDIA driver: the profiler's library (kineto) would print "ERROR: gpuGetDeviceCount failed" and its
    # start/stop trace lines on a CPU-only run, which is not an error here. Level 6 silences both; it must be set
    # before torch loads kineto. With a driver its messages are kept (they matter on a GPU).
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.profiler import ProfilerActivity, profile, record_function

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from kernels import matching_loss  # noqa: E402


def plain_convnet(in_channels: int, num_classes: int, size: int, width: int, depth: int) -> nn.Module:
    """DC's ConvNet in plain torch.nn: depth x [conv3x3, instance norm, ReLU, avgpool 2] + Linear."""
    layers: list[nn.Module] = []
    c, s = in_channels, size + (4 if size == 28 else 0)  # 28x28 gets padding 3: 28 -> 32
    for d in range(depth):
        layers += [nn.Conv2d(c, width, 3, padding=3 if d == 0 and size == 28 else 1),
                   nn.GroupNorm(width, width, affine=True), nn.ReLU(), nn.AvgPool2d(2)]
        c, s = width, s // 2
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(width * s * s, num_classes))


def build(args) -> tuple[nn.Module, str]:
    """The model and where it came from."""
    try:
        from ddm_hpc.models import build_model

        model = build_model("convnet", args.channels, args.classes, (args.size, args.size),
                            width=args.width, depth=args.depth)
        return model, "ddm_hpc.models.convnet"
    except Exception as exc:  # the models module may be missing or mid-edit
        return plain_convnet(args.channels, args.classes, args.size, args.width, args.depth), \
            f"plain torch.nn convnet ({type(exc).__name__} importing ddm_hpc.models)"


def per_cluster_grads(model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor):
    """[K, *param_shape] per parameter: grad of each cluster's mean cross-entropy."""

    def ce(p, xb, yb):
        return F.cross_entropy(functional_call(model, p, (xb,)), yb)

    g = vmap(grad(ce), in_dims=(None, 0, 0))(params, x, y)
    return [g[name] for name in params]


def distill_step(model, params, x_real, y_real, images, y_syn, args) -> torch.Tensor:
    """One matching step on all K clusters; updates ``images`` in place, returns loss [K]."""
    with record_function("real_grads"), torch.no_grad():
        real = per_cluster_grads(model, params, x_real, y_real)
    with record_function("syn_grads"):
        syn = per_cluster_grads(model, params, images, y_syn)
    with record_function("matching_loss"):
        loss = matching_loss(real, syn, sign=args.sign, include_1d=args.include_1d, distance=args.distance)
    with record_function("backward_to_images"):
        images.grad = None
        loss.sum().backward()
    with record_function("image_update"), torch.no_grad():
        images -= args.lr * images.grad
    return loss.detach()


def ncu_command(args) -> str:
    """The Nsight Compute line that profiles the fused kernels (forward, forward, backward)."""
    bench = REPO / "benchmarks" / "bench_matching_loss.py"
    cmd = ["ncu", "--kernel-name", "regex:_matching_loss", "--launch-count", "3", "--set", "full",
           "-o", "matching_loss_k{}".format(args.k), sys.executable, str(bench), "--models", "convnet",
           "--ks", str(args.k), "--providers", "triton", "--once"]
    return " ".join(shlex.quote(c) for c in cmd)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    gpu = torch.cuda.is_available()
    p.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "ddm_hpc_profile" / "distill_step_trace.json",
                   help="Chrome/Perfetto trace JSON to write (default: %(default)s)")
    p.add_argument("--k", type=int, default=100 if gpu else 4, help="clusters per step")
    p.add_argument("--ipc", type=int, default=10, help="synthetic images per cluster")
    p.add_argument("--batch-real", type=int, default=128 if gpu else 16, help="real images per cluster")
    p.add_argument("--width", type=int, default=128 if gpu else 32)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--size", type=int, default=28, help="square image size")
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--distance", default="cos", choices=["cos", "mse"])
    p.add_argument("--sign", type=float, default=-1.0)
    p.add_argument("--include-1d", action="store_true")
    p.add_argument("--lr", type=float, default=0.1, help="SGD step on the images")
    p.add_argument("--steps", type=int, default=1, help="profiled steps (after one warm-up step)")
    p.add_argument("--row-limit", type=int, default=15, help="rows of the top-kernels table")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if device == "cpu":
        print("no CUDA GPU: profiling on the CPU; matching_loss runs "
              + ("the Triton kernels under the interpreter (TRITON_INTERPRET=1)" if interpret
                 else "the pure-torch reference (set TRITON_INTERPRET=1 to interpret the kernels)"))
    torch.manual_seed(0)
    model, source = build(args)
    model = model.to(device)
    params = {n: p.detach() for n, p in model.named_parameters()}
    print(f"model: {source}, {sum(p.numel() for p in params.values())} parameters; "
          f"K={args.k} clusters, {args.batch_real} real and {args.ipc} synthetic images each")
    shape = (args.channels, args.size, args.size)
    x_real = torch.randn(args.k, args.batch_real, *shape, device=device)
    y_real = torch.randint(0, args.classes, (args.k, args.batch_real), device=device)
    images = torch.randn(args.k, args.ipc, *shape, device=device, requires_grad=True)
    y_syn = torch.randint(0, args.classes, (args.k, args.ipc), device=device)

    distill_step(model, params, x_real, y_real, images, y_syn, args)  # warm-up: compile, autotune
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(args.steps):
            loss = distill_step(model, params, x_real, y_real, images, y_syn, args)
        if device == "cuda":
            torch.cuda.synchronize()
    print(f"loss mean over clusters: {loss.mean().item():.4f}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(args.out))
    print(f"wrote Chrome trace {args.out} (open in https://ui.perfetto.dev)")
    sort_by = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort_by, row_limit=args.row_limit))
    print("profile the fused kernels alone with Nsight Compute:")
    print("  " + ncu_command(args))


if __name__ == "__main__":
    main()
