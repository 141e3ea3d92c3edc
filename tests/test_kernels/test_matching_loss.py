"""Fused matching loss (kernels/matching_loss.py) against the pure-torch reference.

On a machine without CUDA every test runs the Triton kernels through the interpreter: the
``_interpret_on_cpu`` fixture sets TRITON_INTERPRET=1 for each test and restores it after,
so the setting does not leak into other test files (``matching_loss`` reads the variable at
call time and copes with triton having been imported before it was set). With CUDA the same
tests run the compiled kernels on the GPU, plus the ``gpu``-marked half-precision ones (the
interpreter gets bf16 arithmetic wrong).
"""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from kernels import matching_loss
from kernels.reference import matching_loss_reference

ml = importlib.import_module("kernels.matching_loss")  # the module (the package attribute is the function)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (atol, rtol) per dtype, for the loss [K] and for d loss / d syn. Both sides read the same
# values and reduce in fp32; only the summation order differs (the reference per layer, the
# kernel per tile then over rows), so fp32 agrees to ~1e-6 relative (measured <= 3e-7 on the
# loss, <= 3e-7 of the largest gradient entry). Half-precision gradients are rounded to
# their dtype on both sides: one ulp apart at most.
TOLERANCES = {
    torch.float32: {"loss": (1e-4, 1e-5), "grad": (1e-6, 1e-4)},
    torch.float16: {"loss": (1e-3, 1e-4), "grad": (1e-4, 2e-3)},
    torch.bfloat16: {"loss": (1e-3, 1e-4), "grad": (1e-3, 1.6e-2)},
}

# Odd layer shapes: conv [128, 3, 3, 3] (27-element rows), [5, 123, 123] (15129-element rows),
# linear [10, 2048], 1-D [37] (one row when include_1d). K = 100 keeps the layers small: the
# interpreter costs ~3 ms per program and there is one per (row block, cluster).
CONV, ODD, LINEAR, BIAS = (128, 3, 3, 3), (5, 123, 123), (10, 2048), (37,)
CASES = [
    (1, [CONV]),
    (7, [CONV, BIAS]),
    (1, [ODD]),
    (7, [LINEAR, (10,)]),
    (7, [CONV, BIAS, LINEAR, (10,)]),
    (100, [(16, 3, 3, 3), (10,)]),
]


@pytest.fixture(autouse=True)
def _interpret_on_cpu(monkeypatch):
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def _grads(k, shapes, dtype=torch.float32, seed=0, device=DEVICE):
    """Random per-cluster real grads and leaf syn grads [K, *shape] (syn requires grad)."""
    g = torch.Generator().manual_seed(seed)
    real = [torch.randn(k, *s, generator=g).to(device, dtype) for s in shapes]
    syn = [torch.randn(k, *s, generator=g).to(device, dtype).requires_grad_() for s in shapes]
    return real, syn


def _loss_and_grads(fn, real, syn, grad_out, **kw):
    """fn's loss and d(loss . grad_out)/d syn (zeros where a layer does not count)."""
    syn = [s.detach().clone().requires_grad_() for s in syn]
    loss = fn(real, syn, **kw)
    loss.backward(grad_out)
    return loss.detach(), [s.grad if s.grad is not None else torch.zeros_like(s) for s in syn]


def _assert_matches_reference(real, syn, dtype=torch.float32, grad_seed=1, **kw):
    """Kernel and reference agree on the loss and on d loss / d syn; nothing is NaN."""
    k = real[0].shape[0]
    grad_out = torch.randn(k, generator=torch.Generator().manual_seed(grad_seed)).to(real[0].device)
    got, got_grads = _loss_and_grads(matching_loss, real, syn, grad_out, **kw)
    want, want_grads = _loss_and_grads(matching_loss_reference, real, syn, grad_out, **kw)
    assert got.shape == (k,) and got.dtype == torch.float32
    atol, rtol = TOLERANCES[dtype]["loss"]
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    atol, rtol = TOLERANCES[dtype]["grad"]
    for i, (a, b) in enumerate(zip(got_grads, want_grads)):
        assert not a.isnan().any(), f"NaN in d loss / d syn[{i}]"
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"d loss / d syn[{i}]: {m}")


def _uses_kernel(real, syn, **kw) -> bool:
    return isinstance(matching_loss(real, syn, **kw).grad_fn, ml.MatchingLossFunction._backward_cls)


@pytest.mark.parametrize("distance", ["cos", "mse"])
@pytest.mark.parametrize("include_1d", [False, True])
@pytest.mark.parametrize("sign", [-1.0, 1.0])
@pytest.mark.parametrize("k, shapes", CASES, ids=[f"K{k}-" + "+".join("x".join(map(str, s)) for s in ss) for k, ss in CASES])
def test_matches_reference(k, shapes, sign, include_1d, distance):
    real, syn = _grads(k, shapes)
    assert _uses_kernel(real, syn, sign=sign, include_1d=include_1d, distance=distance)
    _assert_matches_reference(real, syn, sign=sign, include_1d=include_1d, distance=distance)


