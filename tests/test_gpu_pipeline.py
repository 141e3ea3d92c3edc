"""The whole pipeline on a CUDA GPU (marker ``gpu``; skipped without one): the smoke preset through train, cluster
(FAISS on the GPU when faiss-gpu is installed), distill (the fused Triton kernel, checked to be the path taken),
attribute and evaluate; and the determinism the README promises (the speedup benchmark at its small size:
tests/test_gpu_speedup.py, a file of its own so that pytest-xdist runs it beside this one).

The promise under test (README, "Determinism"): with ``--deterministic`` (the default) a rerun on the same GPU
model, driver and library versions reproduces every artifact bit for bit, and so does any ``--shards`` count.
Between the CPU and a GPU, or the kernel and the reference, results agree only to float rounding: TF32
convolutions (cuDNN's default), other summation orders. Those comparisons use tolerances, stated where made.

Reads MNIST from ``DDM_DATA_ROOT`` (``benchmarks/gpu_suite.sh`` carries it to the GPU machine).
"""
from __future__ import annotations

import importlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from ddm_hpc.config import Config, merge, smoke_preset
from ddm_hpc.storage import artifact_path

pytestmark = pytest.mark.gpu
ml = importlib.import_module("kernels.matching_loss")


def _config(mnist_root: Path, out: Path, device: str = "cuda", **over) -> Config:
    d = merge(Config().to_dict(), smoke_preset())
    d = merge(d, {"data": {"data_root": str(mnist_root)},
                  "evaluate": {"methods": "random,clustering,ddm", "n_masks": 4, "noise_seeds": 1},
                  "runtime": {"out": str(out), "device": device, "progress": False}})
    return Config.from_dict(merge(d, over))


def _datasets(path: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


@pytest.fixture(scope="module")
def cuda_run(tmp_path_factory, mnist_root):
    """train -> cluster -> distill -> attribute -> evaluate on cuda, recording the matching-loss backends taken."""
    from ddm_hpc.pipeline import run_stages

    out = tmp_path_factory.mktemp("cuda") / "run"
    taken: list[str | None] = []
    original = ml._triton_backend

    def spy(*a, **k):
        taken.append(original(*a, **k))
        return taken[-1]

    ml._triton_backend = spy
    try:
        run_stages(_config(mnist_root, out), ("train", "cluster", "distill", "attribute", "evaluate"))
    finally:
        ml._triton_backend = original
    return out, taken


def test_pipeline_on_cuda_writes_finite_artifacts(cuda_run):
    out, taken = cuda_run
    assert taken and all(b == "cuda" for b in taken), f"distill took {set(taken)}, not the fused kernel"
    with h5py.File(artifact_path(out, "attribute")) as f:
        assert f["scores"].shape == (3, 30) and np.isfinite(f["scores"][()]).all()
    with h5py.File(artifact_path(out, "distill")) as f:
        assert np.isfinite(f["cluster/images"][()]).all()
        assert f["cluster/final_loss"][()].mean() < f["cluster/init_loss"][()].mean()
    with h5py.File(out / "evaluation.h5") as f:
        for name in ("random", "clustering", "ddm"):
            assert np.isfinite(f[f"methods/{name}/scores"][()]).all(), name
        # the full-data retraining reproduces theta_tau on the same GPU (the bit-identity itself is checked by
        # test_rerun_on_the_same_gpu_is_bit_identical); its softmax is the attribute stage's up to the rounding
        # of another evaluation batch size, for which cuDNN may pick another (TF32) algorithm: ~1e-4
        assert f["gt"].attrs["base_drift"] < 1e-3


def test_faiss_on_the_gpu_when_installed(cuda_run):
    from ddm_hpc.cluster import faiss_has_gpu

    with h5py.File(artifact_path(cuda_run[0], "cluster")) as f:
        assert bool(f.attrs["faiss_gpu"]) == faiss_has_gpu()
    if not faiss_has_gpu():
        pytest.skip("faiss has no GPU support here (faiss-cpu installed; pip install -e .[gpu] for faiss-gpu)")


def test_cuda_agrees_with_cpu_within_rounding(cuda_run, tmp_path, mnist_root):
    """Same theta_0 (built on the CPU) and data order; training on the GPU differs by rounding (TF32 convolutions,
    other summation orders), which three epochs keep small: test accuracy within 3 points, parameters within 5 %."""
    from ddm_hpc.pipeline import run_stages

    run_stages(_config(mnist_root, tmp_path / "cpu", device="cpu"), ("train",))
    gpu, cpu = _datasets(artifact_path(cuda_run[0], "train")), _datasets(artifact_path(tmp_path / "cpu", "train"))
    np.testing.assert_array_equal(gpu["trajectory/params"][0], cpu["trajectory/params"][0])
    rel = np.linalg.norm(gpu["trajectory/params"][-1] - cpu["trajectory/params"][-1]) / np.linalg.norm(
        cpu["trajectory/params"][-1])
    assert rel < 0.05, rel
    assert abs(gpu["trajectory/test_accuracy"][-1] - cpu["trajectory/test_accuracy"][-1]) < 0.03


def test_rerun_on_the_same_gpu_is_bit_identical(cuda_run, tmp_path, mnist_root):
    """The determinism promise: a second run on this GPU gives every dataset bit for bit (train, cluster, distill
    with the fused kernel, attribute), also when distill and attribute run as 3 shards."""
    from ddm_hpc.pipeline import run_stages

    again = tmp_path / "again"
    run_stages(_config(mnist_root, again, runtime={"shards": 3}), ("train", "cluster", "distill", "attribute"))
    for stage in ("train", "cluster", "distill", "attribute"):
        a, b = _datasets(artifact_path(cuda_run[0], stage)), _datasets(artifact_path(again, stage))
        assert a.keys() == b.keys(), stage
        for name in a:
            va, vb = np.asarray(a[name]), np.asarray(b[name])
            same = np.array_equal(va, vb, equal_nan=va.dtype.kind == "f")
            assert same, f"{stage}: {name} differs between reruns"


def test_kernel_and_reference_paths_agree_on_cuda(cuda_run, tmp_path, mnist_root):
    """--kernel reference on the same GPU: synsets within float rounding of the fused kernel's (same tolerance as
    tests/test_kernels' distill comparison)."""
    import shutil

    from ddm_hpc.pipeline import run_stages

    ref = tmp_path / "ref"
    shutil.copytree(cuda_run[0], ref, ignore=shutil.ignore_patterns("synsets.h5", "attribution.h5", "evaluation.h5",
                                                                     "groundtruth.h5", "report.md", "*.png"))
    run_stages(_config(mnist_root, ref, runtime={"kernel": "reference"}), ("distill",))
    a, b = _datasets(artifact_path(cuda_run[0], "distill")), _datasets(artifact_path(ref, "distill"))
    torch.testing.assert_close(torch.from_numpy(b["cluster/images"]), torch.from_numpy(a["cluster/images"]),
                               rtol=1e-3, atol=1e-4)


def test_deterministic_settings_are_on(cuda_run):
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert torch.are_deterministic_algorithms_enabled()
