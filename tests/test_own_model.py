"""Your own model: a BatchNorm network through every stage, torchvision builders, and per-epoch checkpoints from a
plain PyTorch loop imported with ``ddm-hpc import-trajectory`` (bit for bit), with its bad inputs refused."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ddm_hpc.cli import main
from ddm_hpc.config import Config, TrainConfig
from ddm_hpc.context import RunContext
from ddm_hpc.distill import per_group_grads
from ddm_hpc.errors import ConfigError
from ddm_hpc.importer import check_retrainable, checkpoint_files
from ddm_hpc.models import build_model, forward_with
from ddm_hpc.retrain import retrain_keep
from ddm_hpc.storage import ParamTable
from ddm_hpc.train import train_trajectory
from ddm_hpc.trajectory import TrajectoryReader

PLUGINS = Path(__file__).resolve().parent / "plugins"
BN = f"{PLUGINS / 'bn_model.py'}:factory"
SMOKE = ["--preset", "smoke", "--no-progress", "--threads", "1"]


def _bn_net(width: int = 8, classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return build_model(BN, 3, classes, (8, 8), width=width)


def _reset_buffers(model: nn.Module) -> nn.Module:
    """The same parameters with fresh BatchNorm statistics (mean 0, var 1): what ignoring the checkpoint's gives."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
    return model


# ----------------------------------------------------------------------------- BatchNorm through every stage
@pytest.fixture(scope="module")
def bn_run(tmp_path_factory, mnist_root):
    out = tmp_path_factory.mktemp("bn") / "run"
    argv = ["evaluate", *SMOKE, "--model", BN, "--methods", "random,ddm,tracin,trak", "--n-removed", "3",
            "--n-masks", "4", "--noise-seeds", "1", "--proj-dim", "32", "--peer-checkpoints", "2",
            "--data-root", str(mnist_root), "--out", str(out)]
    assert main(argv) == 0
    return out


def test_batchnorm_buffers_are_recorded_with_each_checkpoint(bn_run):
    with h5py.File(bn_run / "train.h5") as f:
        names = [n.decode() for n in f["buffers/name"][()]]
        rows = f["trajectory/buffers"][()]
        assert names == ["1.running_mean", "1.running_var", "1.num_batches_tracked"]
        assert rows.shape == (len(f["trajectory/epoch"]), 8 + 8 + 1)
    assert rows[0, -1] == 0 and rows[-1, -1] > rows[1, -1] > 0  # batches counted: recorded after each epoch
    assert not np.array_equal(rows[0], rows[-1])


def test_batchnorm_stages_use_the_checkpoint_buffers(bn_run):
    cfg = Config.from_dict(json.loads((bn_run / "config.json").read_text()) | {"runtime": {"out": str(bn_run)}})
    ctx = RunContext(cfg)
    with h5py.File(bn_run / "attribution.h5") as f:
        base = torch.from_numpy(f["base_probs"][()])  # attribute's forward_with at theta_tau and its buffers
    model = ctx.trained_model()
    torch.testing.assert_close(model(ctx.query_x).softmax(-1), base, atol=1e-5, rtol=0)
    ignored = _reset_buffers(model)(ctx.query_x).softmax(-1)
    assert (ignored - base).abs().max() > 1e-3  # the check above can tell
    with h5py.File(bn_run / "evaluation.h5") as f:
        assert f.attrs["complete"] and set(f["methods"]) == {"random", "ddm", "tracin", "trak"}
        assert f["gt"].attrs["base_drift"] < 1e-5


def test_batchnorm_full_data_retraining_is_bit_identical(bn_run):
    cfg = Config.from_dict(json.loads((bn_run / "config.json").read_text()) | {"runtime": {"out": str(bn_run)}})
    ctx = RunContext(cfg)
    row = retrain_keep(cfg, ctx.bundle, torch.ones(len(ctx.bundle.y_train), dtype=torch.bool))
    reader = TrajectoryReader.of_run(bn_run)
    assert torch.equal(row, torch.cat([reader.flat(reader.tau), reader.buffer_rows[reader.tau]]))