@pytest.mark.parametrize("distance", ["cos", "mse"])
@pytest.mark.parametrize("sign", [0.5, -2.0])
def test_general_float_sign(sign, distance):
    """|sign * r| = |sign| |r|: any float sign, not only +-1."""
    real, syn = _grads(3, [CONV, LINEAR, BIAS])
    _assert_matches_reference(real, syn, sign=sign, include_1d=True, distance=distance)


@pytest.mark.parametrize("distance", ["cos", "mse"])
@pytest.mark.parametrize(
    "blocks, shapes",
    [((16, 128), (CONV, ODD, LINEAR, BIAS)), ((4, 32), (CONV, (10, 203), BIAS))],  # ODD at 4 x 32: too slow interpreted
)
def test_gpu_tiling(monkeypatch, blocks, shapes, distance):
    """Several row blocks per parameter and several column steps per row (the GPU tiling)."""
    monkeypatch.setattr(ml, "_BLOCKS_OVERRIDE", blocks)
    plan = ml._plan(shapes, True, DEVICE == "cpu", blocks)
    assert all((layer.block_r, layer.block_c) == blocks for layer in plan.layers)
    assert sum(layer.n_row_blocks for layer in plan.layers) > len(shapes)
    real, syn = _grads(2, shapes)
    _assert_matches_reference(real, syn, include_1d=True, distance=distance)


def test_non_contiguous_inputs():
    """Strided views (a transposed gradient, a sliced cluster dim) give the reference's answer."""
    g = torch.Generator().manual_seed(3)
    real = [torch.randn(6, 7, 5, generator=g).transpose(1, 2), torch.randn(12, 10, 9, generator=g)[::2]]
    syn = [torch.randn(6, 7, 5, generator=g).transpose(1, 2), torch.randn(12, 10, 9, generator=g)[::2]]
    real, syn = [r.to(DEVICE) for r in real], [s.to(DEVICE).requires_grad_() for s in syn]
    assert not syn[0].is_contiguous() and not syn[1].is_contiguous()
    _assert_matches_reference(real, syn)
    _assert_matches_reference(real, syn, distance="mse")


@pytest.mark.parametrize("sign", [-1.0, 1.0])
def test_zero_rows_give_no_nan(sign):
    """A zero real row and a zero syn row: finite loss and gradient, equal to the reference."""
    real, syn = _grads(3, [CONV, LINEAR])
    with torch.no_grad():
        real[0][0, 5].zero_()  # one real row of cluster 0
        syn[0][1, 7].zero_()  # one syn row of cluster 1
        syn[1][2].zero_()  # every syn row of one layer in cluster 2
        real[1][2, 3].zero_()  # ... and a real row there too: both zero
    loss = matching_loss(real, syn, sign=sign)
    loss.sum().backward()
    assert torch.isfinite(loss).all()
    assert all(torch.isfinite(s.grad).all() for s in syn)
    _assert_matches_reference(real, syn, sign=sign)


@pytest.mark.parametrize("distance", ["cos", "mse"])
@pytest.mark.parametrize("sign", [-1.0, 1.0])
def test_reference_gradcheck(sign, distance):
    """The reference's d loss / d syn (what the kernel is compared with) is right, in float64."""
    g = torch.Generator().manual_seed(4)
    real = [torch.randn(2, *s, generator=g, dtype=torch.float64) for s in [(3, 2, 2), (4, 5), (3,)]]
    syn = [torch.randn(2, *s, generator=g, dtype=torch.float64, requires_grad=True) for s in [(3, 2, 2), (4, 5), (3,)]]

    def fn(*syn_):
        return matching_loss_reference(real, syn_, sign=sign, include_1d=True, distance=distance)

    assert torch.autograd.gradcheck(fn, tuple(syn))


def test_float64_uses_reference():
    real, syn = _grads(2, [CONV], dtype=torch.float64)
    loss = matching_loss(real, syn)
    assert loss.dtype == torch.float64
    assert not _uses_kernel(real, syn)
    torch.testing.assert_close(loss, matching_loss_reference(real, syn), atol=0, rtol=0)


def test_dispatch_reads_environment_at_call_time(monkeypatch):
    """CPU without TRITON_INTERPRET: the reference, bit for bit; with it: the kernel."""
    real, syn = _grads(2, [CONV], device="cpu")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not _uses_kernel(real, syn)
    torch.testing.assert_close(matching_loss(real, syn), matching_loss_reference(real, syn), atol=0, rtol=0)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _uses_kernel(real, syn)


