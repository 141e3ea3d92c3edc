"""Tests of the ``privacy`` diagnostic: SSIM, nearest real images, grids, membership inference, end to end."""
from __future__ import annotations

import math
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ddm_hpc.diagnose.privacy import (PANEL_GAP, TITLE_PX, chance_advantage, gaussian_window, image_grid, l2_matrix,
                                      mia_advantage, mia_auc, mia_roc, nearest_real, privacy_section, real_vs_real,
                                      ssim, ssim_matrix, train_on_synset, with_title)

C1, C2 = 0.01 ** 2, 0.03 ** 2


def _rand(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ----------------------------------------------------------------------------- SSIM
def test_ssim_identical_is_one() -> None:
    for shape in ((4, 1, 16, 16), (3, 3, 20, 13)):
        x = _rand(shape, 0)
        np.testing.assert_allclose(ssim(x, x).numpy(), 1.0, atol=1e-12)


def test_ssim_constant_images() -> None:
    # variances and covariance are 0: SSIM = (2 c1 c2 + C1) / (c1^2 + c2^2 + C1)
    for a, b in ((0.2, 0.7), (0.0, 1.0), (0.5, 0.5), (0.9, 0.1)):
        x = torch.full((2, 3, 12, 15), a, dtype=torch.float64)
        y = torch.full((2, 3, 12, 15), b, dtype=torch.float64)
        want = (2 * a * b + C1) / (a * a + b * b + C1)
        np.testing.assert_allclose(ssim(x, y).numpy(), want, rtol=1e-10, atol=1e-12)
    # data_range scales C1, C2
    x, y = torch.full((1, 1, 8, 8), 2.0), torch.full((1, 1, 8, 8), 5.0)
    c1 = (0.01 * 10) ** 2
    np.testing.assert_allclose(float(ssim(x, y, data_range=10.0)), (2 * 10 + c1) / (4 + 25 + c1), rtol=1e-10)


def test_ssim_hand_computed_pairs() -> None:
    # 2x2 images: the 11x11 window shrinks to 2x2 with equal weights 1/4, one window position
    x = torch.tensor([[[[0.0, 0.0], [1.0, 1.0]]]])
    y = torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]])
    # mu = 0.5 each, var = 0.25 each, cov = E[xy] - 0.25 = 0.25 - 0.25 = 0
    want = (2 * 0.25 + C1) * (0 + C2) / ((0.25 + 0.25 + C1) * (0.25 + 0.25 + C2))  # = C2 / (0.5 + C2)
    np.testing.assert_allclose(float(ssim(x, y)), want, rtol=1e-10)
    np.testing.assert_allclose(float(ssim(x, y)), 0.0009 / 0.5009, rtol=1e-10)
    # x against its negative: cov = -0.25 -> (C2 - 0.5) / (C2 + 0.5)
    np.testing.assert_allclose(float(ssim(x, 1 - x)), (C2 - 0.5) / (C2 + 0.5), rtol=1e-10)


def test_ssim_matches_direct_windowed_statistics() -> None:
    """A 7x9 pair with a 5x5 window: explicit loops over the 3x5 valid positions in numpy."""
    x, y = _rand((1, 2, 7, 9), 1), _rand((1, 2, 7, 9), 2)
    g = np.exp(-((np.arange(5) - 2.0) ** 2) / (2 * 1.5 ** 2))
    w2 = np.outer(g, g) / np.outer(g, g).sum()
    vals = []
    for c in range(2):
        a, b = x[0, c].numpy(), y[0, c].numpy()
        for i in range(3):
            for j in range(5):
                pa, pb = a[i:i + 5, j:j + 5], b[i:i + 5, j:j + 5]
                ma, mb = (w2 * pa).sum(), (w2 * pb).sum()
                va, vb = (w2 * (pa - ma) ** 2).sum(), (w2 * (pb - mb) ** 2).sum()
                cov = (w2 * (pa - ma) * (pb - mb)).sum()
                vals.append((2 * ma * mb + C1) * (2 * cov + C2) / ((ma ** 2 + mb ** 2 + C1) * (va + vb + C2)))
    np.testing.assert_allclose(float(ssim(x, y, window=5, sigma=1.5)), np.mean(vals), rtol=1e-10)
    # the window sums to 1 and is symmetric
    gw = gaussian_window(11, 1.5)
    assert abs(float(gw.sum()) - 1.0) < 1e-12 and torch.equal(gw, gw.flip(0))


