"""Learned soft labels for synsets (--syn-labels learn): why they are needed, and that they plumb through."""
from __future__ import annotations

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ddm_hpc.unlearn import FinetuneSpec, finetune_many
from ddm_hpc.cli import main
from ddm_hpc.distill import per_group_grads
from ddm_hpc.synsets import read_synsets


def _head_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def test_hard_label_classifier_gradient_can_never_oppose_the_real_one():
    """With features >= 0 (ReLU before the last Linear), CE gradients on the last layer have a fixed sign
    pattern per class: cos(grad syn, -grad real) <= 0 for any image labelled with the real data's class.
    A soft label with less mass on the class than the model predicts flips it (the reason for learn)."""
    model = _head_model()
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(1)
    x_real, y_real = torch.randn(32, 6, generator=g), torch.zeros(32, dtype=torch.long)
    real = torch.autograd.grad(F.cross_entropy(model(x_real), y_real), [params["2.weight"]])[0]
    worst = -1.0
    for _ in range(200):  # random synthetic inputs, all labelled class 0
        xs = torch.randn(1, 6, generator=g) * 3
        syn = torch.autograd.grad(F.cross_entropy(model(xs), torch.zeros(1, dtype=torch.long)),
                                  [params["2.weight"]])[0]
        worst = max(worst, float(F.cosine_similarity(syn.flatten(), -real.flatten(), 0)))
    assert worst <= 1e-6
    soft = torch.tensor([[0.0, 0.5, 0.5]])  # "looks like class 0, is not class 0"
    xs = x_real[:1]
    syn = torch.autograd.grad(F.cross_entropy(model(xs), soft), [params["2.weight"]])[0]
    assert float(F.cosine_similarity(syn.flatten(), -real.flatten(), 0)) > 0.3


def test_per_group_grads_with_one_hot_targets_equal_hard_labels():
    model = _head_model()
    params = {k: v.detach() for k, v in model.named_parameters()}
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(3, 4, 6, generator=g), torch.randint(0, 3, (3, 4), generator=g)
    w = torch.ones(3, 4)
    for impl in ("vmap", "loop"):
        hard = per_group_grads(model, params, x, y, w, impl)
        soft = per_group_grads(model, params, x, F.one_hot(y, 3).float(), w, impl)
        for a, b in zip(hard, soft):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_finetune_on_one_hot_targets_equals_hard_labels():
    model = _head_model()
    theta = {k: v.detach() for k, v in model.named_parameters()}
    g = torch.Generator().manual_seed(3)
    sx, sy = torch.randn(4, 6, generator=g), torch.tensor([0, 1, 2, 0])
    spec = FinetuneSpec(torch.tensor([[0, 1], [2, 3]]), torch.tensor([[1.0, 0.5], [2.0, 0.0]]))
    ev = torch.randn(5, 6, generator=g)
    cpu = torch.device("cpu")
    hard = finetune_many(model, theta, sx, sy, spec, 3, 0.1, 1.0, ev, 2, cpu, show_progress=False)
    soft = finetune_many(model, theta, sx, F.one_hot(sy, 3).float(), spec, 3, 0.1, 1.0, ev, 2, cpu,
                         show_progress=False)
    torch.testing.assert_close(hard, soft, rtol=1e-5, atol=1e-7)


def test_learned_labels_are_distributions_and_reach_the_attribute_stage(tmp_path, mnist_root):
    out = tmp_path / "run"
    args = ["run", "--preset", "smoke", "--data-root", str(mnist_root), "--out", str(out), "--no-progress",
            "--syn-labels", "learn", "--search", "flat", "--group-chunk", "8"]  # 4 blocks; learned labels: the default
    assert main(args) == 0
    with h5py.File(out / "synsets.h5") as f:
        assert f.attrs["syn_labels"] == "learn"
        t, c = f["cluster/targets"][()], f["cluster/group_class"][()]
        assert t.shape == (30, 10, 10) and t.dtype == np.float32  # 10 images per synset, a distribution each
        np.testing.assert_allclose(t.sum(-1), 1.0, rtol=1e-5)
        q_c = t[np.arange(30), :, c]
        assert (q_c < 0.9 - 1e-3).mean() > 0.5  # moved off the init (0.9 on the class)
    level = read_synsets(out, "cluster")
    assert level.targets is not None and level.flat_targets().shape == (300, 10)  # one row per image
    torch.testing.assert_close(level.subset(torch.tensor([3, 4])).targets, level.targets[3:5])
    with h5py.File(out / "attribution.h5") as f:  # the attribute stage fine-tuned on them
        outputs = f["outputs"][()]
    assert np.isfinite(outputs).all() and outputs.shape[0] == 30