def test_real_requiring_grad_gets_its_gradient():
    """The kernel treats real as a constant; if real requires grad the reference runs instead."""
    real, syn = _grads(2, [CONV, LINEAR])
    real = [r.requires_grad_() for r in real]
    assert not _uses_kernel(real, syn)
    matching_loss(real, syn).sum().backward()
    assert all(r.grad is not None for r in real)


def test_bad_inputs_raise():
    real, syn = _grads(2, [CONV, LINEAR])
    with pytest.raises(ValueError, match="real_grads has 2"):
        matching_loss(real, syn[:1])
    with pytest.raises(ValueError, match="distance"):
        matching_loss(real, syn, distance="l1")
    with pytest.raises(ValueError, match="leading K"):
        matching_loss([torch.randn(5, device=DEVICE)], [torch.randn(5, device=DEVICE)])
    with pytest.raises(ValueError, match="shape"):
        matching_loss(real, [syn[0], syn[1][:, :3]])


class _TinyConvNet(nn.Module):
    """conv-norm-relu-pool + linear: conv weights, 1-D norm/bias parameters and a linear layer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.norm = nn.GroupNorm(6, 6, affine=True)
        self.fc = nn.Linear(6 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(F.avg_pool2d(F.relu(self.norm(self.conv(x))), 2).flatten(1))


@pytest.mark.parametrize("distance, include_1d", [("cos", False), ("mse", True)])
def test_double_backward_reaches_synthetic_images(distance, include_1d):
    """vmap(grad) per-cluster gradients of synthetic images -> matching_loss -> d loss / d image."""
    torch.manual_seed(0)
    model = _TinyConvNet().to(DEVICE)
    params = {n: p.detach() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(5)
    k = 4
    x_real = torch.randn(k, 8, 1, 8, 8, generator=g).to(DEVICE)
    y_real = torch.randint(0, 10, (k, 8), generator=g).to(DEVICE)
    x_syn = torch.randn(k, 2, 1, 8, 8, generator=g).to(DEVICE)
    y_syn = torch.randint(0, 10, (k, 2), generator=g).to(DEVICE)

    def ce(p, x, y):
        return F.cross_entropy(functional_call(model, p, (x,)), y)

    per_cluster = vmap(grad(ce), in_dims=(None, 0, 0))
    with torch.no_grad():
        real = list(per_cluster(params, x_real, y_real).values())

    image_grads = []
    for fn in (matching_loss, matching_loss_reference):
        images = x_syn.clone().requires_grad_()
        syn = list(per_cluster(params, images, y_syn).values())
        loss = fn(real, syn, sign=-1.0, include_1d=include_1d, distance=distance)
        loss.sum().backward()
        assert images.grad is not None and images.grad.abs().sum() > 0
        image_grads.append(images.grad)
        if fn is matching_loss:
            assert isinstance(loss.grad_fn, ml.MatchingLossFunction._backward_cls)
    torch.testing.assert_close(image_grads[0], image_grads[1], atol=1e-5, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("distance", ["cos", "mse"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [7, 100])
def test_half_precision_on_gpu(k, dtype, distance):
    """bf16/fp16 inputs reduce in fp32: loss float32, gradient in the input dtype."""
    real, syn = _grads(k, [(128, 1, 3, 3), (128, 128, 3, 3), (128,), (10, 2048)], dtype=dtype, device="cuda")
    assert _uses_kernel(real, syn, distance=distance)
    _assert_matches_reference(real, syn, dtype=dtype, include_1d=True, distance=distance)


@pytest.mark.gpu
def test_interpreter_with_cuda_tensors(monkeypatch):
    """TRITON_INTERPRET=1 with CUDA tensors: interpreted on host copies, results back on the GPU."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    real, syn = _grads(3, [CONV, LINEAR], device="cuda")
    _assert_matches_reference(real, syn)


