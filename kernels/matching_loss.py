"""Fused layer-wise gradient-matching loss (forward and backward) for K clusters at once.

The distillation step compares, for every cluster k and every counted parameter, the rows of
the real gradient with the rows of the synthetic gradient (``kernels.reference`` has the
formula and the pure-torch reference). Done naively that is dozens of small kernels per layer
and autograd's backward through all of them; here one forward launch reads each gradient
once and one backward launch reads them once more and writes d loss / d syn.

Layout. Each per-cluster gradient [K, *shape] is used in place (made contiguous if it is
not) as [K, rows, cols]. A static *segment table* (int64 [S, 6], cached per list of shapes)
cuts every counted parameter into blocks of at most BLOCK_R rows:

    (slot, row0, n_rows, n_cols, stride_k = rows * cols, global_row0)

and a per-call *pointer table* (int64 [P, 2] forward, [P, 3] backward) holds each counted
parameter's data address for real, syn (and d syn). Program (seg, k) loads its segment's
row, casts the stored address to a typed pointer and walks its rows in BLOCK_R x BLOCK_C
tiles, so one launch covers every layer for all K clusters without a concatenated [K, P]
copy. Per (cluster, row) the forward stores dot(r, s), |r|^2, |s|^2 (12 bytes a row, read
again by the backward instead of re-reducing the rows) and the row's loss; loss[K] is the
sum of row losses (a [K, rows] torch sum: deterministic, unlike atomics).

Bytes: forward reads K*P elements of real and of syn, writes 16 bytes per (cluster, row);
backward reads both again and writes K*P elements of d syn.

Dispatch (``matching_loss``): CUDA tensors run the compiled kernels; with
``TRITON_INTERPRET=1`` in the environment *at call time* the kernels run under Triton's
interpreter (CPU tensors in place; CUDA tensors via host copies, as Triton itself does);
everything else (CPU without the interpreter, float64, real gradients that require grad)
goes to ``kernels.reference.matching_loss_reference``.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from kernels.reference import EPS, check_inputs, matching_loss_reference

logger = logging.getLogger(__name__)

# Tile sizes. On a GPU a 16 x 128 fp32 tile of each operand is 8 KiB per operand per loop
# step and program, enough bytes in flight with 4 warps (a first guess: no GPU was lent
# while this was written; benchmarks/bench_matching_loss.py measures it). The interpreter pays ~0.1 ms per Triton operation and almost
# nothing per element, so there the tile grows to hold a whole parameter where it can
# (one program per parameter and cluster).
_GPU_TILE, _GPU_MAX_BLOCK_C, _GPU_NUM_WARPS = 2048, 128, 4
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
    ptr_table_ptr,  # int64 [P, 2]: data address of real, syn for each counted parameter
    seg_table_ptr,  # int64 [S, 6]: slot, row0, n_rows, n_cols, stride_k, global_row0
    row_loss_ptr,  # fp32 [K, ROWS]: per (cluster, row) loss term
    stats_ptr,  # fp32 [3, K, ROWS]: dot(r, s), |r|^2, |s|^2 (cos only)
    n_clusters,
    n_rows_total,
    sign,
    abs_sign,
    eps,
    R_DTYPE: tl.constexpr,
    S_DTYPE: tl.constexpr,
    IS_COS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    seg = tl.program_id(0)
    k = tl.program_id(1).to(tl.int64)
    seg_row = seg_table_ptr + seg * 6
    slot = tl.load(seg_row + 0)
    row0 = tl.load(seg_row + 1)
    n_rows = tl.load(seg_row + 2)
    n_cols = tl.load(seg_row + 3)
    stride_k = tl.load(seg_row + 4)
    grow0 = tl.load(seg_row + 5)
    r_base = tl.load(ptr_table_ptr + slot * 2 + 0).to(tl.pointer_type(R_DTYPE))
    s_base = tl.load(ptr_table_ptr + slot * 2 + 1).to(tl.pointer_type(S_DTYPE))

    offs_r = tl.arange(0, BLOCK_R)
    offs_c = tl.arange(0, BLOCK_C)
    row_mask = offs_r < n_rows
    row_start = k * stride_k + (row0 + offs_r) * n_cols  # int64: K * P can pass 2^31

    # Accumulate whole tiles in fp32 and reduce once at the end (fewer reductions, and
    # pairwise-like summation across the tile columns).
    acc_rs = tl.full([BLOCK_R, BLOCK_C], 0.0, tl.float32)
    acc_rr = tl.full([BLOCK_R, BLOCK_C], 0.0, tl.float32)
    acc_ss = tl.full([BLOCK_R, BLOCK_C], 0.0, tl.float32)
    for c0 in range(0, n_cols, BLOCK_C):
        cols = c0 + offs_c
        mask = row_mask[:, None] & (cols < n_cols)[None, :]
        offs = row_start[:, None] + cols[None, :]
        r = tl.load(r_base + offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(s_base + offs, mask=mask, other=0.0).to(tl.float32)
        if IS_COS:
            acc_rs += r * s
            acc_rr += r * r
            acc_ss += s * s
        else:
            d = s - sign * r  # the difference itself, not |s|^2 - 2 sign r.s + ..: no cancellation
            acc_ss += d * d

    out = k * n_rows_total + grow0 + offs_r
    if IS_COS:
        dot = tl.reduce(acc_rs, 1, tl.standard._sum_combine)
        rr = tl.reduce(acc_rr, 1, tl.standard._sum_combine)
        ss = tl.reduce(acc_ss, 1, tl.standard._sum_combine)
        # r' = sign * r: <r', s> = sign * dot, |r'| = |sign| |r|
        denom = abs_sign * tl.sqrt(rr) * tl.sqrt(ss) + eps
        row_loss = 1.0 - sign * dot / denom
        plane = n_clusters * n_rows_total
        tl.store(stats_ptr + out, dot, mask=row_mask)
        tl.store(stats_ptr + plane + out, rr, mask=row_mask)
        tl.store(stats_ptr + 2 * plane + out, ss, mask=row_mask)
    else:
        row_loss = tl.reduce(acc_ss, 1, tl.standard._sum_combine)
    tl.store(row_loss_ptr + out, row_loss, mask=row_mask)


@triton.jit
def _matching_loss_bwd_kernel(
    ptr_table_ptr,  # int64 [P, 3]: data address of real, syn, d syn for each counted parameter
    seg_table_ptr,  # int64 [S, 6], as in the forward
    grad_loss_ptr,  # fp32 [K]: d total / d loss[k]
    stats_ptr,  # fp32 [3, K, ROWS] saved by the forward (cos only)
    n_clusters,
    n_rows_total,
    sign,
    abs_sign,
    eps,
    R_DTYPE: tl.constexpr,
    S_DTYPE: tl.constexpr,
    IS_COS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    seg = tl.program_id(0)
    k = tl.program_id(1).to(tl.int64)
    seg_row = seg_table_ptr + seg * 6
    slot = tl.load(seg_row + 0)
    row0 = tl.load(seg_row + 1)
    n_rows = tl.load(seg_row + 2)
    n_cols = tl.load(seg_row + 3)
    stride_k = tl.load(seg_row + 4)
    grow0 = tl.load(seg_row + 5)
    r_base = tl.load(ptr_table_ptr + slot * 3 + 0).to(tl.pointer_type(R_DTYPE))
    s_base = tl.load(ptr_table_ptr + slot * 3 + 1).to(tl.pointer_type(S_DTYPE))
    ds_base = tl.load(ptr_table_ptr + slot * 3 + 2).to(tl.pointer_type(S_DTYPE))

    offs_r = tl.arange(0, BLOCK_R)
    offs_c = tl.arange(0, BLOCK_C)
    row_mask = offs_r < n_rows
    row_start = k * stride_k + (row0 + offs_r) * n_cols
    g = tl.load(grad_loss_ptr + k)

    # cos: L = 1 - sign*dot / D with D = |sign| |r| |s| + eps, so per row
    #   dL/ds = -sign r / D + sign*dot * |sign||r| * s / (|s| D^2) = coef_r * r + coef_s * s.
    # |s| = 0: dot = 0 too, and s / |s| -> 0 (torch's norm backward makes the same choice).
    # mse: dL/ds = 2 (s - sign r).
    if IS_COS:
        out = k * n_rows_total + grow0 + offs_r
        plane = n_clusters * n_rows_total
        dot = tl.load(stats_ptr + out, mask=row_mask, other=0.0)
        rr = tl.load(stats_ptr + plane + out, mask=row_mask, other=0.0)
        ss = tl.load(stats_ptr + 2 * plane + out, mask=row_mask, other=0.0)
        r_norm = abs_sign * tl.sqrt(rr)
        s_norm = tl.sqrt(ss)
        denom = r_norm * s_norm + eps
        inv_s_norm = tl.where(ss > 0.0, 1.0 / tl.where(ss > 0.0, s_norm, 1.0), 0.0)
        coef_r = -g * sign / denom
        coef_s = g * sign * dot * r_norm * inv_s_norm / (denom * denom)

    for c0 in range(0, n_cols, BLOCK_C):
        cols = c0 + offs_c
        mask = row_mask[:, None] & (cols < n_cols)[None, :]
        offs = row_start[:, None] + cols[None, :]
        r = tl.load(r_base + offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(s_base + offs, mask=mask, other=0.0).to(tl.float32)
        if IS_COS:
            ds = coef_r[:, None] * r + coef_s[:, None] * s
        else:
            ds = (2.0 * g) * (s - sign * r)
        tl.store(ds_base + offs, ds.to(S_DTYPE), mask=mask)


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
class _Plan:
    """Segment table and launch shape for one list of parameter shapes."""

    slots: tuple[int, ...]  # indices (into the caller's lists) of counted parameters
    seg_table: torch.Tensor  # int64 [S, 6] on the work device
    n_segments: int
    n_rows_total: int
    block_r: int
    block_c: int
    num_warps: int


def _block_sizes(max_rows: int, max_cols: int, interpret: bool) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C) for a launch whose widest row has max_cols and tallest layer max_rows."""
    npow2 = triton.next_power_of_2
    if interpret:
        block_r = min(npow2(max_rows), _INTERP_MAX_BLOCK_R)
        return block_r, min(npow2(max_cols), max(16, _INTERP_TILE // block_r))
    block_c = min(npow2(max_cols), _GPU_MAX_BLOCK_C)
    return min(npow2(max_rows), max(1, _GPU_TILE // block_c)), block_c


@functools.lru_cache(maxsize=64)
def _plan(
    shapes: tuple[tuple[int, ...], ...], include_1d: bool, device: torch.device, interpret: bool,
    blocks: tuple[int, int] | None,
) -> _Plan:  # fmt: skip
    """Cut every counted parameter (shape without K) into row blocks; cached per shape list.

    ``blocks``: (BLOCK_R, BLOCK_C) to use instead of ``_block_sizes``' choice, or None.
    """
    slots, rows_cols = [], []
    for i, shape in enumerate(shapes):
        if len(shape) == 1:
            if not include_1d:
                continue
            rows, cols = 1, shape[0]
        else:
            rows, cols = shape[0], 1
            for d in shape[1:]:
                cols *= d
        slots.append(i)
        rows_cols.append((rows, cols))
    block_r, block_c = blocks or _block_sizes(max(r for r, _ in rows_cols), max(c for _, c in rows_cols), interpret)
    table, grow = [], 0
    for slot, (rows, cols) in enumerate(rows_cols):
        for row0 in range(0, rows, block_r):
            table.append((slot, row0, min(block_r, rows - row0), cols, rows * cols, grow + row0))
        grow += rows
    seg_table = torch.tensor(table, dtype=torch.int64, device=device)
    return _Plan(tuple(slots), seg_table, len(table), grow, block_r, block_c, _GPU_NUM_WARPS)


def _ptr_table(columns: Sequence[Sequence[torch.Tensor]], device: torch.device) -> torch.Tensor:
    """int64 [P, len(columns)] of data addresses (tensors must stay alive while it is used)."""
    rows = [[t.data_ptr() for t in ts] for ts in zip(*columns)]
    return torch.tensor(rows, dtype=torch.int64, device=device)


def _forward(
    plan: _Plan, reals: list[torch.Tensor], syns: list[torch.Tensor], sign: float, is_cos: bool, interpret: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel: loss fp32 [K] and stats fp32 [3, K, ROWS]."""
    k, device = syns[0].shape[0], syns[0].device
    row_loss = torch.empty(k, plan.n_rows_total, dtype=torch.float32, device=device)
    stats = torch.empty(3 if is_cos else 0, k, plan.n_rows_total, dtype=torch.float32, device=device)
    ptrs = _ptr_table([reals, syns], device)
    _kernel_variant("_matching_loss_fwd_kernel", interpret)[(plan.n_segments, k)](
        ptrs, plan.seg_table, row_loss, stats, k, plan.n_rows_total, sign, abs(sign), EPS,
        R_DTYPE=_KERNEL_DTYPES[reals[0].dtype], S_DTYPE=_KERNEL_DTYPES[syns[0].dtype], IS_COS=is_cos,
        BLOCK_R=plan.block_r, BLOCK_C=plan.block_c, num_warps=plan.num_warps,
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
    """Launch the backward kernel: d loss / d syn for each counted parameter."""
    k, device = syns[0].shape[0], syns[0].device
    grads = [torch.empty_like(s) for s in syns]  # every element lies in some segment
    ptrs = _ptr_table([reals, syns, grads], device)
    grad_loss = grad_loss.to(device=device, dtype=torch.float32).contiguous()  # sum()'s grad is expanded
    _kernel_variant("_matching_loss_bwd_kernel", interpret)[(plan.n_segments, k)](
        ptrs, plan.seg_table, grad_loss, stats, k, plan.n_rows_total, sign, abs(sign), EPS,
        R_DTYPE=_KERNEL_DTYPES[reals[0].dtype], S_DTYPE=_KERNEL_DTYPES[syns[0].dtype], IS_COS=is_cos,
        BLOCK_R=plan.block_r, BLOCK_C=plan.block_c, num_warps=plan.num_warps,
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
        work = plan.seg_table.device  # the host for interpreted CUDA tensors, else `device`
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


def _triton_backend(real_grads: Sequence[torch.Tensor], syn_grads: Sequence[torch.Tensor]) -> str | None:
    """'cuda', 'interpret' or None (use the reference) for these inputs."""
    tensors = [*real_grads, *syn_grads]
    device = tensors[0].device
    if any(t.device != device for t in tensors):
        return None
    if any(t.dtype not in _KERNEL_DTYPES for t in tensors):
        return None  # float64 (gradcheck) and anything exotic: the reference
    if torch.is_grad_enabled() and any(t.requires_grad for t in real_grads):
        logger.debug("real gradients require grad: using the reference so that they get one")
        return None
    if _interpret_requested():
        return "interpret"
    if device.type == "cuda":
        return "cuda"
    return None


def matching_loss(
    real_grads: Sequence[torch.Tensor],
    syn_grads: Sequence[torch.Tensor],
    *,
    sign: float = -1.0,
    include_1d: bool = False,
    distance: str = "cos",
) -> torch.Tensor:
    """Per-cluster layer-wise matching distance, fused.

    Same result as ``kernels.reference.matching_loss_reference`` (see there for the
    formula): for each cluster k, the sum over counted layers and their rows of
    ``1 - <r', s> / (|r'| |s| + eps)`` (``distance="cos"``) or of ``|s - r'|^2``
    (``distance="mse"``), with r' = sign * real row and s the synthetic row.

    Runs the fused Triton kernels on CUDA tensors, and under ``TRITON_INTERPRET=1`` (read
    at call time) through Triton's interpreter; otherwise, and for float64 inputs, mixed
    devices, or real gradients that require grad, it calls the reference.

    Args:
        real_grads: per-parameter tensors [K, *param_shape], float32/float16/bfloat16;
            constants (no gradient flows to them on the kernel path).
        syn_grads: same shapes; d loss / d syn flows back through autograd (double
            backward to the synthetic images).
        sign: -1.0 reverse matching (syn vs -real), +1.0 forward matching; any float works
            (the norm of sign * r is |sign| |r|).
        include_1d: count 1-D parameters (biases, norm affines) as one row each.
        distance: "cos" or "mse".

    Returns:
        float32 tensor [K] (float64 for float64 inputs, via the reference). Reductions are
        in fp32 whatever the input dtype.

    Raises:
        ValueError: mismatched lists or shapes, an unknown distance, or a tensor without a
            leading K dimension.
    """
    check_inputs(real_grads, syn_grads, distance)
    for i, g in enumerate(syn_grads):
        if g.dim() < 2:
            raise ValueError(f"parameter {i}: per-cluster gradient needs a leading K dimension, got {tuple(g.shape)}")
    backend = _triton_backend(real_grads, syn_grads)
    shapes = tuple(tuple(g.shape[1:]) for g in syn_grads)
    counted = [s for s in shapes if len(s) > 1 or include_1d]
    k = syn_grads[0].shape[0]
    if backend is None or k == 0 or not counted or any(0 in s for s in counted):
        return matching_loss_reference(real_grads, syn_grads, sign=sign, include_1d=include_1d, distance=distance)

    interpret = backend == "interpret"
    work = torch.device("cpu") if interpret else syn_grads[0].device
    plan = _plan(shapes, include_1d, work, interpret, _BLOCKS_OVERRIDE)
    reals = [real_grads[i].detach() for i in plan.slots]
    syns = [syn_grads[i] for i in plan.slots]
    # One dtype per side for the kernel's typed pointers; promote the odd one out (rare).
    r_dtype = functools.reduce(torch.promote_types, (t.dtype for t in reals))
    s_dtype = functools.reduce(torch.promote_types, (t.dtype for t in syns))
    reals = [t.to(r_dtype) for t in reals]
    syns = [t.to(s_dtype) for t in syns]
    return MatchingLossFunction.apply(plan, float(sign), distance == "cos", interpret, *reals, *syns)


__all__ = ["MatchingLossFunction", "matching_loss"]
