"""The matching-loss kernels compile ahead of time for Hopper (sm_90), in fp32, fp16 and bf16, without a GPU.

``kernels.aot`` runs Triton's whole pipeline down to a cubin with the ``ptxas`` the triton wheel carries, so
a kernel that would not build for an H100/H200 fails here, in CI. The compiled code is also checked for what
the kernel's design promises: no local memory (no spills), rows whose length is a multiple of 4 read with
16-byte vector loads, and a register count that leaves at least half of the warp slots (the tile choice in
kernels/matching_loss.py). Not marked ``gpu``: nothing here needs one. Skipped, with the reason, only where the
triton build has no NVIDIA backend or no ptxas/cuobjdump (``kernels.aot.aot_unavailable``).
"""
from __future__ import annotations

import pytest

from kernels.aot import (
    DTYPES,
    aot_unavailable,
    compile_matching_loss,
    occupancy,
    widest_vector_load,
)

REASON = aot_unavailable()
needs_aot = pytest.mark.skipif(REASON is not None, reason=f"cannot compile for sm_90 here: {REASON}")

# Row lengths: 1152 (a 128-channel 3x3 conv: 9 column steps of 128, no column mask), 27 (the first conv of an
# RGB net: one masked step, rows not 16-byte aligned), 2048 (the convnet's classifier).
CONFIGS = [(k, dt, "cos", 1152) for k in ("fwd", "bwd") for dt in DTYPES]
CONFIGS += [("fwd", "fp32", "mse", 2048), ("bwd", "fp32", "mse", 2048), ("fwd", "fp32", "cos", 27),
            ("bwd", "fp32", "cos", 27)]


@needs_aot
@pytest.mark.parametrize("kernel, dtype, distance, cols", CONFIGS, ids=["-".join(map(str, c)) for c in CONFIGS])
def test_compiles_for_sm90(kernel, dtype, distance, cols, record_property):
    rep = compile_matching_loss(kernel, dtype, distance, cols)
    for key, value in rep.as_row().items():
        record_property(key, value)  # registers, spills, occupancy in the junit XML
    print(f"{kernel} {dtype} {distance} COLS={cols}: {rep.registers} registers, {rep.local} B local, "
          f"{rep.load_bytes} B loads, occupancy {rep.occupancy:.0%}")
    assert rep.arch == "sm90"
    assert rep.local == 0 and rep.stack == 0, f"spills or a run-time indexed array: {rep}"
    assert 0 < rep.registers <= 128, rep
    assert rep.occupancy >= 0.5, rep
    if cols % 4 == 0:
        assert rep.load_bytes == 16, f"rows of {cols} elements should load 16 bytes per thread: {rep}"


def test_occupancy_formula():
    """sm_90: 65 536 registers per SM, per-warp allocation in units of 256, 64 warps, 32 blocks."""
    assert occupancy(32, 4, 0) == 1.0  # 32 regs: 64 warps fit
    assert occupancy(80, 4, 1024) == 24 / 64  # 2560 per warp -> 25 warps -> 6 blocks of 4
    assert occupancy(106, 4, 1024) == 16 / 64  # the 99-117 registers: ~25 %
    assert occupancy(255, 4, 0) == 8 / 64


def test_widest_vector_load_reads_ptx():
    assert widest_vector_load("ld.global.b32 %r1, [%rd1];") == 4
    assert widest_vector_load("ld.global.v4.b32 {%r1, %r2, %r3, %r4}, [%rd2];\nld.global.b64 %rd3") == 16
    assert widest_vector_load("@%p1 ld.global.L1::evict_last.v2.b32 {%r1, %r2}, [%rd1];") == 8
    assert widest_vector_load("st.global.v4.b32 [%rd1], {%r1, %r2, %r3, %r4};") == 0