def test_ssim_symmetric_and_matrix_equals_pairwise() -> None:
    a, b = _rand((5, 3, 14, 12), 3), _rand((7, 3, 14, 12), 4)
    s_ab = ssim(a[:5], b[:5])
    np.testing.assert_allclose(s_ab.numpy(), ssim(b[:5], a[:5]).numpy(), atol=1e-13)
    m = ssim_matrix(a, b, chunk=2)  # 2 does not divide 5: the last block is short
    assert m.shape == (5, 7)
    pairwise = torch.stack([ssim(a[i:i + 1].expand(7, -1, -1, -1), b) for i in range(5)])
    np.testing.assert_allclose(m.numpy(), pairwise.numpy(), atol=1e-10)
    np.testing.assert_allclose(ssim_matrix(a, b).numpy(), m.numpy(), atol=1e-12)  # automatic chunk
    np.testing.assert_allclose(ssim_matrix(b, a).numpy(), m.T.numpy(), atol=1e-10)
    assert not torch.allclose(m, torch.ones_like(m))  # random images are not similar


# ----------------------------------------------------------------------------- nearest neighbours
def _brute(syn: torch.Tensor, real: torch.Tensor, exclude_self: bool = False) -> dict[str, np.ndarray]:
    out = {"l2_index": [], "l2": [], "ssim_index": [], "ssim": []}
    for i in range(len(syn)):
        d = [float(np.linalg.norm((syn[i] - real[j]).numpy().ravel())) for j in range(len(real))]
        s = [float(ssim(syn[i:i + 1], real[j:j + 1])) for j in range(len(real))]
        if exclude_self:
            d[i], s[i] = math.inf, -math.inf
        out["l2_index"].append(int(np.argmin(d)))
        out["l2"].append(min(d))
        out["ssim_index"].append(int(np.argmax(s)))
        out["ssim"].append(max(s))
    return {k: np.array(v) for k, v in out.items()}


def test_nearest_real_matches_brute_force() -> None:
    real = _rand((12, 1, 10, 10), 5)
    syn = _rand((5, 1, 10, 10), 6)
    syn[0] = (real[7] + 0.01 * _rand((1, 10, 10), 7)).clamp(0, 1)  # planted near-copy of real image 7
    got = nearest_real(syn, real, chunk=3)
    want = _brute(syn, real)
    np.testing.assert_array_equal(got["l2_index"], want["l2_index"])
    np.testing.assert_array_equal(got["ssim_index"], want["ssim_index"])
    np.testing.assert_allclose(got["l2"], want["l2"], rtol=1e-10)
    np.testing.assert_allclose(got["ssim"], want["ssim"], rtol=1e-10)
    assert got["l2_index"][0] == 7 and got["ssim_index"][0] == 7 and got["l2"][0] < 0.1
    np.testing.assert_allclose(l2_matrix(syn, real).numpy(), torch.cdist(syn.flatten(1), real.flatten(1)).numpy(),
                               rtol=1e-9)


def test_real_vs_real_excludes_self() -> None:
    real = _rand((9, 3, 11, 11), 8)
    real[5] = real[2]  # an exact duplicate: each is the other's nearest, L2 0, SSIM 1
    got = real_vs_real(real, chunk=4)
    rows = np.arange(9)
    assert (got["l2_index"] != rows).all() and (got["ssim_index"] != rows).all()
    assert got["l2_index"][2] == 5 and got["l2_index"][5] == 2 and got["l2"][2] == 0.0
    assert got["ssim_index"][2] == 5 and abs(got["ssim"][5] - 1.0) < 1e-12
    want = _brute(real, real, exclude_self=True)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-10)


