"""Train stage: reproducibility, recorded trajectory, leave-out data order."""
from __future__ import annotations

import torch

from ddm_hpc.config import TrainConfig
from ddm_hpc.models import build_model
from ddm_hpc.storage import ParamTable
from ddm_hpc.train import epoch_order, train_trajectory


def _data(n=96):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = torch.arange(n) % 3
    x[:, :, :2] += y[:, None, None, None].float()
    return x, y


def _train(seed=0, keep=None, epochs=3, save_every=1):
    torch.manual_seed(seed)
    model = build_model("convnet", 1, 3, (8, 8), width=4, depth=2)
    x, y = _data()
    cfg = TrainConfig(epochs=epochs, batch_size=16, lr=0.05, save_every=save_every)
    return train_trajectory(model, x, y, x[:20], y[:20], cfg, seed, torch.device("cpu"), keep=keep,
                            show_progress=False)


def test_same_config_gives_bit_identical_trajectory():
    a, b = _train(), _train()
    assert torch.equal(a.params, b.params)
    c = _train(seed=1)
    assert not torch.equal(a.params, c.params)


def test_trajectory_rows_and_table():
    t = _train(epochs=5, save_every=2)
    assert t.epochs == [0, 2, 4, 5]  # theta_0, every 2 epochs, and theta_tau
    assert t.params.shape == (4, t.table.total)
    assert len(t.test_accuracy) == 4 and t.test_accuracy[-1] > 0.5
    assert not torch.equal(t.params[0], t.params[-1])
    torch.manual_seed(0)
    fresh = build_model("convnet", 1, 3, (8, 8), width=4, depth=2)
    assert torch.equal(t.params[0], ParamTable.from_module(fresh).flatten(dict(fresh.named_parameters())))


def test_param_table_roundtrip():
    model = build_model("convnet", 1, 3, (8, 8), width=4, depth=2)
    table = ParamTable.from_module(model)
    params = dict(model.named_parameters())
    flat = table.flatten(params)
    back = table.unflatten(flat)
    for name, p in params.items():
        assert torch.equal(back[name], p.detach())


def test_keep_mask_preserves_the_full_runs_order():
    n = 50
    keep = torch.ones(n, dtype=torch.bool)
    keep[::7] = False
    full = epoch_order(n, 0, 3)
    kept = full[keep[full]]
    assert kept.tolist() == [i for i in full.tolist() if keep[i]]  # same order, removed rows dropped
    # keeping everything reproduces the full run exactly; dropping rows changes the result
    all_kept = _train(keep=torch.ones(96, dtype=torch.bool))
    assert torch.equal(all_kept.params, _train().params)
    dropped = torch.ones(96, dtype=torch.bool)
    dropped[:10] = False
    assert not torch.equal(_train(keep=dropped).params[-1], _train().params[-1])


def test_dataset_too_large_for_the_device_stays_put_and_trains_the_same(monkeypatch):
    """A training set over the device budget is not copied: minibatches are gathered where it lives, moved,
    and the trajectory is the same bit for bit."""
    import ddm_hpc.data.batches as batches

    keep = torch.ones(96, dtype=torch.bool)
    keep[::5] = False
    resident = _train(keep=keep)
    moved = []
    real_to = torch.Tensor.to
    monkeypatch.setattr(batches, "resident_on", lambda x, device: False)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: moved.append(tuple(self.shape)) or real_to(self, *a, **k))
    streamed = _train(keep=keep)
    assert torch.equal(resident.params, streamed.params)
    assert (96, 1, 8, 8) not in moved and (16, 1, 8, 8) in moved  # batches moved, never the whole set
    monkeypatch.undo()
    assert batches.resident_on(torch.zeros(3), torch.device("cpu"))  # already there


def test_mapped_images_and_loader_workers_train_the_same(tmp_path):
    """Training from the streamed cache, in-process or with 2 worker processes gathering the minibatches,
    follows the in-memory trajectory bit for bit (with a keep mask); the mapped set is never made resident
    on the CPU."""
    import h5py
    import numpy as np

    from ddm_hpc.data import load_dataset, mapped_dataset, resident_on

    rng = np.random.default_rng(0)
    y = np.arange(120) % 3
    x = rng.integers(0, 120, (120, 8, 8), dtype=np.uint8)
    x[:, :2] += (40 * y).astype(np.uint8)[:, None, None]
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["x"], f["y"] = x, y
    ref = load_dataset(str(tmp_path / "d.h5"), seed=0)
    mapped = mapped_dataset(str(tmp_path / "d.h5"), tmp_path, tmp_path / "cache", seed=0)
    assert not resident_on(mapped.x_train, torch.device("cpu"))
    keep = torch.ones(len(ref.y_train), dtype=torch.bool)
    keep[::4] = False

    def run(b, workers):
        torch.manual_seed(0)
        model = build_model("convnet", 1, 3, (8, 8), width=4, depth=2)
        cfg = TrainConfig(epochs=2, batch_size=16, lr=0.05, save_every=1)
        return train_trajectory(model, b.x_train, b.y_train, b.x_test, b.y_test, cfg, 0, torch.device("cpu"),
                                keep=keep, show_progress=False, loader_workers=workers).params

    in_memory = run(ref, 0)
    assert torch.equal(run(mapped, 0), in_memory)
    assert torch.equal(run(mapped, 2), in_memory)
