"""DSA augmentation during matching (``--augment``): the transforms against independent references, the siamese
rule in the matcher, gradients through the augmentation, shard invariance, the option checks."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from ddm_hpc import augment as A
from ddm_hpc.config import AUGMENT_PARTS, DSA_STRATEGY, PAIRS_DISTILL, Config, DistillConfig, TrainConfig, _key_dict
from ddm_hpc.distill import Matcher, distill_groups
from ddm_hpc.errors import ConfigError
from ddm_hpc.models import build_model
from ddm_hpc.train import train_trajectory
from ddm_hpc.trajectory import MemoryTrajectory
from ddm_hpc.utils import generator


def _image(n=3, c=1, h=9, w=9, seed=0, dtype=torch.float32):
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _draw(part, **kw):
    return dataclasses.replace(A.Draw(part=part), **kw)


# ----------------------------------------------------------------------------- the transforms

@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-6), (torch.float32, 1e-5)])
def test_geometric_ops_at_identity_return_the_input(dtype, atol):
    """float32 resampling at the pixel centres rounds the sample positions (~1e-7 of the side): 1e-5 there."""
    x = _image(c=3, h=7, w=10, dtype=dtype)  # not square: the identity must not depend on it
    for out in (A.scale(x, 1.0, 1.0), A.rotate(x, 0.0), A.translate(x, 0, 0), A.cutout(x, -100, -100),
                A.apply(x, _draw("flip", flip=False)), A.apply(x, _draw("color"))):  # colour at b 0, s 1, c 1
        torch.testing.assert_close(out, x, rtol=0, atol=atol)


@pytest.mark.parametrize("k", [1, -1, 2])
def test_rotation_by_right_angles_is_rot90(k):
    """align_corners=True maps pixel centres onto pixel centres: +90 degrees is torch.rot90(k=1) exactly."""
    x = _image(c=2, h=7, w=7)
    torch.testing.assert_close(A.rotate(x, k * math.pi / 2), torch.rot90(x, k, dims=(2, 3)), rtol=0, atol=1e-5)


def _linear_image(h, w, a=0.7, b=-1.3, c=0.4):
    i, j = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    return (a * i + b * j + c)[None, None], lambda ii, jj: a * ii + b * jj + c


def test_scale_and_rotation_resample_a_linear_image_exactly():
    """Bilinear interpolation reproduces a linear image wherever it samples inside it: the output pixel (i, j)
    reads the input at the centre plus the transformed offset (rows along v, columns along u)."""
    h, w = 9, 11
    x, f = _linear_image(h, w)
    ci, cj = (h - 1) / 2, (w - 1) / 2
    i, j = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    sx, sy = 0.9, 0.75  # < 1: every sample lies inside
    want = f(ci + sy * (i - ci), cj + sx * (j - cj))
    torch.testing.assert_close(A.scale(x, sx, sy)[0, 0], want, rtol=0, atol=1e-9)
    # rotation by 10 degrees, in normalised coordinates (u = (j - cj) / cj, v = (i - ci) / ci)
    t = math.radians(10)
    u, v = (j - cj) / cj, (i - ci) / ci
    su, sv = math.cos(t) * u - math.sin(t) * v, math.sin(t) * u + math.cos(t) * v
    ii, jj = ci + sv * ci, cj + su * cj
    inside = (ii >= 0) & (ii <= h - 1) & (jj >= 0) & (jj <= w - 1)
    assert inside.sum() > 60
    torch.testing.assert_close(A.rotate(x, t)[0, 0][inside], f(ii, jj)[inside], rtol=0, atol=1e-9)


@pytest.mark.parametrize("dy,dx", [(2, -3), (-4, 0), (1, 1)])
def test_translation_is_roll_on_the_interior_and_zero_outside(dy, dx):
    x = _image(c=2, h=8, w=9) + 10.0  # no zeros of its own
    out = A.translate(x, dy, dx)
    rolled = torch.roll(x, shifts=(-dy, -dx), dims=(2, 3))  # rolled[i, j] = x[i + dy, j + dx] (mod the side)
    rows = slice(max(0, -dy), 8 - max(0, dy))
    cols = slice(max(0, -dx), 9 - max(0, dx))
    torch.testing.assert_close(out[..., rows, cols], rolled[..., rows, cols], rtol=0, atol=0)
    assert (out != 0).sum() == 2 * 3 * (8 - abs(dy)) * (9 - abs(dx))  # everything shifted in is zero


@pytest.mark.parametrize("cy,cx,box", [(10, 12, (3, 17, 5, 19)), (3, 27, (0, 10, 20, 28)), (0, 0, (0, 7, 0, 7))])
def test_cutout_zeroes_exactly_the_drawn_box(cy, cx, box):
    """28 x 28 (MNIST): a 14-pixel box, rows cy - 7 .. cy + 6 and the same for columns, clipped to the image."""
    x = _image(n=2, c=1, h=28, w=28) + 10.0
    assert A.cutout_size(28) == 14 and A.cutout_box(28, 28, cy, cx) == box
    out = A.cutout(x, cy, cx)
    r0, r1, c0, c1 = box
    inside = torch.zeros(28, 28, dtype=torch.bool)
    inside[r0:r1, c0:c1] = True
    assert (out[..., inside] == 0).all() and torch.equal(out[..., ~inside], x[..., ~inside])


def test_colour_and_flip():
    x = _image(c=3)
    torch.testing.assert_close(A.brightness(x, 0.3), x + 0.3)
    c = A.contrast(x, 1.4)
    torch.testing.assert_close(c.mean((1, 2, 3)), x.mean((1, 2, 3)), rtol=0, atol=1e-6)  # the image mean stays
    torch.testing.assert_close(c - c.mean((1, 2, 3), keepdim=True), 1.4 * (x - x.mean((1, 2, 3), keepdim=True)))
    torch.testing.assert_close(A.saturation(x, 0.0), x.mean(1, keepdim=True).expand_as(x))  # grey
    gray = _image(c=1)
    torch.testing.assert_close(A.saturation(gray, 1.7), gray, rtol=0, atol=1e-6)  # one channel: a no-op
    torch.testing.assert_close(A.apply(x, _draw("flip", flip=True)), x.flip(3), rtol=0, atol=0)


def test_draws_cover_dsa_ranges_and_consume_the_same_numbers():
    g = torch.Generator().manual_seed(1)
    draws = [A.draw(AUGMENT_PARTS, 28, 28, g) for _ in range(3000)]
    arr = lambda f: np.array([f(d) for d in draws], dtype=float)  # noqa: E731
    b, s, c = arr(lambda d: d.brightness), arr(lambda d: d.saturation), arr(lambda d: d.contrast)
    assert -0.5 <= b.min() < -0.45 and 0.45 < b.max() <= 0.5
    assert 0 <= s.min() < 0.05 and 1.95 < s.max() <= 2 and 0.5 <= c.min() < 0.55 and 1.45 < c.max() <= 1.5
    shifts = arr(lambda d: d.shift[0])
    assert set(shifts.astype(int)) == set(range(-4, 5))  # int(28 * 0.125 + 0.5) = 4
    sc = arr(lambda d: d.scale[1])
    assert 1 / 1.2 <= sc.min() < 0.85 and 1.18 < sc.max() <= 1.2
    assert not np.allclose(arr(lambda d: d.scale[0]), sc)  # independent per axis
    ang = np.degrees(arr(lambda d: d.angle))
    assert -15 <= ang.min() < -14.5 and 14.5 < ang.max() <= 15
    assert 0.45 < arr(lambda d: d.flip).mean() < 0.55
    assert 0 <= arr(lambda d: d.cutout[0]).min() and arr(lambda d: d.cutout[0]).max() <= 28
    counts = {p: sum(d.part == p for d in draws) for p in AUGMENT_PARTS}
    assert min(counts.values()) > 400, counts  # one part per draw, uniformly (3000 / 6 = 500 expected)
    # a draw consumes the same numbers whichever parts it picks from
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    A.draw(("color",), 28, 28, g1), A.draw(AUGMENT_PARTS, 28, 28, g2)
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))


@pytest.mark.parametrize("part", AUGMENT_PARTS)
def test_one_draw_transforms_every_image_alike(part):
    """Siamese: the draw applied to a concatenation equals the concatenation of its applications, so a group's
    real minibatch and its synthetic images (any sizes) undergo the same transform."""
    d = A.draw((part,), 9, 9, generator(0, 7))
    d = dataclasses.replace(d, flip=True, shift=(2, -1), cutout=(3, 5), scale=(0.9, 1.1), angle=0.2,
                            brightness=0.3, saturation=1.5, contrast=0.7)
    a, b = _image(n=5, c=3), _image(n=2, c=3, seed=1)
    torch.testing.assert_close(A.apply(torch.cat([a, b]), d), torch.cat([A.apply(a, d), A.apply(b, d)]),
                               rtol=0, atol=1e-6)
    assert not torch.allclose(A.apply(a, d), a)  # and it does something


@pytest.mark.parametrize("part", AUGMENT_PARTS)
def test_gradient_through_each_part_matches_finite_differences(part):
    """float64: d/dx sum(w * tanh(apply(x))) by autograd against central differences at 6 coordinates."""
    d = dataclasses.replace(A.Draw(part=part), flip=True, shift=(1, -2), cutout=(2, 6), scale=(0.87, 1.13),
                            angle=0.21, brightness=0.3, saturation=1.6, contrast=0.7)
    x = _image(n=2, c=3, h=8, w=8, dtype=torch.float64).requires_grad_(True)
    wt = _image(n=2, c=3, h=8, w=8, seed=9, dtype=torch.float64)
    f = lambda z: (wt * torch.tanh(A.apply(z, d))).sum()  # noqa: E731
    (g,) = torch.autograd.grad(f(x), x)
    gen = torch.Generator().manual_seed(2)
    idx = [tuple(int(torch.randint(0, s, (1,), generator=gen)) for s in x.shape) for _ in range(5)] + [(0, 0, 3, 3)]
    eps = 1e-6
    for i in idx:
        e = torch.zeros_like(x)
        e[i] = eps
        with torch.no_grad():
            fd = (f(x + e) - f(x - e)) / (2 * eps)
        assert abs(float(fd) - float(g[i])) <= 1e-4 * abs(float(fd)) + 1e-8, (part, i, float(fd), float(g[i]))
    assert g.abs().sum() > 0


# ----------------------------------------------------------------------------- in the matcher

def _model():
    torch.manual_seed(0)
    return build_model("convnet", 1, 3, (8, 8), width=4, depth=2)


def _problem(n=48, epochs=2):
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(n, 1, 8, 8, generator=g), torch.arange(n) % 3
    x[:, :, :3] += y[:, None, None, None].float()
    traj = train_trajectory(_model(), x, y, x[:10], y[:10], TrainConfig(epochs=epochs, batch_size=16, lr=0.05), 0,
                            torch.device("cpu"), show_progress=False)
    return x, y, MemoryTrajectory(traj.table, traj.params)


def test_matcher_applies_one_draw_to_the_real_and_the_synthetic_side():
    """Synsets that *are* their groups' rows (every row, so the real minibatch is the whole group): forward
    matching at one theta compares a group's gradient with itself, zero loss, with augmentation too, but only if
    both sides get the same draw; and the augmentation does change the real gradient."""
    x, y, reader = _problem()
    groups = torch.arange(len(x)) % 6  # 8 rows each, one class each
    dcfg = DistillConfig(**PAIRS_DISTILL, method="ddm-match", distance="mse", include_1d=True, batch_real=8,
                         augment="rotate_crop_cutout", group_chunk=4)
    m = Matcher(_model(), reader, x, y, groups, 6, dcfg, torch.device("cpu"))
    images = [x[m.members[k]].clone() for k in range(6)]
    labels = torch.stack([y[m.members[k]] for k in range(6)])

    def losses(aug_seed):
        gen = [generator(0, 34, k) for k in range(6)]
        aug = None if aug_seed is None else [generator(aug_seed, 35, k) for k in range(6)]
        return m.losses(images, labels, (1, 1), gen, 4, backward=False, aug_gen=aug)

    plain, plain_real, _ = losses(None)
    aug, aug_real, _ = losses(0)
    scale = float(plain_real.square().mean())
    assert plain.max() < 1e-6 * scale and aug.max() < 1e-6 * scale, (plain, aug, scale)
    assert ((aug_real - plain_real).abs() > 1e-3 * plain_real).all()  # every group's real batch was augmented


def test_matcher_gradient_to_the_images_through_the_augmentation_matches_finite_differences(monkeypatch):
    """float64 end to end: d (group loss) / d (synthetic pixel) from the double backward through the augmented
    images equals central differences of the loss (same draws each evaluation: fresh generators). The losses are
    read in float64 where the matcher computes them (it returns them as float32)."""
    import ddm_hpc.distill as distill

    seen = []
    real_fn = distill.matching_loss
    monkeypatch.setattr(distill, "matching_loss", lambda *a, **k: seen.append(real_fn(*a, **k)) or seen[-1])
    x, y, reader = _problem(n=24, epochs=1)
    reader = MemoryTrajectory(reader.table, reader.rows.double())
    model = _model().double()
    x = x.double()
    groups = torch.arange(len(x)) % 3
    dcfg = DistillConfig(**PAIRS_DISTILL, batch_real=4, augment="scale_rotate", group_chunk=3)
    m = Matcher(model, reader, x, y, groups, 3, dcfg, torch.device("cpu"), kernel="reference")
    images = [x[m.members[k, :2]].clone().requires_grad_(True) for k in range(3)]
    labels = torch.arange(3)[:, None].expand(3, 2)

    def loss(imgs, backward=False):
        gen, aug = [generator(0, 34, k) for k in range(3)], [generator(0, 35, k) for k in range(3)]
        seen.clear()
        m.losses(imgs, labels, (1, 0), gen, 3, backward=backward, aug_gen=aug)
        assert len(seen) == 1 and seen[0].dtype == torch.float64  # one block
        return seen[0].detach()

    loss(images, backward=True)
    eps = 1e-6
    for k, i in [(0, (0, 0, 3, 4)), (1, (1, 0, 5, 2)), (2, (0, 0, 4, 4))]:
        grad = float(images[k].grad[i])
        plus = [im.detach().clone() for im in images]
        minus = [im.detach().clone() for im in images]
        plus[k][i] += eps
        minus[k][i] -= eps
        with torch.no_grad():
            fd = float((loss(plus)[k] - loss(minus)[k]) / (2 * eps))
        assert abs(fd - grad) <= 1e-4 * abs(fd) + 1e-9, (k, i, fd, grad)
        assert abs(grad) > 1e-8


def _distill(x, y, reader, ids, dcfg):
    return distill_groups(_model(), reader, x, y, torch.arange(len(x)) % 4, torch.tensor([0, 1, 2, 0]), dcfg, 0,
                          torch.device("cpu"), show_progress=False, group_ids=torch.tensor(ids))


@pytest.mark.parametrize("chunk,alone", [(1, [2]), (2, [2, 3])])
def test_a_groups_augmented_synset_does_not_depend_on_the_other_groups(chunk, alone):
    x, y, reader = _problem()
    dcfg = DistillConfig(**{**PAIRS_DISTILL, "distill_steps": 6, "lr_img": 0.5}, batch_real=6, augment="dsa",
                         group_chunk=chunk)
    together = _distill(x, y, reader, [0, 1, 2, 3], dcfg)
    shard = _distill(x, y, reader, alone, dcfg)
    assert torch.equal(together.images[2], shard.images[0])
    np.testing.assert_array_equal(together.group_history[2], shard.group_history[0])
    off = _distill(x, y, reader, [0, 1, 2, 3], dataclasses.replace(dcfg, augment=""))
    assert not torch.allclose(off.images, together.images)  # the augmentation took part in the matching
    np.testing.assert_array_equal(off.init_loss, together.init_loss)  # the evaluation is unaugmented


def test_augmentation_off_is_the_old_distill_stage(monkeypatch):
    """At its default the option stays out of the stage key, and the distill stage never draws nor applies."""
    assert "augment" not in _key_dict(DistillConfig())
    pairs = Config.from_dict({"distill": PAIRS_DISTILL})
    assert pairs.stage_key("distill") == Config.from_dict({"distill": {**PAIRS_DISTILL, "augment": ""}}).stage_key(
        "distill")
    assert Config.from_dict({"distill": {**PAIRS_DISTILL, "augment": "dsa"}}).stage_key("distill") != pairs.stage_key(
        "distill")

    def boom(*a, **k):
        raise AssertionError("augmentation used with --augment off")

    monkeypatch.setattr(A, "draw", boom)
    monkeypatch.setattr(A, "apply", boom)
    x, y, reader = _problem(n=24, epochs=1)
    syn = _distill(x, y, reader, [0, 1, 2, 3], DistillConfig(**{**PAIRS_DISTILL, "distill_steps": 2}, batch_real=4))
    assert np.isfinite(syn.loss_history).all()


# ----------------------------------------------------------------------------- options

def test_augment_option_refusals_are_one_line():
    with pytest.raises(ConfigError, match=r"pass --target pairs --no-layer-rates --tensor-weights none "
                                          r"\(or --preset paper\), or --augment ''") as e:
        DistillConfig(augment="dsa", target="displacement")
    assert "\n" not in str(e.value)
    for bad in ("colour", "color_color", "color__flip_x", "_"):
        with pytest.raises(ConfigError, match="color, crop, cutout, flip, scale, rotate") as e:
            DistillConfig(augment=bad)
        assert "\n" not in str(e.value)
    assert DistillConfig(**PAIRS_DISTILL, augment="dsa").augment_parts == tuple(DSA_STRATEGY.split("_")) == (
        "color", "crop", "cutout", "scale", "rotate")
    assert DistillConfig(**PAIRS_DISTILL, augment="color_crop_cutout_flip_scale_rotate").augment_parts == AUGMENT_PARTS
    assert DistillConfig().augment_parts == ()


def test_unknown_strategy_on_the_command_line_stops_before_anything_runs(tmp_path):
    from ddm_hpc.cli import main
    assert main(["distill", "--device", "cpu", "--augment", "colour", "--out", str(tmp_path / "r")]) == 2
    assert not (tmp_path / "r").exists()


def test_paper_preset_and_the_paper_row_augment():
    from ddm_hpc.config import PRESETS, merge
    from ddm_hpc.variants import paper_method
    paper = Config.from_dict(merge(Config().to_dict(), PRESETS["paper"]()))
    assert paper.distill.augment == "dsa"
    run = Config.from_dict({"runtime": {"out": "/tmp/somewhere"}})  # a run without augmentation
    assert run.distill.augment == "" and paper_method().config(run).distill.augment == "dsa"
