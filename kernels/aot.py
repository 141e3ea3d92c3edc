"""Ahead-of-time compilation of the kernels for a GPU that is not there, and what the compiler reports.

Triton compiles for a named target without a GPU or a CUDA driver: ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", 90, 32))`` lowers a ``@triton.jit`` function through TTIR, TTGIR, LLVM IR and
PTX to a cubin with the ``ptxas`` that the triton wheel carries. So CI can prove that every kernel
builds for Hopper (sm_90) in every dtype, and read from the result what the machine code will do:

- ``registers``, ``stack``, ``local`` (bytes of local memory: spills and register arrays), ``shared``:
  from ``cuobjdump --dump-resource-usage`` of the cubin (the ``cuobjdump`` the wheel carries);
- ``load_bytes``: the widest ``ld.global`` in the PTX, per thread (16 = ``ld.global.v4.b32``);
- ``occupancy``: the fraction of an sm_90 multiprocessor's 64 warp slots the kernel can fill, from its
  registers (65 536 per SM, allocated per warp in units of 256), warps and shared memory (228 KiB).

:func:`compile_matching_loss` builds one launch configuration of ``kernels.matching_loss``
(``tests/test_kernels/test_aot_sm90.py`` builds them all; ``benchmarks/kernel_resources.py`` prints
the table). :func:`aot_unavailable` says, in one line, why it cannot run here (no NVIDIA backend in
the triton build, or no ``ptxas``).

Room: imports ``kernels.matching_loss`` (its kernels and tile choice); only tests and benchmarks use it.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass

import triton
import triton.language as tl

from kernels.matching_loss import _GPU_NUM_WARPS, _block_sizes, _kernel_variant

_TL_DTYPES = {"fp32": tl.float32, "fp16": tl.float16, "bf16": tl.bfloat16}
_SIGNATURE = {  # argument -> Triton type, for both kernels (bwd adds dsyn_ptr and grad_loss_ptr)
    "fwd": {"real_ptr": "*{r}", "syn_ptr": "*{s}", "row_loss_ptr": "*fp32", "stats_ptr": "*fp32"},
    "bwd": {"real_ptr": "*{r}", "syn_ptr": "*{s}", "dsyn_ptr": "*{s}", "grad_loss_ptr": "*fp32",
            "stats_ptr": "*fp32"},
}
_SCALARS = {"n_rows": "i32", "row0": "i32", "n_rows_total": "i32", "plane": "i64", "n_row_blocks": "i32",
            "sign": "fp32", "abs_sign": "fp32", "eps": "fp32"}
_KERNELS = {"fwd": "_matching_loss_fwd_kernel", "bwd": "_matching_loss_bwd_kernel"}

# sm_90 limits (CUDA C Programming Guide, compute capability 9.0)
SM90_REGS, SM90_WARPS, SM90_SHARED, SM90_BLOCKS = 65536, 64, 228 * 1024, 32


@dataclass(frozen=True)
class CompiledReport:
    """What the compiler made of one kernel configuration."""

    kernel: str  # fwd or bwd
    dtype: str  # fp32, fp16 or bf16 (both sides)
    distance: str  # cos or mse
    cols: int  # COLS, the row length
    block_r: int
    block_c: int
    num_warps: int
    arch: str  # e.g. sm90
    registers: int
    stack: int
    local: int  # bytes of local memory per thread (spills, arrays indexed at run time)
    shared: int
    load_bytes: int  # widest ld.global per thread in the PTX, bytes (16 = a 16-byte vector)
    occupancy: float

    def as_row(self) -> dict[str, object]:
        return asdict(self)


def aot_unavailable() -> str | None:
    """None if kernels can be compiled ahead of time for sm_90 here, else why not (one line)."""
    try:
        from triton.backends import backends
    except ImportError as e:  # pragma: no cover - every triton 3 has it
        return f"triton {triton.__version__} has no backends registry ({e})"
    if "nvidia" not in backends:
        return f"triton {triton.__version__} was built without the NVIDIA backend (backends: {sorted(backends)})"
    for tool in ("ptxas", "cuobjdump"):
        try:
            path = getattr(triton.knobs.nvidia, tool).path
        except Exception as e:  # noqa: BLE001 - the knob raises when the binary is missing
            return f"no {tool} for sm_90 ({e}); install a triton wheel that carries it or set TRITON_{tool.upper()}_PATH"
        if not path or not os.access(path, os.X_OK):
            return f"no executable {tool} at {path!r}; set TRITON_{tool.upper()}_PATH to a CUDA {tool}"
    return None


def occupancy(registers: int, num_warps: int, shared: int) -> float:
    """Fraction of an sm_90 multiprocessor's warp slots that blocks of this kernel can fill."""
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_regs = (SM90_REGS // per_warp) // num_warps
    by_shared = SM90_SHARED // shared if shared else SM90_BLOCKS
    blocks = min(by_regs, by_shared, SM90_BLOCKS, SM90_WARPS // num_warps)
    return blocks * num_warps / SM90_WARPS


def _resources(cubin: bytes) -> dict[str, int]:
    """REG, STACK, LOCAL, SHARED of the one function in ``cubin`` (cuobjdump --dump-resource-usage)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        text = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", fh.name],
                              check=True, capture_output=True, text=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", text))
    return {k.lower(): int(v) for k, v in fields.items()}


def widest_vector_load(ptx: str) -> int:
    """Bytes of the widest ``ld.global`` in ``ptx`` per thread (``ld.global.v4.b32`` = 16; a scalar fp32 load = 4)."""
    widest = 0
    for quals in re.findall(r"\bld\.global((?:\.[\w:]+)+)", ptx):
        parts = quals.split(".")
        vec = next((int(q[1:]) for q in parts if re.fullmatch(r"v\d", q)), 1)
        bits = next((int(q[1:]) for q in reversed(parts) if re.fullmatch(r"[bfsu]\d+", q)), 0)
        widest = max(widest, vec * bits // 8)
    return widest


def compile_matching_loss(kernel: str, dtype: str = "fp32", distance: str = "cos", cols: int = 1152, rows: int = 128,
                          arch: int = 90, blocks: tuple[int, int] | None = None) -> CompiledReport:
    """Compile one launch of ``kernels.matching_loss`` for ``cuda:sm_<arch>`` and report on the result.

    Args:
        kernel: "fwd" or "bwd".
        dtype: "fp32", "fp16" or "bf16" (real and syn gradients alike).
        distance: "cos" or "mse".
        cols, rows: the layer's row length (COLS) and row count, which pick the tile as the launcher does.
        arch: compute capability x 10 (90 = Hopper).
        blocks: (BLOCK_R, BLOCK_C) instead of the launcher's choice.

    Raises:
        RuntimeError: the compile failed (the message holds the compiler's).
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    block_r, block_c = blocks or _block_sizes(rows, cols, interpret=False)
    sig = {k: v.format(r=dtype, s=dtype) for k, v in _SIGNATURE[kernel].items()}
    sig.update(_SCALARS)
    consts = {"COLS": cols, "R_DTYPE": _TL_DTYPES[dtype], "S_DTYPE": _TL_DTYPES[dtype], "IS_COS": distance == "cos",
              "BLOCK_R": block_r, "BLOCK_C": block_c}
    sig.update({k: "constexpr" for k in consts})
    fn = _kernel_variant(_KERNELS[kernel], False)
    # what the launcher's specialisation tells the compiler: tensor pointers are 16-byte aligned
    attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in sig if k.endswith("_ptr")}
    num_warps = _GPU_NUM_WARPS
    try:
        compiled = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs),
                                  target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    except Exception as e:
        raise RuntimeError(f"{kernel} {dtype} {distance} COLS={cols} for sm_{arch}: {' '.join(str(e).split())}") from e
    res = _resources(compiled.asm["cubin"])
    shared = max(res.get("shared", 0), int(compiled.metadata.shared))
    regs = res.get("reg", 0)
    return CompiledReport(kernel, dtype, distance, cols, block_r, block_c, num_warps, compiled.metadata.arch, regs,
                          res.get("stack", 0), res.get("local", 0), shared, widest_vector_load(compiled.asm["ptx"]),
                          occupancy(regs, num_warps, shared))


DTYPES = tuple(_TL_DTYPES)


__all__ = ["DTYPES", "CompiledReport", "aot_unavailable", "compile_matching_loss", "occupancy", "widest_vector_load"]