def test_replay_refuses_batchnorm_before_retraining(bn_run, capsys):
    uid = h5py.File(bn_run / "evaluation.h5", "r").attrs["uid"]
    assert main(["evaluate", "--out", str(bn_run), "--methods", "random,replay", "--no-progress"]) == 2
    assert "--methods replay differentiates through training" in _one_error(capsys)
    assert h5py.File(bn_run / "evaluation.h5", "r").attrs["uid"] == uid  # nothing retrained or rewritten


def test_per_group_grads_read_the_checkpoint_buffers():
    model = _bn_net()
    model.train()(torch.randn(32, 3, 8, 8) * 2 + 1)  # running statistics away from their init
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    x, y, w = torch.randn(2, 5, 3, 8, 8), torch.randint(0, 3, (2, 5)), torch.ones(2, 5)
    ref = []
    model.eval()
    for g in range(2):
        loss = F.cross_entropy(model(x[g]), y[g])
        ref.append(torch.autograd.grad(loss, list(model.parameters())))
    for impl in ("vmap", "loop"):
        got = per_group_grads(_reset_buffers(_bn_net()), params, x, y, w, impl, buffers)
        for i, g in enumerate(got):
            torch.testing.assert_close(g, torch.stack([r[i] for r in ref]), atol=1e-5, rtol=1e-5)
    without = per_group_grads(_reset_buffers(_bn_net()), params, x, y, w, "loop")
    assert (without[0] - got[0]).abs().max() > 1e-4


def test_batchnorm_training_resumes_bit_identically():
    x, y = torch.randn(48, 3, 8, 8), torch.arange(48) % 3
    tcfg = TrainConfig(epochs=3, batch_size=16)
    states = []
    full = train_trajectory(_bn_net(), x, y, x[:8], y[:8], tcfg, 0, torch.device("cpu"), show_progress=False,
                            on_epoch=lambda st: states.append(copy.deepcopy(st)))  # as the stage saves it
    resumed = train_trajectory(_bn_net(), x, y, x[:8], y[:8], tcfg, 0, torch.device("cpu"), show_progress=False,
                               resume=states[0])
    assert full.buffers is not None and torch.equal(full.buffers, resumed.buffers)
    assert torch.equal(full.params, resumed.params)


# ----------------------------------------------------------------------------- torchvision builders
def test_torchvision_builder_with_small_stem():
    model = build_model("torchvision:resnet18", 3, 10, (32, 32), small_stem=True, width=32)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1) and isinstance(model.maxpool, nn.Identity)
    assert ParamTable.buffers_of(model).names[:2] == ["bn1.running_mean", "bn1.running_var"]
    x = torch.randn(2, 3, 32, 32)
    p = {k: v.detach() for k, v in model.named_parameters()}
    b = dict(model.named_buffers())
    torch.testing.assert_close(forward_with(model, p, x, b), model.eval()(x))
    gray = build_model("torchvision:resnet18", 1, 4, (28, 28))
    assert gray.conv1.in_channels == 1 and gray.conv1.kernel_size == (7, 7)
    assert gray.eval()(torch.zeros(2, 1, 28, 28)).shape == (2, 4)
    with pytest.raises(ConfigError, match="no classifier 'resnet9000'"):
        build_model("torchvision:resnet9000", 3, 10, (32, 32))


# ----------------------------------------------------------------------------- checkpoints from a plain loop
def _npz(path: Path, n: int = 120, n_test: int = 30) -> Path:
    rng = np.random.default_rng(0)
    y, y_test = np.arange(n) % 3, np.arange(n_test) % 3
    x = (rng.random((n, 8, 8, 3)) * 80 + 60 * y[:, None, None, None]).astype(np.uint8)  # classes differ in brightness
    x_test = (rng.random((n_test, 8, 8, 3)) * 80 + 60 * y_test[:, None, None, None]).astype(np.uint8)
    np.savez(path, x=x, y=y, x_test=x_test, y_test=y_test)
    return path


