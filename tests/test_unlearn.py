"""Unlearning by fine-tuning: removal specs, matched weights, the batched fine-tune against a loop, and the
Unlearner's one resolution of steps, rate and weights."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ddm_hpc.models import build_model
from ddm_hpc.unlearn import FinetuneSpec, finetune_many, group_weights, removal_spec


def test_removal_spec():
    p = torch.tensor([[1, 0, 1, 0], [0, 1, 1, 1]], dtype=torch.uint8)
    spec = removal_spec(p, ipc=2, group_weight=torch.tensor([4.0, 1.0, 1.0, 2.0]))
    assert spec.rows.shape == (2, 4)
    # each removed group adds weight * mean over its ipc images
    assert spec.rows[0].tolist() == [2, 3, 6, 7] and spec.weights[0].tolist() == [0.5, 0.5, 1.0, 1.0]
    assert spec.rows[1, :2].tolist() == [0, 1] and spec.weights[1].tolist() == [2.0, 2.0, 0, 0]


def test_matched_group_weights_follow_eq2():
    from ddm_hpc.synsets import SynsetLevel

    level = SynsetLevel(torch.zeros(2, 1, 1, 2, 2), torch.zeros(2, 1, dtype=torch.long), torch.zeros(2),
                        torch.tensor([2.0, 1.0]), torch.tensor([4.0, 4.0]), torch.tensor([32, 64]), 1.0)
    w = group_weights(level, "matched", train_lr=0.01, momentum=0.9, batch_size=64, finetune_lr=0.01)
    # (0.01 / 0.1) / 0.01 * n/B * |real|/|syn| = 10 * [0.5, 1] * [0.5, 0.25]
    torch.testing.assert_close(w, torch.tensor([2.5, 2.5]))
    assert group_weights(level, "uniform", 0.01, 0.9, 64, 0.01).tolist() == [1.0, 1.0]
    # --save-every 3: each recorded step spans 3 epochs, so one fine-tune step undoes 3 epochs' contribution
    torch.testing.assert_close(group_weights(level, "matched", 0.01, 0.9, 64, 0.01, epochs_per_step=3.0), 3 * w)


def test_unlearner_scales_matched_weights_by_epochs_per_recorded_step(tmp_path, mnist_root):
    from ddm_hpc import train
    from ddm_hpc.config import PAIRS_DISTILL, Config
    from ddm_hpc.context import RunContext
    from ddm_hpc.unlearn import Unlearner

    cfg = Config.from_dict({"data": {"n_train": 100, "n_test": 20, "data_root": str(mnist_root)},
                            "model": {"width": 4}, "train": {"epochs": 4, "save_every": 2},
                            "distill": PAIRS_DISTILL,  # trajectory pairs: tau matched steps
                            "runtime": {"out": str(tmp_path), "progress": False}})
    train.run(cfg)
    u = Unlearner.of_run(RunContext(cfg))
    assert u.steps == 2 and u.epochs_per_step == 2.0  # tau = 2 recorded steps of 2 epochs each


@pytest.mark.parametrize("direction", [1.0, -1.0])
def test_batched_finetune_equals_loop(direction):
    torch.manual_seed(0)
    model = build_model("convnet", 1, 3, (8, 8), width=4, depth=2)
    theta = {k: v.detach().clone() for k, v in model.named_parameters()}
    g = torch.Generator().manual_seed(1)
    syn_x = torch.randn(6, 1, 8, 8, generator=g)
    syn_y = torch.randint(0, 3, (6,), generator=g)
    eval_x = torch.randn(5, 1, 8, 8, generator=g)
    spec = FinetuneSpec(torch.tensor([[0, 3, 0], [1, 2, 5]]), torch.tensor([[0.5, 2.0, 0.0], [1.0, 0.3, 1.0]]))
    steps, lr = 3, 0.1
    got = finetune_many(model, theta, syn_x, syn_y, spec, steps, lr, direction, eval_x, chunk=1,
                        device=torch.device("cpu"), show_progress=False)
    for m in range(2):
        ref = build_model("convnet", 1, 3, (8, 8), width=4, depth=2)
        ref.load_state_dict(theta)
        opt = torch.optim.SGD(ref.parameters(), lr=lr)
        keep = spec.weights[m] > 0
        xb, yb, wb = syn_x[spec.rows[m][keep]], syn_y[spec.rows[m][keep]], spec.weights[m][keep]
        for _ in range(steps):
            opt.zero_grad()
            (direction * (F.cross_entropy(ref(xb), yb, reduction="none") * wb).sum()).backward()
            opt.step()
        with torch.no_grad():
            want = ref(eval_x).softmax(-1)
        torch.testing.assert_close(got[m], want, rtol=1e-4, atol=1e-5)
    # the models really moved, and the chunk size does not change the answer
    assert not torch.allclose(got[0], got[1])
    again = finetune_many(model, theta, syn_x, syn_y, spec, steps, lr, direction, eval_x, chunk=2,
                          device=torch.device("cpu"), show_progress=False)
    torch.testing.assert_close(again, got, rtol=1e-5, atol=1e-6)


def test_the_unlearner_resolves_a_runs_defaults_once(tmp_path, mnist_root):
    """``--finetune-steps 0`` means tau and ``--finetune-lr 0`` the training rate, resolved in ``Unlearner.of_run``;
    unlearning perturbations equals fine-tuning theta_tau by hand on the removed synsets with matched weights."""
    import json

    from ddm_hpc.cli import main
    from ddm_hpc.config import PAIRS_DISTILL, Config
    from ddm_hpc.context import RunContext
    from ddm_hpc.synsets import SynsetLevel
    from ddm_hpc.trajectory import TrajectoryReader
    from ddm_hpc.unlearn import Unlearner

    out, cpu = tmp_path / "run", torch.device("cpu")
    assert main(["train", "--preset", "smoke", "--data-root", str(mnist_root), "--out", str(out), "--no-progress"]) == 0
    saved = {**json.loads((out / "config.json").read_text()), "runtime": {"out": str(out), "progress": False}}
    cfg = Config.from_dict(saved)
    u = Unlearner.of_run(RunContext(cfg, device=cpu))
    reader = TrajectoryReader.of_run(out)
    assert (u.steps, u.lr, u.scale) == (1, cfg.train.lr, "uniform") and reader.tau == 3  # influence: one step
    pairs = Unlearner.of_run(RunContext(Config.from_dict({**saved, "distill": PAIRS_DISTILL}), device=cpu))
    assert (pairs.steps, pairs.lr, pairs.scale) == (reader.tau, cfg.train.lr, "matched")
    u = pairs  # below: the matched tau-step fine-tune, recomputed
    assert torch.equal(reader.table.flatten(u.theta), reader.flat(reader.tau))
    tuned = Unlearner.of_run(RunContext(Config.from_dict({**saved, "attribute": {"finetune_steps": 2,
                                                                                 "finetune_lr": 0.05}}), device=cpu))
    assert (tuned.steps, tuned.lr) == (2, 0.05)

    g = torch.Generator().manual_seed(0)
    level = SynsetLevel(torch.randn(3, 2, 1, 28, 28, generator=g), torch.tensor([[0, 0], [4, 4], [7, 7]]),
                        torch.tensor([0, 4, 7]), torch.tensor([2.0, 1.0, 3.0]), torch.tensor([4.0, 2.0, 1.0]),
                        torch.tensor([32, 64, 16]), 1.0)
    pert = torch.tensor([[0, 1, 1], [1, 0, 0]], dtype=torch.uint8)
    x = RunContext(cfg).bundle.x_test[:5]
    got = u.unlearn(level, pert, x, chunk=2)
    w = group_weights(level, "matched", cfg.train.lr, cfg.train.momentum, cfg.train.batch_size, cfg.train.lr)
    want = finetune_many(u.model, reader.params(reader.tau), level.images.flatten(0, 1), level.labels.reshape(-1),
                         removal_spec(pert, 2, w), 3, cfg.train.lr, 1.0, x, 2, cpu, show_progress=False)
    assert got.shape == (2, 5, 10) and torch.equal(got, want)
    # a block of rows alone is fine-tuned as within the whole (same padding width; here one model per call)
    torch.testing.assert_close(u.unlearn(level, pert, x, rows=slice(1, 2), chunk=1), want[1:2], rtol=1e-5, atol=1e-6)