# ----------------------------------------------------------------------------- grids
def test_image_grid_pixel_placement() -> None:
    n, h, w, pad, scale, ncol = 5, 3, 4, 2, 2, 3
    vals = torch.arange(n * h * w, dtype=torch.float64).reshape(n, 1, h, w) % 250 / 255.0  # exact uint8 values
    grid = image_grid(vals, ncol=ncol, pad=pad, pad_value=1.0, scale=scale)
    assert grid.dtype == np.uint8
    assert grid.shape == (2 * (h * scale + pad) + pad, ncol * (w * scale + pad) + pad, 1)
    mask = np.zeros(grid.shape[:2], bool)
    for i in range(n):
        r, c = divmod(i, ncol)
        y0, x0 = pad + r * (h * scale + pad), pad + c * (w * scale + pad)
        for yy in range(h * scale):
            for xx in range(w * scale):
                assert grid[y0 + yy, x0 + xx, 0] == int(round(float(vals[i, 0, yy // scale, xx // scale]) * 255))
        mask[y0:y0 + h * scale, x0:x0 + w * scale] = True
    assert (grid[~mask] == 255).all()  # padding and the empty sixth cell
    # RGB, no padding: the grid is the images tiled; values clipped to [0, 1]
    rgb = _rand((4, 3, 2, 2), 9) * 1.4 - 0.2
    g = image_grid(rgb, ncol=2, pad=0)
    want = np.floor(np.clip(rgb.numpy(), 0, 1) * 255 + 0.5).astype(np.uint8).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(g[:2, :2], want[0])
    np.testing.assert_array_equal(g[:2, 2:], want[1])
    np.testing.assert_array_equal(g[2:, :2], want[2])
    np.testing.assert_array_equal(g[2:, 2:], want[3])


# ----------------------------------------------------------------------------- membership inference
def test_mia_known_values() -> None:
    low, high = np.array([0.1, 0.2, 0.3]), np.array([1.0, 2.0, 3.0, 4.0])
    assert mia_auc(low, high) == 1.0 and mia_advantage(low, high) == 1.0  # members have lower loss
    assert mia_auc(high, low) == 0.0 and mia_advantage(high, low) == 0.0  # the attack's direction is fixed
    same = np.array([0.5, 1.5, 2.5])
    assert mia_auc(same, same) == 0.5 and mia_advantage(same, same) == 0.0
    # members [0.1, 0.5, 0.9] vs non-members [0.3, 0.7, 1.1]: 6 of 9 pairs ordered right; best TPR-FPR 1/3
    m, n = np.array([0.1, 0.5, 0.9]), np.array([0.3, 0.7, 1.1])
    assert abs(mia_auc(m, n) - 6 / 9) < 1e-12 and abs(mia_advantage(m, n) - 1 / 3) < 1e-12
    # a tie counts one half: pairs (-1 vs -1) = 0.5, (-2 vs -1) = 0 -> 0.25
    assert mia_auc(np.array([1.0, 2.0]), np.array([1.0])) == 0.25
    fpr, tpr = mia_roc(m, n)
    assert fpr[0] == tpr[0] == 0.0 and fpr[-1] == tpr[-1] == 1.0 and (np.diff(fpr) >= 0).all()


def test_mia_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    m = np.round(rng.normal(0.8, 0.5, 40), 1)  # rounded: many ties
    n = np.round(rng.normal(1.0, 0.5, 33), 1)
    sm, sn = -m, -n
    auc = np.mean([(a > b) + 0.5 * (a == b) for a in sm for b in sn])
    adv = max(max(np.mean(sm >= t) - np.mean(sn >= t) for t in np.concatenate([sm, sn])), 0.0)
    assert abs(mia_auc(m, n) - auc) < 1e-12
    assert abs(mia_advantage(m, n) - adv) < 1e-12
    assert abs(chance_advantage(500) - math.sqrt(math.log(20) / 500)) < 1e-12


def test_train_on_synset_soft_and_hard_targets() -> None:
    x = _rand((6, 1, 4, 4), 10).float()
    for targets in (torch.tensor([0, 1, 2, 0, 1, 2]), torch.softmax(_rand((6, 3), 11).float() * 3, -1)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
        losses = train_on_synset(model, x, targets, 30, 0.5, 0.9, torch.device("cpu"))
        assert losses.shape == (30,) and losses[-1] < losses[0]
        assert not model.training
        with torch.no_grad():
            final = float(F.cross_entropy(model(x), targets))
        assert final < losses[0]


# ----------------------------------------------------------------------------- end to end on real MNIST
@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory, mnist_root: Path) -> Path:
    from ddm_hpc.cli import main

    out = tmp_path_factory.mktemp("privacy") / "run"
    rc = main(["run", "--preset", "smoke", "--data-root", str(mnist_root), "--out", str(out), "--no-progress"])
    assert rc == 0
    return out


def _context(run: Path, mnist_root: Path, n_real: int = 60, mia_epochs: int = 10):
    from ddm_hpc.config import Config, merge, smoke_preset
    from ddm_hpc.context import RunContext, load_data

    d = merge(merge(Config().to_dict(), smoke_preset()),
              {"data": {"data_root": str(mnist_root)}, "runtime": {"out": str(run), "progress": False},
               "diagnose": {"n_real": n_real, "mia_epochs": mia_epochs}})
    cfg = Config.from_dict(d)
    return RunContext(cfg, load_data(cfg), torch.device("cpu"))


def test_privacy_section_end_to_end(smoke_run: Path, mnist_root: Path) -> None:
    from PIL import Image

    from ddm_hpc.data import denormalize
    from ddm_hpc.diagnose.base import diagnose_dir
    from ddm_hpc.diagnose.privacy import nearest_grid, privacy_variants, synset_grid
    from ddm_hpc.pipeline import materialise
    from ddm_hpc.synsets import read_synsets
    from ddm_hpc.train import accuracy

    dc = _context(smoke_run, mnist_root)
    materialise(dc.cfg, privacy_variants(dc.cfg), dc.bundle)  # what the pipeline does before the diagnose stage
    sec = privacy_section(dc)
    assert sec.name == "privacy"

    # the forward-GM variant was made beside the run, on the same (hard-linked) train.h5 and clusters.h5
    var = smoke_run / "variants" / "ddm-match"
    with h5py.File(var / "synsets.h5", "r") as f:
        assert str(f.attrs["method"]) == "ddm-match" and float(f.attrs["unlearn_direction"]) == -1.0
    assert os.path.samefile(var / "train.h5", smoke_run / "train.h5")
    assert os.path.samefile(var / "clusters.h5", smoke_run / "clusters.h5")
    assert not (var / "attribution.h5").exists()  # only the distill stage ran
    mtime = (var / "synsets.h5").stat().st_mtime_ns
    assert materialise(dc.cfg, privacy_variants(dc.cfg)) == [var] and (var / "synsets.h5").stat().st_mtime_ns == mtime

    rev, fwd = read_synsets(smoke_run, "cluster"), read_synsets(var, "cluster")
    k, ipc = rev.images.shape[:2]
    # smoke: 10 classes x 3 clusters; this run's (influence) synsets hold 10 images each, the forward-GM ones 1
    assert k == 30 and ipc == 10 and fwd.images.shape[:2] == (30, 1)
    to_pix = lambda x: denormalize(x, dc.bundle.mean, dc.bundle.std).clamp(0, 1)  # noqa: E731
    pix_r, pix_f = to_pix(rev.images), to_pix(fwd.images)
    assert not torch.equal(pix_r[:, :1], pix_f)  # the two matchings give different images

    # the numbers, recomputed
    a = sec.arrays
    real_rows = torch.from_numpy(a["real_rows"])
    assert len(real_rows) == 60 and len(set(a["real_rows"].tolist())) == 60
    np.testing.assert_array_equal(a["member_rows"], a["real_rows"][:60])  # n = min(60, 100 test images)
    assert len(a["nonmember_rows"]) == 60 and len(set(a["nonmember_rows"].tolist())) == 60
    real = to_pix(dc.bundle.x_train[real_rows])
    for key, pix in (("reverse", pix_r), ("forward", pix_f)):
        flat = pix.flatten(0, 1)
        d = torch.cdist(flat.double().flatten(1), real.double().flatten(1))
        np.testing.assert_allclose(a[f"nn/{key}/l2"], d.min(1).values.numpy(), rtol=1e-6)
        np.testing.assert_array_equal(a[f"nn/{key}/l2_index"], d.argmin(1).numpy())
        s = ssim(flat, real[torch.from_numpy(a[f"nn/{key}/ssim_index"])])
        np.testing.assert_allclose(a[f"nn/{key}/ssim"], s.numpy(), atol=1e-9)
        np.testing.assert_allclose(a[f"nn/{key}/ssim"], ssim_matrix(flat, real).max(1).values.numpy(), atol=1e-9)
    assert (a["nn/real/l2_index"] != np.arange(60)).all() and (a["nn/real/ssim_index"] != np.arange(60)).all()
    summ = a["nn/summary"]
    assert summ.shape == (3, 4)
    np.testing.assert_allclose(summ[2], [a["nn/real/l2"].mean(), np.median(a["nn/real/l2"]), a["nn/real/ssim"].mean(),
                                         np.median(a["nn/real/ssim"])], rtol=1e-12)

    # membership inference: theta_tau's scores are -CE of the trained target; accuracy equals train.h5's
    model = dc.trained_model()
    mem = torch.from_numpy(a["member_rows"])
    with torch.no_grad():
        ce = F.cross_entropy(model(dc.bundle.x_train[mem]), dc.bundle.y_train[mem], reduction="none")
    np.testing.assert_allclose(a["mia/theta_tau/member_score"], -ce.double().numpy(), rtol=1e-4, atol=1e-5)
    with h5py.File(smoke_run / "train.h5", "r") as f:
        assert abs(a["mia/accuracy"][0] - float(f.attrs["test_accuracy"])) < 1e-6
    assert abs(a["mia/accuracy"][0] - accuracy(model, dc.bundle.x_test, dc.bundle.y_test)) < 1e-12
    for i, m in enumerate(sec.attrs["mia_models"]):
        ms, ns = a[f"mia/{m}/member_score"], a[f"mia/{m}/nonmember_score"]
        assert ms.shape == ns.shape == (60,)
        assert abs(a["mia/auc"][i] - mia_auc(-ms, -ns)) < 1e-12
        assert abs(a["mia/advantage"][i] - mia_advantage(-ms, -ns)) < 1e-12
        assert 0.0 <= a["mia/advantage"][i] <= 1.0
        row = f"| {a['mia/accuracy'][i]:.3f} | {a['mia/auc'][i]:.3f} | {a['mia/advantage'][i]:.3f} |"
        assert row in "\n".join(sec.lines)
    assert a["mia/reverse/train_loss"].shape == (10,) and a["mia/theta_tau/train_loss"].shape == (0,)
    body = "\n".join(sec.lines)
    assert f"| reverse GM (DDM) | 300 | {summ[0, 0]:.3f} | {summ[0, 1]:.3f} |" in body  # 30 synsets x 10 images
    assert "Membership advantage" in body

    # pictures: the expected pixel size, not blank, grids placed pixel-exactly
    names = [p.name for p in sec.images]
    assert names == ["privacy_synsets.png", "privacy_nearest.png", "privacy_nn_hist.png"]
    assert all(p.parent == diagnose_dir(dc.run_dir) and p.is_file() for p in sec.images)
    cell = 28 + 2
    wrap = 3  # one band of rows per class: C = 3 clusters per class in the smoke preset
    bands = k // wrap
    gw, gh = wrap * cell + 2, bands * (ipc * cell + 2)
    cols = np.arange(k)
    grid_img = np.asarray(Image.open(sec.images[0]))
    # each panel is as wide as its grid or its title, whichever is wider
    left = max(gw, with_title(np.zeros((1, 1, 1), np.uint8), "Reverse gradient matching (DDM)").shape[1])
    right = max(gw, with_title(np.zeros((1, 1, 1), np.uint8), "Gradient matching (DDM-match)").shape[1])
    assert grid_img.shape == (TITLE_PX + gh, left + PANEL_GAP + right)  # grey: one channel
    np.testing.assert_array_equal(grid_img[TITLE_PX:, :gw], synset_grid(pix_r, cols, 1, wrap)[:, :, 0])
    x1 = left + PANEL_GAP
    fgrid = synset_grid(pix_f, cols, 1, wrap)[:, :, 0]  # one image per synset: the shorter panel, top-aligned
    np.testing.assert_array_equal(grid_img[TITLE_PX:TITLE_PX + len(fgrid), x1:x1 + gw], fgrid)
    assert (grid_img[TITLE_PX + len(fgrid):, x1:x1 + gw] == 255).all()  # blank below it
    # band b, column c holds cluster b * wrap + c
    band = synset_grid(pix_r, cols, 1, wrap)
    want4 = np.floor(pix_r[4, 0, 0].double().numpy() * 255 + 0.5).astype(np.uint8)
    y4 = (ipc * cell + 2) + 2
    np.testing.assert_array_equal(band[y4:y4 + 28, 2 + cell:2 + cell + 28, 0], want4)
    assert grid_img[:TITLE_PX].min() < 128  # the titles were drawn
    near = np.asarray(Image.open(sec.images[1]))
    assert near.shape[0] == TITLE_PX + bands * (2 * ipc * cell + 2)
    np.testing.assert_array_equal(near[TITLE_PX:, :gw],
                                  nearest_grid(pix_r, real, a["nn/reverse/l2_index"], cols, 1, wrap)[:, :, 0])
    # row 2 of the left panel is the nearest real image of cluster 0's synthetic image
    r0 = int(a["nn/reverse/l2_index"][0])
    y0 = TITLE_PX + 2 + cell
    want = np.floor(real[r0, 0].double().numpy() * 255 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(near[y0:y0 + 28, 2:30], want)
    hist = np.asarray(Image.open(sec.images[2]))
    assert hist.shape[:2] == (360, 1000)
    for img in (grid_img, near, hist):
        assert img.astype(float).std() > 0


def test_privacy_section_missing_run(tmp_path: Path, mnist_root: Path) -> None:
    from ddm_hpc.errors import StageError

    dc = _context(tmp_path / "empty", mnist_root)
    with pytest.raises(StageError, match="ddm-hpc run"):
        privacy_section(dc)


def test_findings_follow_the_numbers() -> None:
    from ddm_hpc.diagnose.privacy import _findings

    # rows reverse, forward, real; columns L2 mean, L2 median, SSIM mean, SSIM median
    summary = np.array([[6.0, 6.5, 0.40, 0.41], [3.0, 3.1, 0.70, 0.71], [6.0, 6.0, 0.55, 0.56]])
    mia = {"theta_tau": {"advantage": 0.30, "accuracy": 0.95}, "reverse": {"advantage": 0.01, "accuracy": 0.11},
           "forward": {"advantage": 0.05, "accuracy": 0.80}}
    text = " ".join(_findings(summary, mia, bound=0.077, chance=0.1, init_note="--init real, 100 distillation steps"))
    assert "Reverse-GM images are farther from the real data than forward-GM images" in text
    assert "less similar to their most similar real image" in text
    assert "farther from a real image than real images are to each other by L2" in text
    assert "theta_tau 0.300 (above chance)" in text and "the reverse-GM model 0.010 (within chance)" in text
    assert "reaches only 0.110 test accuracy" in text and "much closer" not in text
    # near-copies of real images (tiny L2, high SSIM) are called out; a well-trained reverse model gets no caveat
    summary = np.array([[0.2, 0.2, 0.97, 0.97], [0.3, 0.3, 0.96, 0.96], [6.0, 6.0, 0.55, 0.56]])
    mia["reverse"]["accuracy"] = 0.78
    text = " ".join(_findings(summary, mia, bound=0.077, chance=0.1, init_note="--init real, 5 distillation steps"))
    assert "Reverse-GM images are closer to the real data" in text and "much closer" in text
    assert "initialised from" in text and "reaches only" not in text and "not directly comparable" not in text