def _plain_loop(data: Path, ckpt: Path, epochs: int = 2) -> list[dict[str, torch.Tensor]]:
    """A user's own training loop: their normalisation, Adam, their shuffling; a state_dict saved per epoch."""
    d = np.load(data)
    x = torch.tensor(d["x"]).permute(0, 3, 1, 2).float() / 255
    mean, std = x.mean((0, 2, 3), keepdim=True), x.std((0, 2, 3), keepdim=True, unbiased=False)
    x, y = (x - mean) / std, torch.tensor(d["y"]).long()
    model = _bn_net()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    ckpt.mkdir(exist_ok=True)
    saved = []
    for epoch in range(epochs + 1):
        if epoch:
            for idx in torch.randperm(len(y)).split(32):
                opt.zero_grad()
                F.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
        torch.save(model.state_dict(), ckpt / f"epoch_{epoch}.pt")
        saved.append({k: v.clone() for k, v in model.state_dict().items()})
    return saved


def _import_args(tmp_path: Path, data: Path, pattern: str, out: Path) -> list[str]:
    return ["import-trajectory", "--checkpoints", pattern, "--model", BN, "--width", "8", "--dataset", str(data), "--n-train", "0",
            "--n-test", "0", "--no-progress", "--threads", "1", "--out", str(out)]


def test_imported_checkpoints_are_bit_exact_and_the_pipeline_runs_on_them(tmp_path, capsys):
    data, out = _npz(tmp_path / "d.npz"), tmp_path / "run"
    saved = _plain_loop(data, tmp_path / "ckpt")
    assert main(_import_args(tmp_path, data, str(tmp_path / "ckpt" / "epoch_*.pt"), out)) == 0
    reader = TrajectoryReader.of_run(out)
    assert reader.epochs == [0, 1, 2] and reader.imported
    assert main(_import_args(tmp_path, data, str(tmp_path / "ckpt" / "epoch_*.pt"), out)) == 2  # no silent replace
    assert "exists: pass --overwrite" in _one_error(capsys)
    for i, sd in enumerate(saved):
        for name, v in reader.params(i).items():
            assert torch.equal(v, sd[name]), name
        for name, v in reader.buffers(i).items():
            assert torch.equal(v.to(sd[name].dtype), sd[name]), name
    cfg = Config.from_dict(json.loads((out / "config.json").read_text()) | {"runtime": {"out": str(out)}})
    assert cfg.train.epochs == 2
    ctx = RunContext(cfg)
    acc = float((reader.load(_bn_net(), 2).eval()(ctx.bundle.x_test).argmax(1) == ctx.bundle.y_test).float().mean())
    assert reader.test_accuracy[-1] == pytest.approx(acc) and acc > 0.6  # their normalisation is ddm-hpc's
    # cluster, distill and attribute run on it as on a trained run
    common = ["--no-progress", "--threads", "1", "--out", str(out), "--clusters-per-class", "2", "--distill-steps",
              "2", "--n-queries", "2", "--n-val", "5"]
    assert main(["run", *common]) == 0
    assert "imported 3 checkpoints" in capsys.readouterr().out
    # evaluate retrains with ddm-hpc's recipe, which did not make these: refused in one line, naming the option
    assert main(["evaluate", *common]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("ddm-hpc: error:")]
    assert len(err) == 1 and "was imported" in err[0] and "--imported-recipe ddm-hpc" in err[0]
    assert not (out / "evaluation.h5").exists()
    assert main(["diagnose", *common, "--tasks", "useless"]) == 2  # the removal diagnostics retrain too
    assert "--imported-recipe ddm-hpc" in _one_error(capsys)
    assert main(["diagnose", *common, "--tasks", "pictures"]) == 0  # pictures retrain nothing: allowed
    # the loop's theta_0 is the factory's init with seed 0: stating the recipe passes the check; another seed fails
    stated = Config.from_dict(cfg.to_dict() | {"evaluate": {"imported_recipe": "ddm-hpc"}})
    check_retrainable(stated)
    with pytest.raises(ConfigError, match="is not --model"):
        check_retrainable(Config.from_dict(stated.to_dict() | {"seed": 1}))


