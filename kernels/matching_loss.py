"""Fused layer-wise gradient-matching loss (forward and backward) for K clusters at once.

The distillation step compares, for every cluster k and every counted parameter, the rows of
the real gradient with the rows of the synthetic gradient (``kernels.reference`` has the
formula and the pure-torch reference). Done naively that is dozens of small kernels per layer
and autograd's backward through all of them; here one forward launch per counted parameter
reads each gradient once and one backward launch per parameter reads them once more and
writes d loss / d syn.

Layout. Each per-cluster gradient [K, *shape] is used in place (made contiguous if it is
not) as [K, rows, cols]. A *plan* (cached per list of shapes) gives each counted parameter its
own tile: BLOCK_C = the row length rounded up to a power of two (at most 128 on a GPU), BLOCK_R
= as many rows as fill a 2048-element tile, so a conv's 9-column rows fill their tile instead
of 7 % of one sized for the widest layer. The row length COLS is a compile-time constant of
the launch and the data pointers are kernel arguments (Triton specialises them as 16-byte
aligned), so row starts (k * rows + r) * COLS have known divisibility and, where COLS is a
multiple of 4, loads compile to 16-byte vector loads (``ld.global.v4``; checked ahead of time
for sm_90 by ``tests/test_kernels/test_aot_sm90.py``). One program per (row block, cluster) on a
1-D grid (x: up to 2^31 - 1 programs, so K is not bounded by CUDA's 65 535 on grid y);
offsets are 64-bit (k * rows * cols and the [3, K, ROWS] stats planes can pass 2^31).

Per (cluster, row) the forward stores dot(r, s), |r|^2, |s|^2 (12 bytes a row, read again by
the backward instead of re-reducing the rows) and the row's loss; loss[K] is the sum of row
losses (a [K, rows] torch sum: deterministic, unlike atomics).

Bytes: forward reads K*P elements of real and of syn, writes 16 bytes per (cluster, row);
backward reads both again and writes K*P elements of d syn.

Launches run under ``torch.cuda.device(tensor.device)``, so ``--device cuda:1`` computes on GPU 1
whatever the current device is.

Dispatch (``matching_loss(..., backend=)``, ``--kernel``): ``auto`` runs the compiled kernels on
CUDA tensors when Triton can build there (a C compiler and Python headers; :func:`triton_usable`),
and with ``TRITON_INTERPRET=1`` in the environment *at call time* through Triton's interpreter
(CPU tensors in place; CUDA tensors via host copies, as Triton itself does); everything else (CPU
without the interpreter, float64, real gradients that require grad) goes to
``kernels.reference.matching_loss_reference``. ``triton`` insists on the kernels (an error where
they cannot run); ``reference`` always takes the reference. The choice is logged once per kind.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from kernels.reference import EPS, check_inputs, matching_loss_reference

logger = logging.getLogger(__name__)

# Tile sizes. On a GPU a tile holds 1024 elements of each operand (8 x 128 for long rows: each of
# the 4 warps' threads issues two 16-byte loads per operand per column step). Chosen from the
# compiled sm_90 code (kernels/aot.py, no GPU lent yet): a 2048-element tile needs 80 registers
# in the forward and 112 in the backward of a 27-column layer (25-37 % of the warp slots), 1024
# needs 56 and 63 (50-56 %). DDM_MATCHING_TILE overrides it, so that one GPU session can time
# both (benchmarks/gpu_suite.sh). The interpreter pays ~0.1 ms per Triton operation and almost
# nothing per element, so there the tile grows to hold a whole parameter where it can (one
# program per parameter and cluster).
_GPU_TILE = int(os.environ.get("DDM_MATCHING_TILE", "1024"))
_GPU_MAX_BLOCK_C, _GPU_NUM_WARPS = 128, 4
_INTERP_TILE, _INTERP_MAX_BLOCK_R = 1 << 16, 256
# Tests set (BLOCK_R, BLOCK_C) here to run the GPU tiling (several row blocks per
# parameter, several column steps per row) under the interpreter.
_BLOCKS_OVERRIDE: tuple[int, int] | None = None

_KERNEL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


# Note on reductions: the kernels use ``tl.reduce(x, 1, tl.standard._sum_combine)`` (what
# ``tl.sum`` expands to) and ``tl.full`` rather than ``tl.sum``/``tl.zeros``. Those two are
# @jit helpers, fixed as compiled or interpreted when triton is first imported; calling them
# from an interpreted kernel fails if TRITON_INTERPRET was set only after that import (e.g.
# another test module imported triton first). Builtins work either way, and the interpreter
# still maps ``_sum_combine`` to a numpy sum.


@triton.jit
def _matching_loss_fwd_kernel(
    real_ptr,  # R_DTYPE [K, n_rows, COLS]: one counted parameter's real gradients, contiguous
    syn_ptr,  # S_DTYPE [K, n_rows, COLS]
    row_loss_ptr,  # fp32 [K, ROWS]: per (cluster, row) loss term, ROWS = rows of all counted parameters
    stats_ptr,  # fp32 [3, K, ROWS]: dot(r, s), |r|^2, |s|^2 (cos only)
    n_rows,  # rows of this parameter
    row0,  # its first row among all ROWS
    n_rows_total,  # ROWS
    plane,  # K * ROWS (int64 when it passes 2^31)
    n_row_blocks,  # cdiv(n_rows, BLOCK_R)
    sign,
    abs_sign,
    eps,
    COLS: tl.constexpr,
    R_DTYPE: tl.constexpr,
    S_DTYPE: tl.constexpr,
    IS_COS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    k = pid // n_row_blocks
    rb = pid - k * n_row_blocks
    rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)  # int64
    offs_c = tl.arange(0, BLOCK_C)
    row_mask = rows < n_rows
    row_start = (k * n_rows + rows) * COLS  # int64, a multiple of COLS: aligned vectors when COLS % 4 == 0

    # Accumulate whole tiles in fp32 and reduce once at the end (fewer reductions, and
    # pairwise-like summation across the tile columns).
    acc_rs = tl.full([BLOCK_R, BLOCK_C], 0.0, tl.float32)
    acc_rr = tl.full([BLOCK_R, BLOCK_C], 0.0, tl.float32)
    acc_ss = tl.full([BLOCK_R, BLOCK_C], 0.0, tl.float32)
    for c0 in range(0, COLS, BLOCK_C):
        cols = c0 + offs_c
        if COLS % BLOCK_C == 0:
            mask = row_mask[:, None]  # constant along a row: no column mask to break vectors
        else:
            mask = row_mask[:, None] & (cols < COLS)[None, :]
        offs = row_start[:, None] + cols[None, :]
        r = tl.load(real_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(syn_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if IS_COS:
            acc_rs += r * s
            acc_rr += r * r
            acc_ss += s * s
        else:
            d = s - sign * r  # the difference itself, not |s|^2 - 2 sign r.s + ..: no cancellation
            acc_ss += d * d

    out = k * n_rows_total + row0 + rows  # int64
    if IS_COS:
        dot = tl.reduce(acc_rs, 1, tl.standard._sum_combine)
        rr = tl.reduce(acc_rr, 1, tl.standard._sum_combine)
        ss = tl.reduce(acc_ss, 1, tl.standard._sum_combine)
        # r' = sign * r: <r', s> = sign * dot, |r'| = |sign| |r|
        denom = abs_sign * tl.sqrt(rr) * tl.sqrt(ss) + eps
        row_loss = 1.0 - sign * dot / denom
        tl.store(stats_ptr + out, dot, mask=row_mask)
        tl.store(stats_ptr + plane + out, rr, mask=row_mask)
        tl.store(stats_ptr + 2 * plane + out, ss, mask=row_mask)
    else:
        row_loss = tl.reduce(acc_ss, 1, tl.standard._sum_combine)
    tl.store(row_loss_ptr + out, row_loss, mask=row_mask)


@triton.jit
def _matching_loss_bwd_kernel(
    real_ptr,  # R_DTYPE [K, n_rows, COLS], as in the forward
    syn_ptr,  # S_DTYPE [K, n_rows, COLS]
    dsyn_ptr,  # S_DTYPE [K, n_rows, COLS]: d loss / d syn (written)
    grad_loss_ptr,  # fp32 [K]: d total / d loss[k]
    stats_ptr,  # fp32 [3, K, ROWS] saved by the forward (cos only)
    n_rows,
    row0,
    n_rows_total,
    plane,
    n_row_blocks,
    sign,
    abs_sign,
    eps,
    COLS: tl.constexpr,
    R_DTYPE: tl.constexpr,
    S_DTYPE: tl.constexpr,
    IS_COS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    k = pid // n_row_blocks
    rb = pid - k * n_row_blocks
    rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.arange(0, BLOCK_C)
    row_mask = rows < n_rows
    row_start = (k * n_rows + rows) * COLS
    g = tl.load(grad_loss_ptr + k)

    # cos: L = 1 - sign*dot / D with D = |sign| |r| |s| + eps, so per row
    #   dL/ds = -sign r / D + sign*dot * |sign||r| * s / (|s| D^2) = coef_r * r + coef_s * s.
    # |s| = 0: dot = 0 too, and s / |s| -> 0 (torch's norm backward makes the same choice).
    # mse: dL/ds = 2 (s - sign r).
    if IS_COS:
        out = k * n_rows_total + row0 + rows
        dot = tl.load(stats_ptr + out, mask=row_mask, other=0.0)
        rr = tl.load(stats_ptr + plane + out, mask=row_mask, other=0.0)
        ss = tl.load(stats_ptr + 2 * plane + out, mask=row_mask, other=0.0)
        r_norm = abs_sign * tl.sqrt(rr)
        s_norm = tl.sqrt(ss)
        denom = r_norm * s_norm + eps
        inv_s_norm = tl.where(ss > 0.0, 1.0 / tl.where(ss > 0.0, s_norm, 1.0), 0.0)
        coef_r = -g * sign / denom
        coef_s = g * sign * dot * r_norm * inv_s_norm / (denom * denom)

    for c0 in range(0, COLS, BLOCK_C):
        cols = c0 + offs_c
        if COLS % BLOCK_C == 0:
            mask = row_mask[:, None]
        else:
            mask = row_mask[:, None] & (cols < COLS)[None, :]
        offs = row_start[:, None] + cols[None, :]
        r = tl.load(real_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(syn_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if IS_COS:
            ds = coef_r[:, None] * r + coef_s[:, None] * s
        else:
            ds = (2.0 * g) * (s - sign * r)
        tl.store(dsyn_ptr + offs, ds.to(S_DTYPE), mask=mask)


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------


@functools.cache
def _kernel_variant(name: str, interpret: bool):
    """The named kernel compiled or interpreted, whatever TRITON_INTERPRET was at import."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    kernel = globals()[name]
    if isinstance(kernel, InterpretedFunction if interpret else JITFunction):
        return kernel
    return InterpretedFunction(kernel.fn) if interpret else JITFunction(kernel.fn)


