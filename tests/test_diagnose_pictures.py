"""``diagnose pictures``: exact grid pixels, top-k ids and members, the class x class matrix and the exact
effects against direct computations from the run's HDF5 files, on a tiny real-MNIST run."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from ddm_hpc.cli import main
from ddm_hpc.config import Config, merge, smoke_preset
from ddm_hpc.data import denormalize
from ddm_hpc.context import RunContext, load_data
from ddm_hpc.diagnose import Section, read_section, write_markdown, write_section
from ddm_hpc.diagnose.pictures import (DPI, cluster_members, figure_size, image_grid, pictures_section, top_clusters,
                                       write_png)
from ddm_hpc.errors import StageError


TOP_K, N_MEMBERS, N_PICTURES = 4, 6, 2  # smoke run: 3 queries, K = 30 clusters of >= 10 images
PAD = 2


# ----------------------------------------------------------------------------------------------- helpers


def _cfg(out: Path, mnist_root: Path) -> Config:
    opts = merge(smoke_preset(), {"data": {"data_root": str(mnist_root)}, "runtime": {"out": str(out)},
                                  "diagnose": {"top_k": TOP_K, "n_members": N_MEMBERS, "n_pictures": N_PICTURES}})
    return Config.from_dict(opts)


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _u8(x: np.ndarray) -> np.ndarray:
    return np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)


def _direct_class_matrix(scores: np.ndarray, labels: np.ndarray, cclass: np.ndarray, n_cls: int) -> np.ndarray:
    """Fig. 3 by explicit loops: M[a, b] = mean over queries with label a of sum_{k: class b} scores[q, k]."""
    out = np.full((n_cls, n_cls), np.nan)
    for a in range(n_cls):
        qs = [q for q in range(len(labels)) if labels[q] == a]
        if not qs:
            continue
        for b in range(n_cls):
            out[a, b] = np.mean([sum(scores[q, k] for k in range(len(cclass)) if cclass[k] == b) for q in qs])
    return out


def _attribution(run: Path) -> dict[str, np.ndarray]:
    with h5py.File(run / "attribution.h5", "r") as f:
        return {"scores": f["scores"][()], "top": f["top_clusters"][()], "pos": f["query_position"][()],
                "label": f["query_label"][()], "assign": f["clusters/assignment"][()],
                "cclass": f["clusters/class"][()]}


# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, mnist_root) -> Path:
    out = tmp_path_factory.mktemp("pictures_run")
    assert main(["run", "--preset", "smoke", "--data-root", str(mnist_root), "--out", str(out), "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def bundle(run_dir, mnist_root):
    return load_data(_cfg(run_dir, mnist_root))


@pytest.fixture(scope="module")
def plain(run_dir, bundle, mnist_root) -> Section:
    return pictures_section(RunContext(_cfg(run_dir, mnist_root), bundle, torch.device("cpu")))


@pytest.fixture(scope="module")
def evaluated(run_dir, bundle, mnist_root, tmp_path_factory) -> tuple[Path, Section]:
    """A copy of the run, evaluated with every cluster retrained without (--n-removed 0: K = 30, ~10 s)."""
    out = tmp_path_factory.mktemp("pictures_eval") / "run"
    shutil.copytree(run_dir, out, ignore=shutil.ignore_patterns("diagnose"))
    assert main(["evaluate", "--preset", "smoke", "--methods", "random,ddm", "--n-masks", "2", "--noise-seeds", "0",
                 "--n-removed", "0", "--data-root", str(mnist_root), "--out", str(out), "--no-progress"]) == 0
    return out, pictures_section(RunContext(_cfg(out, mnist_root), bundle, torch.device("cpu")))


# ----------------------------------------------------------------------------------------------- units


def test_image_grid_places_every_pixel():
    rng = np.random.default_rng(0)
    imgs = rng.random((5, 1, 3, 4))
    grid = image_grid(imgs, ncol=3, pad=2, pad_value=0.25, rgb=True)
    assert grid.dtype == np.uint8 and grid.shape == (2 * (3 + 2) + 2, 3 * (4 + 2) + 2, 3)
    covered = np.zeros(grid.shape[:2], bool)
    for i in range(5):
        r, c = divmod(i, 3)
        top, left = 2 + r * 5, 2 + c * 6
        cell = grid[top:top + 3, left:left + 4]
        for ch in range(3):  # grey replicated to RGB
            np.testing.assert_array_equal(cell[..., ch], _u8(imgs[i, 0]))
        covered[top:top + 3, left:left + 4] = True
    assert (grid[~covered] == 64).all()  # round(0.25 * 255): borders, gaps and the empty 6th cell


def test_image_grid_rgb_no_pad_and_blank_cells():
    rng = np.random.default_rng(1)
    imgs = rng.random((3, 3, 2, 2)) * 1.4 - 0.2  # out of range: clipped
    imgs[1] = np.nan  # blank cell
    grid = image_grid(torch.from_numpy(imgs), ncol=2, pad=0, pad_value=0.0)
    assert grid.shape == (4, 4, 3)
    np.testing.assert_array_equal(grid[:2, :2], _u8(imgs[0].transpose(1, 2, 0)))
    np.testing.assert_array_equal(grid[2:, :2], _u8(imgs[2].transpose(1, 2, 0)))
    assert (grid[:2, 2:] == 0).all() and (grid[2:, 2:] == 0).all()
    with pytest.raises(ValueError):
        image_grid(np.zeros((0, 1, 2, 2)), ncol=2)
    with pytest.raises(ValueError):
        image_grid(np.zeros((2, 2, 2, 2)), ncol=2)


def test_write_png_round_trip(tmp_path):
    arr = np.random.default_rng(2).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    path = write_png(arr, tmp_path / "x.png")
    np.testing.assert_array_equal(_png(path), arr)
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]  # no temp file left
    with pytest.raises(ValueError):
        write_png(arr.astype(np.float32), tmp_path / "y.png")


def test_top_clusters_and_members():
    s = np.array([[0.1, np.nan, 0.5, 0.3], [2.0, 1.0, 3.0, 0.0]])
    np.testing.assert_array_equal(top_clusters(s, 3), [[2, 3, 0], [2, 0, 1]])
    assert top_clusters(s, 10).shape == (2, 4)
    assign = np.array([1, 0, 1, 2, 1])
    np.testing.assert_array_equal(cluster_members(assign, 1, 2), [0, 2])
    np.testing.assert_array_equal(cluster_members(assign, 2, 3), [3, -1, -1])


# ----------------------------------------------------------------------------------------------- end to end


def test_topk_ids_scores_and_members(plain, run_dir):
    a = _attribution(run_dir)
    arr = plain.arrays
    want = np.argsort(-a["scores"][:N_PICTURES], axis=1)[:, :TOP_K]
    np.testing.assert_array_equal(arr["top_clusters"], want)
    np.testing.assert_array_equal(arr["top_clusters"], a["top"][:N_PICTURES, :TOP_K])  # attribute's own ranking
    np.testing.assert_allclose(arr["top_scores"], np.take_along_axis(a["scores"][:N_PICTURES], want, 1), rtol=1e-6)
    assert (np.diff(arr["top_scores"], axis=1) <= 0).all()
    np.testing.assert_array_equal(arr["top_class"], a["cclass"][want])
    np.testing.assert_array_equal(arr["query_position"], a["pos"][:N_PICTURES])
    assert arr["members"].shape == (N_PICTURES, TOP_K, N_MEMBERS)
    for i in range(N_PICTURES):
        for j in range(TOP_K):
            m = arr["members"][i, j]
            rows = np.flatnonzero(a["assign"] == want[i, j])[:N_MEMBERS]  # the cluster's first members
            np.testing.assert_array_equal(m[:len(rows)], rows)
            assert (m[len(rows):] == -1).all()  # a smaller cluster's row is padded
    assert np.isnan(arr["exact_effect"]).all()


def test_class_matrix_matches_direct_computation(plain, run_dir, bundle):
    a = _attribution(run_dir)
    want = _direct_class_matrix(a["scores"].astype(np.float64), a["label"], a["cclass"], bundle.num_classes)
    np.testing.assert_allclose(plain.arrays["class_matrix"], want, rtol=1e-6, equal_nan=True)
    assert np.isfinite(want).sum() == bundle.num_classes * len(np.unique(a["label"]))


def test_grid_png_shows_query_and_members(plain, run_dir, bundle):
    arr = plain.arrays
    h, w = bundle.image_size
    for i in range(N_PICTURES):
        img = _png(run_dir / "diagnose" / f"pictures_q{i}_grid.png")
        assert img.shape == ((1 + TOP_K) * (h + PAD) + PAD, N_MEMBERS * (w + PAD) + PAD, 3)
        assert img.std() > 0
        q = denormalize(bundle.x_test[int(arr["query_position"][i])], bundle.mean, bundle.std).clamp(0, 1).numpy()
        np.testing.assert_array_equal(img[PAD:PAD + h, PAD:PAD + w, 0], _u8(q[0]))
        assert (img[PAD:PAD + h, PAD + w:] == 255).all()  # rest of the query row blank
        for j in range(TOP_K):
            for c in range(N_MEMBERS):
                top, left = PAD + (1 + j) * (h + PAD), PAD + c * (w + PAD)
                member = int(arr["members"][i, j, c])
                if member < 0:  # past a small cluster's last member: blank
                    assert (img[top:top + h, left:left + w] == 255).all()
                    continue
                x = denormalize(bundle.x_train[member], bundle.mean, bundle.std).clamp(0, 1)
                np.testing.assert_array_equal(img[top:top + h, left:left + w, 1], _u8(x.numpy()[0]))


def test_section_pngs_and_text_without_evaluation(plain, run_dir):
    names = [p.name for p in plain.images]
    assert names == [f"pictures_q{i}.png" for i in range(N_PICTURES)] + ["pictures_heatmap.png"]
    for p in plain.images:
        assert p.parent == run_dir / "diagnose" and p.is_file()
        img = _png(p)
        assert img.std() > 0
    grid = _png(run_dir / "diagnose" / "pictures_q0_grid.png")
    fw, fh = figure_size(grid.shape, 1 + TOP_K)
    assert _png(plain.images[0]).shape[:2] == (round(fh * DPI), round(fw * DPI))
    text = "\n".join(plain.lines)
    assert "run `ddm-hpc evaluate`" in text
    assert plain.name == "pictures" and plain.title.startswith("Pictures:")
    top = plain.arrays["top_clusters"]
    rows = [ln for ln in plain.lines if ln.startswith("| ") and ln[2].isdigit()]
    assert len(rows) == N_PICTURES * TOP_K
    assert rows[0].split(" | ")[4] == str(top[0, 0])  # cluster column of the first row
    assert plain.attrs["has_evaluation"] == 0 and plain.attrs["n_pictures"] == N_PICTURES
    assert not list((run_dir / "diagnose").glob(".*tmp*"))


def test_section_round_trips_through_hdf5_and_markdown(plain, run_dir, mnist_root, bundle):
    dc = RunContext(_cfg(run_dir, mnist_root), bundle, torch.device("cpu"))
    back = read_section(write_section(dc, plain, 1.0))
    for key, val in plain.arrays.items():
        np.testing.assert_array_equal(back.arrays[key], val)
    assert back.lines == plain.lines and [p.name for p in back.images] == [p.name for p in plain.images]
    md = write_markdown(run_dir, ["pictures"]).read_text()
    assert "](diagnose/pictures_q0.png)" in md and "](diagnose/pictures_heatmap.png)" in md


def test_exact_effects_from_evaluation(evaluated, bundle):
    out, sec = evaluated
    with h5py.File(out / "evaluation.h5", "r") as f:
        base, outputs, removed = f["gt/base"][()], f["gt/outputs"][()], f["gt/removed"][()]
        labels, eval_qidx, ddm = f["query_label"][()], f["query_index"][()], f["methods/ddm/scores"][()]
    with h5py.File(out / "attribution.h5", "r") as f:
        cclass = f["clusters/class"][()]
    arr = sec.arrays
    assert len(removed) == len(cclass)  # --n-removed 0: every cluster retrained
    for i in range(N_PICTURES):
        col = int(np.flatnonzero(eval_qidx == arr["query_index"][i])[0])
        y = labels[col]
        for j in range(TOP_K):
            r = int(np.flatnonzero(removed == arr["top_clusters"][i, j])[0])
            want = -np.log(outputs[r, col, y]) + np.log(base[col, y])
            np.testing.assert_allclose(arr["exact_effect"][i, j], want, rtol=1e-5, atol=1e-6)
    exact = -np.log(np.clip(outputs[:, np.arange(len(labels)), labels], 1e-12, None)) \
        + np.log(np.clip(base[np.arange(len(labels)), labels], 1e-12, None))
    np.testing.assert_allclose(arr["class_matrix_exact"], _direct_class_matrix(exact.T, labels, cclass[removed],
                                                                               bundle.num_classes),
                               rtol=1e-5, atol=1e-7, equal_nan=True)
    np.testing.assert_allclose(arr["class_matrix_eval_ddm"], _direct_class_matrix(
        ddm[:, removed].astype(np.float64), labels, cclass[removed], bundle.num_classes), rtol=1e-5, atol=1e-12,
        equal_nan=True)
    names = [p.name for p in sec.images]
    assert names[-2:] == ["pictures_heatmap_exact.png", "pictures_scatter_ddm.png"]
    for p in sec.images:
        assert _png(p).std() > 0
    text = "\n".join(sec.lines)
    assert "run `ddm-hpc evaluate`" not in text and "pictures_scatter_ddm.png" in text
    assert f"| {arr['exact_effect'][0, 0]:+.3g} |" in text
    assert sec.attrs["has_evaluation"] == 1 and sec.attrs["n_exact_known"] == N_PICTURES * TOP_K


def test_single_score_row_with_nan(run_dir, bundle, mnist_root, tmp_path):
    """A batch query's one row (and hierarchical NaNs) is shared by every query; NaN ranks last and sums as 0."""
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(run_dir / "attribution.h5", out / "attribution.h5")
    with h5py.File(out / "attribution.h5", "a") as f:
        row = f["scores"][()][:1].copy()
        row[0, ::3] = np.nan
        del f["scores"]
        f.create_dataset("scores", data=row)
        labels, cclass = f["query_label"][()], f["clusters/class"][()]
    sec = pictures_section(RunContext(_cfg(out, mnist_root), bundle, torch.device("cpu")))
    assert sec.attrs["shared_row"] == 1
    want = np.argsort(-np.nan_to_num(row[0], nan=-np.inf))[:TOP_K]
    for i in range(N_PICTURES):
        np.testing.assert_array_equal(sec.arrays["top_clusters"][i], want)
    assert np.isfinite(sec.arrays["top_scores"]).all()
    full = np.repeat(np.nan_to_num(row, nan=0.0), len(labels), 0).astype(np.float64)
    np.testing.assert_allclose(sec.arrays["class_matrix"], _direct_class_matrix(full, labels, cclass,
                                                                                bundle.num_classes),
                               rtol=1e-6, equal_nan=True)


def test_errors_name_problem_and_fix(tmp_path, bundle, mnist_root, run_dir):
    with pytest.raises(StageError, match="ddm-hpc run"):
        pictures_section(RunContext(_cfg(tmp_path, mnist_root), bundle, torch.device("cpu")))
    small = dataclasses.replace(bundle, x_train=bundle.x_train[:10], y_train=bundle.y_train[:10])
    with pytest.raises(StageError, match="other data"):
        pictures_section(RunContext(_cfg(run_dir, mnist_root), small, torch.device("cpu")))