def test_checkpoints_are_ordered_by_epoch_number(tmp_path):
    for e in (10, 2, 0, 1, 3, 4, 5, 6, 7, 8, 9):
        (tmp_path / f"epoch_{e}.pt").write_bytes(b"")
    assert [e for e, _ in checkpoint_files(str(tmp_path / "epoch_*.pt"))] == list(range(11))


# ----------------------------------------------------------------------------- bad input: one line, nothing written
def _write_ckpts(tmp_path: Path, how: str) -> str:
    d = tmp_path / "ckpt"
    d.mkdir()
    sd = _bn_net().state_dict()
    epochs = {"no-theta0": (1, 2), "gap": (0, 1, 3)}.get(how, (0, 1))
    for e in epochs:
        obj: object = dict(sd)
        if how == "pickle" and e == 1:
            obj = _bn_net()  # a whole module: arbitrary objects in the pickle
        elif how == "missing" and e == 1:
            obj = {k: v for k, v in sd.items() if k != "5.bias"}
        elif how == "extra" and e == 1:
            obj = {**sd, "head.weight": torch.zeros(3)}
        elif how == "shape" and e == 1:
            obj = _bn_net(width=4).state_dict()
        torch.save(obj, d / f"epoch_{e}.pt")
    return str(d / "epoch_*.pt")


IMPORT_CASES = [
    ("a pickle of arbitrary objects", "pickle", "is not a plain state_dict"),
    ("a missing key", "missing", "missing 5.bias"),
    ("an extra key", "extra", "unexpected head.weight"),
    ("a shape mismatch", "shape", "has shape [4, 3, 3, 3] but"),
    ("non-contiguous epochs", "gap", "not contiguous: 2 missing"),
    ("no theta_0", "no-theta0", "theta_0, the weights before the first step, is required"),
    ("no file matches", "none", "matches no file"),
]


def _one_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("ddm-hpc: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("case, how, message", IMPORT_CASES, ids=[c[0] for c in IMPORT_CASES])
def test_bad_checkpoints_fail_in_one_line(tmp_path, capsys, case, how, message):
    data, out = _npz(tmp_path / "d.npz"), tmp_path / "run"
    pattern = str(tmp_path / "nothing_*.pt") if how == "none" else _write_ckpts(tmp_path, how)
    assert main(_import_args(tmp_path, data, pattern, out)) == 2, case
    assert message in _one_error(capsys)
    assert not out.exists()  # nothing written


FACTORIES = {
    "not a module": ("def f(in_channels, num_classes, image_size, width=8):\n    return 3\n", "returned a int, not an nn.Module"),
    "wrong output width": ("from torch import nn\n\ndef f(in_channels, num_classes, image_size, width=8):\n"
                           "    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 64, 5))\n",
                           "outputs (2, 5) for 2 images but the dataset has 3 classes"),
}


@pytest.mark.parametrize("case", list(FACTORIES))
def test_bad_factories_fail_in_one_line(tmp_path, capsys, case):
    source, message = FACTORIES[case]
    (tmp_path / "net.py").write_text(source)
    data, out = _npz(tmp_path / "d.npz"), tmp_path / "run"
    assert main(["run", *SMOKE, "--dataset", str(data), "--model", f"{tmp_path / 'net.py'}:f", "--n-train", "0",
                 "--n-test", "0", "--out", str(out)]) == 2
    assert message in _one_error(capsys)
    assert not out.exists()