@dataclass(frozen=True)
class _Layer:
    """One counted parameter's launch: its rows, row length and tile."""

    slot: int  # index (into the caller's lists) of the parameter
    rows: int
    cols: int  # COLS, a compile-time constant of the launch
    row0: int  # first row among all counted rows
    block_r: int
    block_c: int

    @property
    def n_row_blocks(self) -> int:
        return triton.cdiv(self.rows, self.block_r)


@dataclass(frozen=True)
class _Plan:
    """Per counted parameter, its launch; cached per list of parameter shapes."""

    layers: tuple[_Layer, ...]
    n_rows_total: int
    num_warps: int

    @property
    def slots(self) -> tuple[int, ...]:
        return tuple(layer.slot for layer in self.layers)


def _block_sizes(rows: int, cols: int, interpret: bool) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C) of one layer of ``rows`` rows of ``cols`` elements."""
    npow2 = triton.next_power_of_2
    if interpret:
        block_r = min(npow2(rows), _INTERP_MAX_BLOCK_R)
        return block_r, min(npow2(cols), max(16, _INTERP_TILE // block_r))
    block_c = min(npow2(cols), _GPU_MAX_BLOCK_C)
    return min(npow2(rows), max(1, _GPU_TILE // block_c)), block_c


@functools.lru_cache(maxsize=64)
def _plan(shapes: tuple[tuple[int, ...], ...], include_1d: bool, interpret: bool,
          blocks: tuple[int, int] | None) -> _Plan:
    """Each counted parameter (shape without K) as rows x cols with its own tile; cached per shape list.

    ``blocks``: (BLOCK_R, BLOCK_C) for every layer instead of ``_block_sizes``' choice, or None.
    """
    layers, grow = [], 0
    for i, shape in enumerate(shapes):
        if len(shape) == 1:
            if not include_1d:
                continue
            rows, cols = 1, shape[0]
        else:
            rows, cols = shape[0], 1
            for d in shape[1:]:
                cols *= d
        block_r, block_c = blocks or _block_sizes(rows, cols, interpret)
        layers.append(_Layer(i, rows, cols, grow, block_r, block_c))
        grow += rows
    return _Plan(tuple(layers), grow, _GPU_NUM_WARPS)


def _device_guard(device: torch.device):
    """``torch.cuda.device(device)`` for a CUDA device (launches then go to *its* GPU), else a no-op."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _forward(
    plan: _Plan, reals: list[torch.Tensor], syns: list[torch.Tensor], sign: float, is_cos: bool, interpret: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel per counted parameter: loss fp32 [K] and stats fp32 [3, K, ROWS]."""
    k, device = syns[0].shape[0], syns[0].device
    row_loss = torch.empty(k, plan.n_rows_total, dtype=torch.float32, device=device)
    stats = torch.empty(3 if is_cos else 0, k, plan.n_rows_total, dtype=torch.float32, device=device)
    kernel = _kernel_variant("_matching_loss_fwd_kernel", interpret)
    r_dtype, s_dtype = _KERNEL_DTYPES[reals[0].dtype], _KERNEL_DTYPES[syns[0].dtype]
    plane = k * plan.n_rows_total
    with _device_guard(device):
        for layer, r, s in zip(plan.layers, reals, syns):
            kernel[(layer.n_row_blocks * k,)](
                r, s, row_loss, stats, layer.rows, layer.row0, plan.n_rows_total, plane, layer.n_row_blocks,
                sign, abs(sign), EPS, COLS=layer.cols, R_DTYPE=r_dtype, S_DTYPE=s_dtype, IS_COS=is_cos,
                BLOCK_R=layer.block_r, BLOCK_C=layer.block_c, num_warps=plan.num_warps,
            )  # fmt: skip
    return row_loss.sum(dim=1), stats


def _backward(
    plan: _Plan,
    reals: list[torch.Tensor],
    syns: list[torch.Tensor],
    stats: torch.Tensor,
    grad_loss: torch.Tensor,
    sign: float,
    is_cos: bool,
    interpret: bool,
) -> list[torch.Tensor]:
    """Launch the backward kernel per counted parameter: d loss / d syn for each."""
    k, device = syns[0].shape[0], syns[0].device
    grads = [torch.empty_like(s) for s in syns]  # every element lies in some row block
    grad_loss = grad_loss.to(device=device, dtype=torch.float32).contiguous()  # sum()'s grad is expanded
    kernel = _kernel_variant("_matching_loss_bwd_kernel", interpret)
    r_dtype, s_dtype = _KERNEL_DTYPES[reals[0].dtype], _KERNEL_DTYPES[syns[0].dtype]
    plane = k * plan.n_rows_total
    with _device_guard(device):
        for layer, r, s, ds in zip(plan.layers, reals, syns, grads):
            kernel[(layer.n_row_blocks * k,)](
                r, s, ds, grad_loss, stats, layer.rows, layer.row0, plan.n_rows_total, plane, layer.n_row_blocks,
                sign, abs(sign), EPS, COLS=layer.cols, R_DTYPE=r_dtype, S_DTYPE=s_dtype, IS_COS=is_cos,
                BLOCK_R=layer.block_r, BLOCK_C=layer.block_c, num_warps=plan.num_warps,
            )  # fmt: skip
    return grads


class MatchingLossFunction(torch.autograd.Function):
    """loss[K] from the counted parameters' real and syn gradients; d loss / d syn only.

    ``apply(plan, sign, is_cos, interpret, *reals, *syns)``; reals are constants (their
    gradient is None), each syn gets d loss / d syn, which autograd passes on to whatever
    produced it (double backward to the synthetic images). The backward is not itself
    differentiable.
    """

    @staticmethod
    def forward(ctx, plan: _Plan, sign: float, is_cos: bool, interpret: bool, *tensors: torch.Tensor) -> torch.Tensor:
        n = len(tensors) // 2
        device = tensors[0].device
        work = torch.device("cpu") if interpret else device  # interpreted CUDA tensors run on host copies
        # Normalise strides only; a no-op for the contiguous [K, *shape] that vmap returns.
        reals = [t.to(work).contiguous() for t in tensors[:n]]
        syns = [t.to(work).contiguous() for t in tensors[n:]]
        loss, stats = _forward(plan, reals, syns, sign, is_cos, interpret)
        ctx.save_for_backward(stats, *reals, *syns)
        ctx.plan, ctx.sign, ctx.is_cos, ctx.interpret, ctx.n, ctx.device = plan, sign, is_cos, interpret, n, device
        return loss.to(device)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        stats, *saved = ctx.saved_tensors
        n = ctx.n
        grads = _backward(ctx.plan, saved[:n], saved[n:], stats, grad_loss, ctx.sign, ctx.is_cos, ctx.interpret)
        grads = [g.to(ctx.device) for g in grads]
        return (None, None, None, None, *([None] * n), *grads)


# --------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------


def _interpret_requested() -> bool:
    """TRITON_INTERPRET as set now (triton's knob reads the environment on every access)."""
    return bool(triton.knobs.runtime.interpret)


BACKENDS = ("auto", "triton", "reference")


@functools.cache
def triton_usable() -> str | None:
    """None if Triton can build its CUDA launcher on this node, else why not (checked once per process).

    Triton compiles a small C launcher per kernel signature at first use: it needs a C compiler (``$CC``,
    gcc or clang) and the Python headers (``Python.h``). A node without them fails at the first launch,
    deep inside the distill stage; ``--kernel auto`` checks first and takes the reference instead.
    """
    if getattr(getattr(triton.knobs, "build", None), "impl", None):
        return None  # a custom build function replaces Triton's compiler call
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")
    if not cc or not shutil.which(cc.split()[0]):
        return "no C compiler for Triton's launcher (set CC, or install gcc or clang)"
    scheme = sysconfig.get_default_scheme()  # the include directory as triton.runtime.build finds it
    include = sysconfig.get_paths(scheme="posix_prefix" if scheme == "posix_local" else scheme).get("include", "")
    if not os.path.exists(os.path.join(include, "Python.h")):
        return f"no Python.h under {include} for Triton's launcher (install the python3-dev package)"
    return None


@functools.cache
def _log_choice(choice: str, reason: str, level: int = logging.INFO) -> None:
    """Log each (choice, reason) once per process."""
    logger.log(level, "matching loss: %s (%s)", choice, reason)


def _triton_backend(real_grads: Sequence[torch.Tensor], syn_grads: Sequence[torch.Tensor],
                    backend: str = "auto") -> str | None:
    """'cuda', 'interpret' or None (use the reference) for these inputs and ``backend`` (``--kernel``).

    Raises:
        ValueError: ``backend="triton"`` on inputs the kernels cannot take (the message says which and why).
    """
    if backend not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        _log_choice("reference", "--kernel reference")
        return None
    forced = backend == "triton"

    def reference(why: str) -> None:
        """The reference for ``why`` under auto; under triton, the error naming it."""
        if forced:
            raise ValueError(f"--kernel triton: {why}; use --kernel auto or reference")
        logger.debug("matching loss: reference (%s)", why)

    tensors = [*real_grads, *syn_grads]
    device = tensors[0].device
    if any(t.device != device for t in tensors):
        return reference(f"gradients on several devices ({sorted({str(t.device) for t in tensors})})")
    if any(t.dtype not in _KERNEL_DTYPES for t in tensors):
        return reference(f"dtype {sorted({str(t.dtype) for t in tensors})} has no kernel (float32/16, bfloat16)")
    if torch.is_grad_enabled() and any(t.requires_grad for t in real_grads):
        return reference("real gradients require grad; the kernel treats them as constants")
    if _interpret_requested():
        _log_choice("Triton interpreter", "TRITON_INTERPRET=1")
        return "interpret"
    if device.type != "cuda":
        if forced:
            return reference(f"tensors on {device}: the compiled kernels need CUDA tensors (or TRITON_INTERPRET=1)")
        _log_choice("reference", f"{device.type.upper()} tensors")
        return None
    why = triton_usable()
    if why is not None:
        if forced:
            return reference(why)
        _log_choice("reference on CUDA tensors", why, logging.WARNING)
        return None
    _log_choice("fused Triton kernels", f"CUDA tensors, triton {triton.__version__}")
    return "cuda"


def matching_loss(
    real_grads: Sequence[torch.Tensor],
    syn_grads: Sequence[torch.Tensor],
    *,
    sign: float = -1.0,
    include_1d: bool = False,
    distance: str = "cos",
    backend: str = "auto",
) -> torch.Tensor:
    """Per-cluster layer-wise matching distance, fused.

    Same result as ``kernels.reference.matching_loss_reference`` (see there for the
    formula): for each cluster k, the sum over counted layers and their rows of
    ``1 - <r', s> / (|r'| |s| + eps)`` (``distance="cos"``) or of ``|s - r'|^2``
    (``distance="mse"``), with r' = sign * real row and s the synthetic row.

    ``backend="auto"`` runs the fused Triton kernels on CUDA tensors (where Triton can build:
    :func:`triton_usable`), and under ``TRITON_INTERPRET=1`` (read at call time) through Triton's
    interpreter; otherwise, and for float64 inputs, mixed devices, or real gradients that require
    grad, it calls the reference. ``"triton"`` raises where the kernels cannot run; ``"reference"``
    always calls the reference.

    Args:
        real_grads: per-parameter tensors [K, *param_shape], float32/float16/bfloat16;
            constants (no gradient flows to them on the kernel path).
        syn_grads: same shapes; d loss / d syn flows back through autograd (double
            backward to the synthetic images).
        sign: -1.0 reverse matching (syn vs -real), +1.0 forward matching; any float works
            (the norm of sign * r is |sign| |r|).
        include_1d: count 1-D parameters (biases, norm affines) as one row each.
        distance: "cos" or "mse".
        backend: "auto", "triton" or "reference" (``--kernel``).

    Returns:
        float32 tensor [K] (float64 for float64 inputs, via the reference). Reductions are
        in fp32 whatever the input dtype.

    Raises:
        ValueError: mismatched lists or shapes, an unknown distance or backend, a tensor without a
            leading K dimension, or ``backend="triton"`` on inputs the kernels cannot take.
    """
    check_inputs(real_grads, syn_grads, distance)
    for i, g in enumerate(syn_grads):
        if g.dim() < 2:
            raise ValueError(f"parameter {i}: per-cluster gradient needs a leading K dimension, got {tuple(g.shape)}")
    backend = _triton_backend(real_grads, syn_grads, backend)
    shapes = tuple(tuple(g.shape[1:]) for g in syn_grads)
    counted = [s for s in shapes if len(s) > 1 or include_1d]
    k = syn_grads[0].shape[0]
    if backend is None or k == 0 or not counted or any(0 in s for s in counted):
        return matching_loss_reference(real_grads, syn_grads, sign=sign, include_1d=include_1d, distance=distance)

    interpret = backend == "interpret"
    plan = _plan(shapes, include_1d, interpret, _BLOCKS_OVERRIDE)
    reals = [real_grads[i].detach() for i in plan.slots]
    syns = [syn_grads[i] for i in plan.slots]
    # One dtype per side for the kernel's typed pointers; promote the odd one out (rare).
    r_dtype = functools.reduce(torch.promote_types, (t.dtype for t in reals))
    s_dtype = functools.reduce(torch.promote_types, (t.dtype for t in syns))
    reals = [t.to(r_dtype) for t in reals]
    syns = [t.to(s_dtype) for t in syns]
    return MatchingLossFunction.apply(plan, float(sign), distance == "cos", interpret, *reals, *syns)


__all__ = ["BACKENDS", "MatchingLossFunction", "matching_loss", "triton_usable"]
