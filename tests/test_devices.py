"""The CUDA paths, checked without a GPU: device mix-ups caught on the ``meta`` device and with a stand-in that
computes on the host but lives "elsewhere", ``--device`` resolution (a GPU torch cannot use, indices, ``--workers``
placement) and the CUDA settings made once per process (``utils.configure_cuda``).

Each mix-up test fails if a function runs a model on inputs left on another device: on the meta device torch
refuses (``Tensor on device meta is not on the expected device cpu!``), which is what CUDA does with a model on
the GPU and images on the host (issue 15, item 1: ``unlearn.activation_bytes`` did this with ``--batch-models 0``).
"""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

from ddm_hpc import utils
from ddm_hpc.config import RuntimeConfig, TrainConfig
from ddm_hpc.errors import ConfigError
from ddm_hpc.models import build_model
from ddm_hpc.synsets import SynsetLevel
from ddm_hpc.unlearn import Unlearner, activation_bytes, auto_chunk

META = torch.device("meta")


def _convnet() -> nn.Module:
    torch.manual_seed(0)
    return build_model("convnet", 1, 3, (8, 8), width=4, depth=2)


# ----------------------------------------------------------------------------- item 1: the attribute stage's chunk
def test_activation_bytes_moves_the_image_to_the_models_device():
    """Model on meta (as on a GPU), images on the host: the estimate runs and equals the all-host one."""
    x = torch.randn(5, 1, 8, 8)
    want = activation_bytes(_convnet(), x)
    assert want > 0
    assert activation_bytes(_convnet().to(META), x) == want


def test_auto_chunk_with_model_elsewhere():
    model = _convnet()
    n = sum(p.numel() for p in model.parameters())
    chunk = auto_chunk(model.to(META), n, 4, torch.randn(3, 1, 8, 8), META)
    assert 1 <= chunk <= 512


def test_unlearner_default_batch_models_with_host_eval_images(monkeypatch):
    """``--batch-models 0`` (the default) sizes its chunk from a forward pass: model and theta on the device,
    evaluation images on the host, as the attribute stage and every diagnose task call it."""
    from ddm_hpc import unlearn

    seen = {}

    def fake_finetune(model, theta, syn_x, syn_y, spec, steps, lr, direction, eval_x, chunk, device, *a):
        seen.update(chunk=chunk, device=device, rows=spec.rows.shape)
        return torch.zeros(len(spec.rows), len(eval_x), 3)

    monkeypatch.setattr(unlearn, "finetune_many", fake_finetune)
    model = _convnet().to(META)
    theta = {k: v.detach() for k, v in model.named_parameters()}
    level = SynsetLevel(torch.zeros(4, 1, 1, 8, 8), torch.zeros(4, 1, dtype=torch.long), torch.zeros(4, dtype=torch.long),
                        torch.ones(4), torch.ones(4), torch.full((4,), 10), 1.0)
    u = Unlearner(model, theta, 3, 0.01, "uniform", TrainConfig(), 0, META, show_progress=False)
    out = u.unlearn(level, 1 - torch.eye(4, dtype=torch.uint8), torch.randn(6, 1, 8, 8))
    assert out.shape == (4, 6, 3) and 1 <= seen["chunk"] <= 64 and seen["device"] == META


# ----------------------------------------------------------------------------- the same check for other forward passes
class _Elsewhere(nn.Module):
    """Looks like a model on another device (its first parameter moves with ``.to``), computes on the host, and fails
    unless every input arrives on that device: the meta check for functions that bring results back with ``.cpu()``.
    """

    def __init__(self, d_in: int, n_out: int) -> None:
        super().__init__()
        self.marker = nn.Parameter(torch.zeros(()))
        self.fc = nn.Linear(d_in, n_out)  # the last Linear: penultimate features are its (host) input

    def _apply(self, fn, recurse=True):  # only the marker moves: arithmetic stays on the host
        self.marker = nn.Parameter(fn(self.marker.detach()))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device != self.marker.device:
            raise RuntimeError(f"input on {x.device}, model on {self.marker.device}")
        return self.fc(torch.ones(len(x), self.fc.in_features))


def test_stand_in_catches_a_mix_up():
    with pytest.raises(RuntimeError, match="input on cpu, model on meta"):
        _Elsewhere(4, 3).to(META)(torch.zeros(2, 4))


def test_feature_extraction_and_predictions_move_inputs(tmp_path):
    """cluster.embed, features.extract_features, diagnose's predict and train.accuracy with the model elsewhere."""
    from ddm_hpc.cluster import embed
    from ddm_hpc.data import TensorStream
    from ddm_hpc.diagnose.removal import predict
    from ddm_hpc.features import FeatureFile, extract_features
    from ddm_hpc.train import accuracy

    x, y = torch.randn(10, 1, 2, 2), torch.arange(10) % 2
    assert embed(x, _Elsewhere(4, 3), META, batch=4).shape == (10, 4)
    with FeatureFile(extract_features(TensorStream(x, y, 2), _Elsewhere(4, 3), tmp_path / "f.h5", META, batch_size=4,
                                      show_progress=False)) as ff:
        assert (ff.n, ff.dim) == (10, 4)
    assert predict(_Elsewhere(4, 3), x, META, batch=4).shape == (10, 3)
    assert 0.0 <= accuracy(_Elsewhere(4, 3).to(META), x, y, batch=4) <= 1.0