def test_distill_stage_kernel_path_equals_reference_path(monkeypatch):
    """The distill stage gives the same synsets through the fused kernel as through the reference."""
    from ddm_hpc.config import PAIRS_DISTILL, DistillConfig, TrainConfig
    from ddm_hpc.distill import distill_groups
    from ddm_hpc.models import build_model
    from ddm_hpc.train import train_trajectory
    from ddm_hpc.trajectory import MemoryTrajectory

    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 1, 8, 8, generator=g)
    y = torch.arange(60) % 3
    torch.manual_seed(0)
    model = build_model("convnet", 1, 3, (8, 8), width=4, depth=2).to(DEVICE)
    traj = train_trajectory(model, x, y, x[:10], y[:10], TrainConfig(epochs=3, batch_size=20, lr=0.05), 0,
                            torch.device(DEVICE), show_progress=False)
    reader = MemoryTrajectory(traj.table, traj.params, DEVICE)
    dcfg = DistillConfig(**{**PAIRS_DISTILL, "distill_steps": 6, "lr_img": 0.5}, batch_real=8, include_1d=True)

    def run():
        return distill_groups(model, reader, x, y, torch.arange(60) % 6, torch.tensor([0, 1, 2] * 2), dcfg, 0,
                              torch.device(DEVICE), show_progress=False)

    backends = []
    original = ml._triton_backend

    def spy(*a, **k):
        backends.append(original(*a, **k))
        return backends[-1]

    monkeypatch.setattr(ml, "_triton_backend", spy)
    kernel = run()  # autouse fixture: the kernel (compiled on GPU, interpreted on CPU)
    assert backends and all(b is not None for b in backends)  # every call went to the kernel
    monkeypatch.setattr(ml, "_triton_backend", lambda *a, **k: None)
    reference = run()
    torch.testing.assert_close(kernel.images, reference.images, rtol=1e-4, atol=1e-5)
    assert abs(kernel.final_loss - reference.final_loss).max() < 1e-4


# ----------------------------------------------------------------------------- --kernel, launches, device guard
def test_backend_reference_never_runs_the_kernel():
    real, syn = _grads(2, [CONV])
    loss = matching_loss(real, syn, backend="reference")
    assert not isinstance(loss.grad_fn, ml.MatchingLossFunction._backward_cls)
    torch.testing.assert_close(loss, matching_loss_reference(real, syn), atol=0, rtol=0)


def test_backend_triton_refuses_what_it_cannot_run(monkeypatch):
    """--kernel triton: a one-line error naming the cause and the fix, never a silent fallback."""
    real, syn = _grads(2, [CONV], device="cpu")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"--kernel triton: tensors on cpu.*use --kernel auto or reference"):
        matching_loss(real, syn, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert isinstance(matching_loss(real, syn, backend="triton").grad_fn, ml.MatchingLossFunction._backward_cls)
    real64, syn64 = _grads(2, [CONV], dtype=torch.float64, device="cpu")
    with pytest.raises(ValueError, match="float64"):
        matching_loss(real64, syn64, backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        matching_loss(real, syn, backend="fast")


def test_triton_usable_names_a_missing_compiler(monkeypatch):
    """auto takes the reference on a CUDA node where Triton cannot build its launcher, and says why."""
    check = ml.triton_usable.__wrapped__  # the uncached check
    if ml.shutil.which("gcc") or ml.shutil.which("clang"):
        assert check() in (None, f"no Python.h under {ml.sysconfig.get_paths()['include']} for Triton's launcher "
                                 "(install the python3-dev package)")
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(ml.shutil, "which", lambda name: None)
    assert "no C compiler" in check()
    monkeypatch.setattr(ml.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(ml.sysconfig, "get_paths", lambda **kw: {"include": "/nonexistent"})
    assert "Python.h" in check()


def test_device_guard_targets_the_tensors_gpu():
    """Launches run under torch.cuda.device(the tensors' device), not the current device (built without CUDA)."""
    guard = ml._device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(ml._device_guard(torch.device("cpu")), torch.cuda.device)


def test_grid_is_one_dimensional_and_not_bounded_by_65535(monkeypatch):
    """K = 70 000 clusters: one program per (row block, cluster) on grid x; plane = K x ROWS passed whole."""
    launches = []

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                launches.append((grid, args, kw))
            return launch

    monkeypatch.setattr(ml, "_kernel_variant", lambda name, interpret: Recorder())
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    k, shapes = 70_000, [(3, 2), (5, 4)]
    real = [torch.zeros(k, *s) for s in shapes]
    syn = [torch.zeros(k, *s, requires_grad=True) for s in shapes]
    matching_loss(real, syn).sum().backward()
    assert len(launches) == 4  # forward and backward, one launch per counted parameter
    for grid, args, kw in launches:
        assert len(grid) == 1 and grid[0] == k  # 1 row block per layer here
        plane = args[-5]  # ..., plane, n_row_blocks, sign, abs_sign, eps
        assert plane == k * 8 and isinstance(plane, int)
        assert kw["COLS"] in (2, 4) and kw["BLOCK_R"] >= 1


@pytest.mark.gpu
def test_more_than_65535_clusters_on_gpu():
    """The compiled kernels with K past CUDA's grid-y limit agree with the reference."""
    real, syn = _grads(70_000, [(4, 3, 3), (10, 8), (6,)], device="cuda")
    _assert_matches_reference(real, syn, include_1d=True)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_gpu_with_first_current():
    """Tensors on cuda:1 while cuda:0 is current: the launch goes to cuda:1 and agrees with the reference."""
    torch.cuda.set_device(0)
    real, syn = _grads(7, [CONV, LINEAR], device="cuda:1")
    _assert_matches_reference(real, syn)
