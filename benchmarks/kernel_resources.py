"""What the compiler makes of the matching-loss kernels for one GPU, without that GPU: a table per model layer.

For every counted parameter of the convnet (width 128) and ResNet-18 shapes that
``bench_matching_loss.py`` times, it compiles the forward and backward launch the launcher would make
(``kernels.aot.compile_matching_loss``: the layer's row length and tile) for ``--arch`` (90 = Hopper),
and prints registers, local memory (spills), the widest global load per thread and the occupancy those
registers allow. No GPU is needed (Triton's own ptxas and cuobjdump).

    python benchmarks/kernel_resources.py                    # fp32, sm_90
    python benchmarks/kernel_resources.py --dtype bf16 --arch 90
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_matching_loss import MODELS, param_shapes  # noqa: E402

from kernels.aot import DTYPES, aot_unavailable, compile_matching_loss  # noqa: E402


def layer_rows_cols() -> dict[str, list[tuple[int, int]]]:
    """Per model, the distinct (rows, cols) of its counted (2-D and up) parameters, in order."""
    out = {}
    for model in MODELS:
        seen: list[tuple[int, int]] = []
        for shape in param_shapes(model)[0]:
            if len(shape) > 1:
                cols = 1
                for d in shape[1:]:
                    cols *= d
                if (shape[0], cols) not in seen:
                    seen.append((shape[0], cols))
        out[model] = seen
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="fp32", choices=DTYPES)
    ap.add_argument("--distance", default="cos", choices=("cos", "mse"))
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90 = H100/H200)")
    args = ap.parse_args()
    why = aot_unavailable()
    if why:
        raise SystemExit(f"cannot compile ahead of time here: {why}")
    print(f"sm_{args.arch}, {args.dtype}, {args.distance}: per distinct (rows, cols) of each model's counted layers")
    print(f"{'model':9s} {'rows x cols':>12s} {'tile':>8s} {'kernel':6s} {'regs':>4s} {'local B':>7s} {'load B':>6s} "
          f"{'occupancy':>9s}")
    for model, layers in layer_rows_cols().items():
        for rows, cols in layers:
            for kernel in ("fwd", "bwd"):
                r = compile_matching_loss(kernel, args.dtype, args.distance, cols, rows, args.arch)
                print(f"{model:9s} {f'{rows} x {cols}':>12s} {f'{r.block_r}x{r.block_c}':>8s} {kernel:6s} "
                      f"{r.registers:4d} {r.local:7d} {r.load_bytes:6d} {r.occupancy:9.0%}")


if __name__ == "__main__":
    main()