# ----------------------------------------------------------------------------- --device
@pytest.fixture
def fake_gpus(monkeypatch):
    """torch believes in ``n`` GPUs; configure_cuda only records what it was asked."""
    calls = []

    def install(n: int):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(utils, "configure_cuda", lambda dev, det=True: calls.append((dev, det)))
        return calls

    monkeypatch.setattr(utils, "_worker_index", None)
    return install


def test_cuda_devices_resolve_with_index_and_settings(fake_gpus):
    calls = fake_gpus(2)
    assert utils.resolve_device("auto") == torch.device("cuda", 0)
    assert utils.resolve_device("cuda:1", deterministic=False) == torch.device("cuda", 1)
    assert calls == [(torch.device("cuda", 0), True), (torch.device("cuda", 1), False)]
    with pytest.raises(ConfigError, match=r"only 2 GPU\(s\) visible; use cuda:0..cuda:1"):
        utils.resolve_device("cuda:2")
    assert utils.resolve_device("cpu") == torch.device("cpu") and len(calls) == 2


@pytest.mark.parametrize("worker, gpus, want", [(0, 2, 0), (1, 2, 1), (2, 2, 0), (5, 4, 1), (3, 1, 0)])
def test_worker_i_takes_gpu_i_mod_count(fake_gpus, worker, gpus, want):
    fake_gpus(gpus)
    utils.set_worker_index(worker)
    assert utils.resolve_device("auto") == torch.device("cuda", want)
    assert utils.resolve_device("cuda") == torch.device("cuda", want)
    assert utils.resolve_device("cuda:0") == torch.device("cuda", 0)  # an explicit index is kept


def test_auto_warns_once_when_a_gpu_is_present_but_unusable(monkeypatch, tmp_path, caplog):
    """Driver too old for the CUDA build: one warning with torch's reason, then the CPU; --device cuda fails."""
    probe = tmp_path / "nvidiactl"
    probe.touch()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(utils, "NVIDIA_PROBES", (str(probe),))
    monkeypatch.setattr(utils, "_warned_unusable", False)

    def init():
        raise RuntimeError("The NVIDIA driver on your system is too old (found version 11040).\nPlease update it.")

    monkeypatch.setattr(torch.cuda, "init", init)
    with caplog.at_level(logging.WARNING, logger="ddm_hpc.utils"):
        assert utils.resolve_device("auto") == torch.device("cpu")
        assert utils.resolve_device("auto") == torch.device("cpu")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "too old (found version 11040). Please update it." in warnings[0]
    assert "--device cpu" in warnings[0]
    with pytest.raises(ConfigError, match="too old"):
        utils.resolve_device("cuda")


def test_no_warning_without_nvidia_hardware(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(utils, "NVIDIA_PROBES", ("/nonexistent/nvidiactl",))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(utils, "_warned_unusable", False)
    with caplog.at_level(logging.WARNING, logger="ddm_hpc.utils"):
        assert utils.resolve_device("auto") == torch.device("cpu")
    assert not caplog.records
    assert utils.cuda_unusable_reason() is None


def test_cpu_only_torch_is_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert "no CUDA" in utils.cuda_unusable_reason()


# ----------------------------------------------------------------------------- the CUDA settings
def test_deterministic_settings_made_once(monkeypatch):
    """--deterministic: cuDNN deterministic without benchmarking, deterministic algorithms (warn-only) and a
    cuBLAS workspace config; the first call's choice holds for the process."""
    recorded = []
    monkeypatch.setattr(utils, "_cuda_mode", None)
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda mode, warn_only=False: recorded.append(
        (mode, warn_only)))
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    utils._configure_cuda_once(True)
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert recorded == [(True, True)]
    import os

    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == utils.CUBLAS_WORKSPACE
    utils._configure_cuda_once(False)  # a later call changes nothing
    assert torch.backends.cudnn.deterministic and recorded == [(True, True)]


def test_runtime_options_reach_the_device(monkeypatch):
    seen = []
    monkeypatch.setattr("ddm_hpc.config.resolve_device", lambda name, det: seen.append((name, det)) or "dev")
    assert RuntimeConfig(device="cuda:0", deterministic=False).torch_device() == "dev"
    assert seen == [("cuda:0", False)]
    with pytest.raises(ConfigError, match="--kernel must be one of auto, triton, reference"):
        RuntimeConfig(kernel="fast")


def test_to_device_pins_only_for_a_gpu():
    x = torch.arange(6.0)
    assert utils.to_device(x, torch.device("cpu")) is x
    assert np.array_equal(utils.to_device(x, torch.device("cpu")).numpy(), x.numpy())
