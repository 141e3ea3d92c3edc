"""Tests for ddm_hpc.data: real MNIST, stratified subsets, array files, image folders, errors."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from ddm_hpc.data import DatasetBundle, available_datasets, denormalize, load_dataset, normalize
from ddm_hpc.errors import ConfigError, DataError

ATOL = 1e-5  # float32 round-off of (x / 255 - mean) / std


def _expected(images: np.ndarray, bundle: DatasetBundle) -> torch.Tensor:
    """Normalised float32 [N, C, H, W] from uint8 [N, H, W] or [N, H, W, C] images."""
    x = torch.from_numpy(images).float() / 255
    x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
    return normalize(x, bundle.mean, bundle.std)


def _assert_one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message and message.strip() == message
    return message


# ----------------------------------------------------------------------------- real MNIST
def test_mnist_full(mnist_root: Path) -> None:
    b = load_dataset("mnist", data_root=mnist_root)
    assert b.name == "mnist" and b.num_classes == 10
    assert b.x_train.shape == (17_435, 1, 28, 28) and b.x_test.shape == (10_000, 1, 28, 28)
    assert b.x_train.dtype == b.x_test.dtype == torch.float32
    assert b.y_train.dtype == b.train_index.dtype == torch.int64
    assert b.image_shape == (1, 28, 28) and b.in_channels == 1 and b.image_size == (28, 28)
    assert abs(b.x_train.mean().item()) < 0.05 and abs(b.x_train.std().item() - 1) < 0.05
    assert set(b.y_train.unique().tolist()) == set(range(10)) and b.y_test.min() >= 0 and b.y_test.max() <= 9
    assert torch.equal(b.train_index, torch.arange(17_435)) and torch.equal(b.test_index, torch.arange(10_000))
    back = denormalize(b.x_test[:5], b.mean, b.std)
    assert back.min() >= -ATOL and back.max() <= 1 + ATOL


def test_mnist_stratified_subset(mnist_root: Path) -> None:
    b = load_dataset("MNIST", data_root=mnist_root, n_train=1000, n_test=50, seed=0)
    assert torch.equal(torch.bincount(b.y_train), torch.full((10,), 100))
    assert torch.equal(torch.bincount(b.y_test), torch.full((10,), 5))
    assert bool((b.train_index[1:] > b.train_index[:-1]).all())
    again = load_dataset("mnist", data_root=mnist_root, n_train=1000, n_test=50, seed=0)
    other = load_dataset("mnist", data_root=mnist_root, n_train=1000, n_test=50, seed=1)
    assert torch.equal(again.train_index, b.train_index) and torch.equal(again.x_train, b.x_train)
    assert not torch.equal(other.train_index, b.train_index)

    source = torchvision.datasets.MNIST(root=str(mnist_root), train=True, download=False)
    assert torch.equal(b.y_train, source.targets[b.train_index])
    torch.testing.assert_close(b.x_train, _expected(source.data[b.train_index].numpy(), b), atol=ATOL, rtol=0)
    test_source = torchvision.datasets.MNIST(root=str(mnist_root), train=False, download=False)
    torch.testing.assert_close(b.x_test, _expected(test_source.data[b.test_index].numpy(), b), atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- array files
def _write(path: Path, **arrays: np.ndarray) -> Path:
    if path.suffix == ".npz":
        np.savez(path, **arrays)
    else:
        with h5py.File(path, "w") as f:
            for key, value in arrays.items():
                f[key] = value
    return path


@pytest.mark.parametrize("suffix", [".npz", ".h5"])
def test_array_file_uint8_with_test_split(tmp_path: Path, suffix: str) -> None:
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (30, 6, 5), dtype=np.uint8), np.arange(30) % 3
    x_test, y_test = rng.integers(0, 256, (9, 6, 5), dtype=np.uint8), np.arange(9) % 3
    path = _write(tmp_path / f"toy{suffix}", x=x, y=y, x_test=x_test, y_test=y_test)
    b = load_dataset(str(path))
    assert b.name == str(path) and b.num_classes == 3 and b.image_shape == (1, 6, 5)
    unit = x.astype(np.float64) / 255
    np.testing.assert_allclose(b.mean, [unit.mean()], rtol=1e-6)
    np.testing.assert_allclose(b.std, [unit.std()], rtol=1e-6)
    torch.testing.assert_close(b.x_train, _expected(x, b), atol=ATOL, rtol=0)
    torch.testing.assert_close(b.x_test, _expected(x_test, b), atol=ATOL, rtol=0)
    assert torch.equal(b.y_train, torch.from_numpy(y)) and torch.equal(b.y_test, torch.from_numpy(y_test))
    assert torch.equal(b.test_index, torch.arange(9))


@pytest.mark.parametrize("suffix", [".npz", ".hdf5"])
def test_array_file_float_channels_last_split(tmp_path: Path, suffix: str) -> None:
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(4), [10, 20, 5, 15])
    x = (rng.integers(0, 256, (len(y), 4, 4, 3)) / 255).astype(np.float32)
    path = _write(tmp_path / f"toy{suffix}", x=x, y=y)
    b = load_dataset(str(path), seed=3, test_fraction=0.2)
    assert b.image_shape == (3, 4, 4) and len(b.mean) == len(b.std) == 3
    assert torch.equal(torch.bincount(b.y_test), torch.tensor([2, 4, 1, 3]))
    both = torch.cat([b.train_index, b.test_index])
    assert torch.equal(both.sort().values, torch.arange(len(y)))  # disjoint and covers everything
    assert torch.equal(b.y_train, torch.from_numpy(y)[b.train_index])
    expected = normalize(torch.from_numpy(x).permute(0, 3, 1, 2), b.mean, b.std)
    torch.testing.assert_close(b.x_train, expected[b.train_index], atol=ATOL, rtol=0)
    torch.testing.assert_close(b.x_test, expected[b.test_index], atol=ATOL, rtol=0)
    assert not torch.equal(load_dataset(str(path), seed=4).test_index, b.test_index)


def test_subset_is_as_balanced_as_possible(tmp_path: Path) -> None:
    y = np.repeat(np.arange(3), [2, 10, 10])
    x = np.zeros((len(y), 2, 2), dtype=np.uint8)
    path = _write(tmp_path / "toy.npz", x=x, y=y, x_test=x[:3], y_test=y[:3])
    b = load_dataset(str(path), n_train=12, seed=5)
    assert torch.equal(torch.bincount(b.y_train), torch.tensor([2, 5, 5]))
    assert torch.equal(b.y_train, torch.from_numpy(y)[b.train_index])


# ----------------------------------------------------------------------------- image folders
def _png(path: Path, pixels: np.ndarray) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG")  # lossless even when named .JPEG
    return pixels


def test_tiny_imagenet_layout(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    wnids = ["n02", "n01", "n03"]  # sorted by name: n01 -> 0, n02 -> 1, n03 -> 2
    train, val, notes = {}, [], []
    for wnid in wnids:
        for k in range(3):
            image = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            train[(wnid, k)] = _png(tmp_path / "train" / wnid / "images" / f"{wnid}_{k}.JPEG", image)
        (tmp_path / "train" / wnid / f"{wnid}_boxes.txt").write_text("ignored\n")
    for k, wnid in enumerate(["n03", "n01", "n02", "n03"]):
        image = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        val.append((wnid, _png(tmp_path / "val" / "images" / f"val_{k}.JPEG", image)))
        notes.append(f"val_{k}.JPEG\t{wnid}\t0\t0\t8\t8")
    (tmp_path / "val" / "val_annotations.txt").write_text("\n".join(notes) + "\n")

    b = load_dataset(str(tmp_path))
    assert b.num_classes == 3 and b.image_shape == (3, 8, 8)
    order = sorted(train)  # class folders sorted, then file names
    assert b.y_train.tolist() == [sorted(wnids).index(w) for w, _ in order]
    torch.testing.assert_close(b.x_train, _expected(np.stack([train[k] for k in order]), b), atol=ATOL, rtol=0)
    assert b.y_test.tolist() == [0 if w == "n01" else 1 if w == "n02" else 2 for w, _ in val]
    torch.testing.assert_close(b.x_test, _expected(np.stack([img for _, img in val]), b), atol=ATOL, rtol=0)


def test_flat_class_folders_grayscale_split(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    files = []
    for cls in ["cat", "ant", "bee"]:
        for k in range(5):
            files.append((cls, k, _png(tmp_path / cls / f"{k}.png", rng.integers(0, 256, (8, 8), dtype=np.uint8))))
    files.sort(key=lambda f: (f[0], f[1]))  # the loader's order: classes sorted, then file names
    labels = torch.tensor([["ant", "bee", "cat"].index(c) for c, _, _ in files])
    images = np.stack([img for _, _, img in files])

    b = load_dataset(str(tmp_path), test_fraction=0.4, seed=0)
    assert b.image_shape == (1, 8, 8) and b.num_classes == 3
    assert torch.equal(torch.bincount(b.y_test), torch.tensor([2, 2, 2]))
    assert torch.equal(torch.cat([b.train_index, b.test_index]).sort().values, torch.arange(15))
    assert torch.equal(b.y_train, labels[b.train_index]) and torch.equal(b.y_test, labels[b.test_index])
    torch.testing.assert_close(b.x_train, _expected(images[b.train_index.numpy()], b), atol=ATOL, rtol=0)
    torch.testing.assert_close(b.x_test, _expected(images[b.test_index.numpy()], b), atol=ATOL, rtol=0)


def test_train_test_folders_mixed_modes_become_rgb(tmp_path: Path) -> None:
    gray = _png(tmp_path / "train" / "a" / "0.png", np.full((4, 4), 7, dtype=np.uint8))
    rgb = _png(tmp_path / "train" / "b" / "0.jpg", np.full((4, 4, 3), 200, dtype=np.uint8))
    test = _png(tmp_path / "test" / "b" / "0.png", np.full((4, 4, 3), 50, dtype=np.uint8))
    b = load_dataset(str(tmp_path))
    assert b.image_shape == (3, 4, 4) and b.y_train.tolist() == [0, 1] and b.y_test.tolist() == [1]
    expected = np.stack([np.repeat(gray[..., None], 3, axis=-1), rgb])
    torch.testing.assert_close(b.x_train, _expected(expected, b), atol=ATOL, rtol=0)
    torch.testing.assert_close(b.x_test, _expected(test[None], b), atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- errors
def test_missing_mnist_names_path_and_files(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        load_dataset("mnist", data_root=tmp_path)
    message = _assert_one_line(err)
    assert str(tmp_path / "MNIST" / "raw") in message and "train-images-idx3-ubyte" in message
    assert isinstance(err.value, FileNotFoundError)


def test_unknown_name_lists_datasets(tmp_path: Path) -> None:
    assert "mnist" in available_datasets() and "cifar10" in available_datasets()
    with pytest.raises(DataError) as err:
        load_dataset("imagenet-1k", data_root=tmp_path)
    message = _assert_one_line(err)
    assert "'imagenet-1k'" in message and "mnist" in message and ".npz" in message


@pytest.mark.parametrize("suffix", [".npz", ".h5"])
def test_array_file_missing_key(tmp_path: Path, suffix: str) -> None:
    path = _write(tmp_path / f"bad{suffix}", x=np.zeros((4, 2, 2), dtype=np.uint8))
    with pytest.raises(DataError) as err:
        load_dataset(str(path))
    message = _assert_one_line(err)
    assert str(path) in message and "'y'" in message


@pytest.mark.parametrize(
    "arrays, words",
    [
        ({"x": np.zeros((4, 2, 2), np.uint8), "y": np.arange(3)}, ["'y'", "3 labels", "4 rows"]),
        ({"x": np.zeros((4, 2), np.uint8), "y": np.arange(4)}, ["'x'", "[N,H,W]"]),
        ({"x": np.zeros((4, 3, 8, 8), np.uint8), "y": np.arange(4)}, ["'x'", "channels-last"]),
        ({"x": np.zeros((4, 2, 2), np.uint8), "y": np.array([0, 1, 3, 3])}, ["'y'", "0..L-1", "[2]"]),
        ({"x": np.zeros((4, 2, 2), np.uint8), "y": np.arange(4), "x_test": np.zeros((1, 2, 2), np.uint8)},
         ["'y_test'"]),
    ],
)
def test_array_file_validation(tmp_path: Path, arrays: dict[str, np.ndarray], words: list[str]) -> None:
    path = _write(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError) as err:
        load_dataset(str(path))
    message = _assert_one_line(err)
    assert str(path) in message and all(w in message for w in words), message


def test_unreadable_file_and_mixed_sizes(tmp_path: Path) -> None:
    (tmp_path / "junk.h5").write_text("not hdf5")
    with pytest.raises(DataError) as err:
        load_dataset(str(tmp_path / "junk.h5"))
    assert "junk.h5" in _assert_one_line(err)
    _png(tmp_path / "imgs" / "a" / "0.png", np.zeros((4, 4), np.uint8))
    _png(tmp_path / "imgs" / "b" / "0.png", np.zeros((4, 5), np.uint8))
    _png(tmp_path / "imgs" / "b" / "1.png", np.zeros((4, 5), np.uint8))
    with pytest.raises(DataError) as err:
        load_dataset(str(tmp_path / "imgs"), test_fraction=0.5)
    assert "5x4" in _assert_one_line(err) and "4x4" in str(err.value)


def test_bad_sizes_raise_config_error(mnist_root: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_dataset("mnist", data_root=mnist_root, n_train=17_436)
    assert "17435" in _assert_one_line(err) and "n_train" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_dataset("mnist", data_root=mnist_root, n_test=0)
    assert "n_test" in _assert_one_line(err)
    with pytest.raises(ConfigError):
        load_dataset("mnist", data_root=mnist_root, test_fraction=1.0)


def test_mapped_dataset_equals_loaded_and_maps_later_loads(tmp_path, mnist_root, monkeypatch):
    import ddm_hpc.data as data
    from ddm_hpc.data import load_dataset, mapped_dataset

    ref = load_dataset("mnist", mnist_root, n_train=300, n_test=100, seed=3)
    first = mapped_dataset("mnist", mnist_root, tmp_path, n_train=300, n_test=100, seed=3)
    monkeypatch.setattr(data.cache, "open_splits", lambda *a, **k: pytest.fail("a cached dataset was read again"))
    second = mapped_dataset("mnist", mnist_root, tmp_path, n_train=300, n_test=100, seed=3)
    rows = torch.randperm(300, generator=torch.Generator().manual_seed(0))[:77]
    mask = torch.rand(300, generator=torch.Generator().manual_seed(1)) < 0.3
    for b in (first, second):
        assert isinstance(b.x_train, data.MappedImages) and b.x_train.shape == ref.x_train.shape
        for name in ("x_train", "x_test"):  # read whole, by rows, by mask, by slice, by int: the same bits
            x, r = getattr(b, name), getattr(ref, name)
            assert torch.equal(data.dense(x), r), name
            assert x[rows[:5] % len(r)].stride() == r[rows[:5] % len(r)].stride(), name  # convolutions pick kernels by strides
            assert torch.equal(x[rows[rows < len(r)]], r[rows[rows < len(r)]]), name
            assert torch.equal(x[mask[:len(r)]], r[mask[:len(r)]]) and torch.equal(x[5:60:7], r[5:60:7]), name
            assert torch.equal(x[-1], r[-1]) and torch.equal(x[np.int64(3)], r[3]), name
            assert torch.equal(x[rows[:12].view(3, 4) % len(r)], r[rows[:12].view(3, 4) % len(r)]), name
        for name in ("y_train", "y_test", "train_index", "test_index"):
            assert torch.equal(getattr(b, name), getattr(ref, name)), name
        assert (b.name, b.num_classes, b.mean, b.std) == (ref.name, ref.num_classes, ref.mean, ref.std)
    # a map of the raw uint8 images (a quarter of the normalised size), not a private copy
    assert isinstance(second.x_train.raw, np.memmap) and second.x_train.raw.dtype == np.uint8
    assert Path(second.x_train.raw.filename).name == "x_train.npy"
    assert Path(second.x_train.raw.filename).stat().st_size <= ref.x_train.numel() + 4096
    assert len(list(tmp_path.iterdir())) == 1  # one folder per argument set
    assert not list(tmp_path.glob("*/*.tmp*"))  # no temp files left
    with pytest.raises(pytest.fail.Exception):
        mapped_dataset("mnist", mnist_root, tmp_path, n_train=200, n_test=100, seed=3)  # other args: new key


def test_pipeline_with_mapped_data_is_identical(tmp_path, mnist_root, monkeypatch):
    import h5py

    from ddm_hpc.cli import main
    from ddm_hpc.data import MappedImages

    # on the CPU no stage reads the mapped set whole: training, features, distillation take rows
    monkeypatch.setattr(MappedImages, "to", lambda *a, **k: pytest.fail("the mapped images were read whole"))
    args = ["--preset", "smoke", "--distill-steps", "2", "--data-root", str(mnist_root), "--no-progress"]
    assert main(["run", *args, "--out", str(tmp_path / "mem")]) == 0
    assert main(["run", *args, "--data-cache", "mmap", "--loader-workers", "2", "--out", str(tmp_path / "map")]) == 0
    assert (tmp_path / "map" / ".data").is_dir()
    for name, key in (("train.h5", "trajectory/params"), ("synsets.h5", "cluster/images"), ("attribution.h5", "scores")):
        with h5py.File(tmp_path / "mem" / name) as a, h5py.File(tmp_path / "map" / name) as b:
            assert np.array_equal(a[key][()], b[key][()], equal_nan=True), name
