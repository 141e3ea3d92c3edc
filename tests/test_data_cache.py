"""Issue 7: the streamed data cache (``--data-cache mmap``) against the in-memory loader it replaces.

``mapped_dataset`` reads the source chunk by chunk and writes raw images; every read of the cache
must equal ``load_dataset`` bit for bit (values, strides, mean/std), whatever the source and the
chunking, and building or reading it must not hold the dataset in memory (measured in a fresh
interpreter, private resident memory).
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from ddm_hpc.data import MappedImages, dense, images, load_dataset, mapped_dataset
from ddm_hpc.errors import DataError

FIELDS = ("y_train", "y_test", "train_index", "test_index")


def _assert_same(bundle, ref):
    assert isinstance(bundle.x_train, MappedImages) and isinstance(bundle.x_test, MappedImages)
    for name in ("x_train", "x_test"):
        x, r = dense(getattr(bundle, name)), getattr(ref, name)
        assert x.shape == r.shape and torch.equal(x, r), name
        rows = torch.arange(len(r) - 1, -1, -3)
        assert torch.equal(getattr(bundle, name)[rows], r[rows]), name
        assert getattr(bundle, name)[rows].stride() == r[rows].stride(), name
    for name in FIELDS:
        assert torch.equal(getattr(bundle, name), getattr(ref, name)), name
    assert (bundle.mean, bundle.std, bundle.num_classes) == (ref.mean, ref.std, ref.num_classes)


def _h5_rgb(path, n=2600, seed=0):
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        f["x"] = rng.integers(0, 256, (n, 4, 3, 3), dtype=np.uint8)
        f["y"] = rng.integers(0, 4, n)
    return path


def _npz_float(path, compressed, n=2300, seed=1):
    rng = np.random.default_rng(seed)
    arrays = {"x": rng.random((n, 5, 4)), "y": np.arange(n) % 3,
              "x_test": rng.random((40, 5, 4)).astype(np.float32), "y_test": np.arange(40) % 3}
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path


@pytest.mark.parametrize("source", ["h5-rgb-split-here", "npz-float-with-test", "npz-compressed"])
def test_cache_equals_load_dataset_in_many_chunks(tmp_path, monkeypatch, source):
    """Chunks of three statistics pieces (300 rows of 3x4x3, 540 of 1x5x4) over 2300-2600 rows: 5 to 9 chunks."""
    monkeypatch.setattr(images, "STATS_BYTES", 8 * 36 * 100)
    monkeypatch.setattr(images, "CHUNK_BYTES", 4 * 36 * 300)
    assert images.stats_rows((3, 4, 3)) == 100 and images.chunk_rows((3, 4, 3)) == 300
    assert images.stats_rows((1, 5, 4)) == 180 and images.chunk_rows((1, 5, 4)) == 540
    path = {"h5-rgb-split-here": lambda: _h5_rgb(tmp_path / "a.h5"),
            "npz-float-with-test": lambda: _npz_float(tmp_path / "a.npz", False),
            "npz-compressed": lambda: _npz_float(tmp_path / "a.npz", True)}[source]()
    for n_train in (None, 1100):
        ref = load_dataset(str(path), n_train=n_train, seed=4)
        got = mapped_dataset(str(path), tmp_path, tmp_path / "cache", n_train=n_train, seed=4)
        _assert_same(got, ref)
        assert got.x_train.raw.dtype == (np.uint8 if source.startswith("h5") else np.float32)
    assert len(list((tmp_path / "cache").iterdir())) == 2 and not list((tmp_path / "cache").glob("*/*tmp*"))


def _png(path, pixels):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def test_cache_widens_a_folder_whose_first_colour_image_comes_late(tmp_path, monkeypatch):
    """A folder of grey images then colour ones: load_dataset makes all RGB; so must the chunked cache,
    after it has written grey chunks (2-row chunks and 2-row statistic pieces on both sides)."""
    monkeypatch.setattr(images, "chunk_rows", lambda shape: 2)
    monkeypatch.setattr(images, "stats_rows", lambda shape: 2)
    rng = np.random.default_rng(0)
    for k in range(5):
        _png(tmp_path / "d" / "train" / "a" / f"{k}.png", rng.integers(0, 256, (4, 4), dtype=np.uint8))
    for k in range(3):
        _png(tmp_path / "d" / "train" / "b" / f"{k}.png", rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    for k in range(2):  # a grey-only chunk after the widening: repeated to RGB as it is written
        _png(tmp_path / "d" / "train" / "c" / f"{k}.png", rng.integers(0, 256, (4, 4), dtype=np.uint8))
    _png(tmp_path / "d" / "test" / "a" / "0.png", rng.integers(0, 256, (4, 4), dtype=np.uint8))
    _png(tmp_path / "d" / "test" / "b" / "0.png", rng.integers(0, 256, (4, 4), dtype=np.uint8))
    ref = load_dataset(str(tmp_path / "d"))
    got = mapped_dataset(str(tmp_path / "d"), tmp_path, tmp_path / "cache")
    assert ref.image_shape == (3, 4, 4) and got.x_train.raw.shape == (10, 4, 4, 3)
    assert got.x_test.raw.shape == (2, 4, 4, 3)  # the test folder is all grey: RGB all the same, as load_dataset
    _assert_same(got, ref)


def test_interrupted_cache_leaves_nothing_and_a_rerun_completes(tmp_path, monkeypatch):
    monkeypatch.setattr(images, "chunk_rows", lambda shape: 2)
    monkeypatch.setattr(images, "stats_rows", lambda shape: 2)  # chunks are multiples of the statistics' pieces
    rng = np.random.default_rng(1)
    for k in range(6):
        _png(tmp_path / "d" / ("a" if k % 2 else "b") / f"{k}.png", rng.integers(0, 256, (4, 4), dtype=np.uint8))
    bad = tmp_path / "d" / "b" / "4.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DataError) as err:
        mapped_dataset(str(tmp_path / "d"), tmp_path, tmp_path / "cache")
    assert "4.png" in str(err.value) and "\n" not in str(err.value)
    assert [p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []  # no half-written cache
    _png(bad, rng.integers(0, 256, (4, 4), dtype=np.uint8))
    _assert_same(mapped_dataset(str(tmp_path / "d"), tmp_path, tmp_path / "cache"), load_dataset(str(tmp_path / "d")))


class _Minibatches(torch.utils.data.Dataset):
    def __init__(self, x, size):
        self.x, self.starts = x, list(range(0, len(x), size))
        self.size = size

    def __len__(self):
        return len(self.starts)

    def __getitem__(self, i):
        return self.x[torch.arange(self.starts[i], min(self.starts[i] + self.size, len(self.x)))]


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_mapped_images_in_worker_processes(tmp_path, context):
    """DataLoader workers (forked, or spawned: the images are pickled) map the file themselves."""
    import pickle

    from torch.utils.data import DataLoader

    x = mapped_dataset(str(_h5_rgb(tmp_path / "a.h5", n=300)), tmp_path, tmp_path / "cache").x_train
    assert len(pickle.dumps(x)) < 2000  # the path and the statistics, not the pages
    loader = DataLoader(_Minibatches(x, 64), batch_size=None, num_workers=2, multiprocessing_context=context)
    assert torch.equal(torch.cat(list(loader)), dense(x))


_MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np, torch
    import h5py, tqdm
    import ddm_hpc.data as data
    import ddm_hpc.data.images as images
    from ddm_hpc.utils import PeakRSS
    path, cache, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    images.CHUNK_BYTES, images.STATS_BYTES = 4 << 20, 2 << 20  # scaled down 8x with the file: 1364-row chunks
    with h5py.File(cache + "-tiny.h5", "w") as f:  # first-use allocations (h5py, torch ops) before the baseline
        f["x"], f["y"] = np.zeros((40, 16, 16, 3), np.uint8), np.arange(40) % 10
    data.load_dataset(cache + "-tiny.h5")
    tiny = data.mapped_dataset(cache + "-tiny.h5", cache, cache + "-tiny")
    tiny.x_train[torch.arange(8)].sum()
    with PeakRSS() as mem:
        if mode == "memory":
            b = data.load_dataset(path, seed=0)
        elif mode == "build":
            b = data.mapped_dataset(path, cache, cache, seed=0)
        else:  # read every training row once, in shuffled minibatches, as training does
            b = data.mapped_dataset(path, cache, cache, seed=0)
            order = torch.randperm(len(b.y_train), generator=torch.Generator().manual_seed(0))
            total = 0.0
            for a in range(0, len(order), 256):
                total += float(b.x_train[order[a:a + 256]].sum())
    print(json.dumps({"private": mem.private_delta, "rss": mem.delta}))
""")


def test_cache_memory_is_bounded_by_the_chunk_not_the_dataset(tmp_path):
    """Scaled shape: 240 000 RGB 16x16 uint8 images, a 184 MB HDF5 file (ImageNet: 1.28 M x 224^2, 190 GB).

    The in-memory loader holds the normalised float32 set (4x the file) and more. Building the
    cache holds about one chunk (chunk and statistics sizes scaled down 8x with the file: 1364 rows,
    1 MB raw, 4 MB float, 2 MB float64 statistics piece, plus what the allocator keeps of them); reading it through the map holds one minibatch of
    private memory (the mapped pages are page cache, shared and reclaimable).
    """
    n, shape = 240_000, (16, 16, 3)
    rng = np.random.default_rng(0)
    path = tmp_path / "big.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=rng.integers(0, 256, (n, *shape), dtype=np.uint8), chunks=(1024, *shape))
        f["y"] = rng.integers(0, 10, n)
        f["x_test"], f["y_test"] = rng.integers(0, 256, (500, *shape), dtype=np.uint8), np.arange(500) % 10
    file_bytes = n * int(np.prod(shape))
    res = {}
    for mode in ("memory", "build", "read"):
        out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(path), str(tmp_path / "cache"), mode],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        res[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = {m: r["private"] / file_bytes for m, r in res.items()}
    assert ratio["memory"] >= 3.5, res  # the instrument sees the full float32 load
    assert ratio["build"] < 0.6, res  # measured 0.28-0.31: a chunk, labels and what the allocator keeps
    assert ratio["read"] < 0.15, res  # measured 0.05: one minibatch and what the allocator keeps


def test_threaded_decoding_equals_sequential_and_names_a_bad_file(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    files = []
    for k in range(80):
        files.append(tmp_path / f"{k:03d}.png")
        _png(files[-1], rng.integers(0, 256, (6, 5, 3) if k % 3 else (6, 5), dtype=np.uint8))
    monkeypatch.setattr(images, "DECODE_THREADS", 1)
    one = images.load_images(files)
    monkeypatch.setattr(images, "DECODE_THREADS", 4)
    assert one.shape == (80, 6, 5, 3) and torch.equal(images.load_images(files), one)
    files[70].write_bytes(b"broken")
    with pytest.raises(DataError, match="070.png"):
        images.load_images(files)


def test_folder_of_npz_chunks_equals_one_file(tmp_path, monkeypatch):
    """Three chunk files of uneven size load like the same rows in one .npz (same split, same bits),
    in memory and through the cache (100-row cache chunks, so cache chunks straddle chunk files)."""
    monkeypatch.setattr(images, "STATS_BYTES", 8 * 48 * 50)
    monkeypatch.setattr(images, "CHUNK_BYTES", 4 * 48 * 100)
    rng = np.random.default_rng(5)
    x = rng.integers(0, 256, (430, 4, 4, 3), dtype=np.uint8)
    y = rng.integers(0, 5, 430)
    (tmp_path / "chunks").mkdir()
    for name, (a, b) in zip(("part-0.npz", "part-1.npz", "part-2.npz"), ((0, 170), (170, 201), (201, 430))):
        np.savez_compressed(tmp_path / "chunks" / name, x=x[a:b], y=y[a:b])
    np.savez(tmp_path / "one.npz", x=x, y=y)
    ref = load_dataset(str(tmp_path / "one.npz"), seed=2)
    got = load_dataset(str(tmp_path / "chunks"), seed=2)
    for name in ("x_train", "x_test", *FIELDS):
        assert torch.equal(getattr(got, name), getattr(ref, name)), name
    assert (got.mean, got.std) == (ref.mean, ref.std)
    _assert_same(mapped_dataset(str(tmp_path / "chunks"), tmp_path, tmp_path / "cache", seed=2), ref)


def test_image_size_resizes_and_crops_a_folder_of_mixed_sizes(tmp_path):
    """ImageNet-like folders hold images of many sizes: without --image-size that is a one-line error
    naming the fix; with it every image is resized (shorter side) and centre-cropped, the same in
    memory and through the cache."""
    from ddm_hpc.errors import ConfigError

    rng = np.random.default_rng(7)
    wide = rng.integers(0, 256, (8, 12, 3), dtype=np.uint8)  # h 8, w 12: shorter side already 8
    _png(tmp_path / "d" / "a" / "0.png", wide)
    for k in range(1, 6):
        _png(tmp_path / "d" / "a" / f"{k}.png", rng.integers(0, 256, (10 + k, 9 + 2 * k, 3), dtype=np.uint8))
        _png(tmp_path / "d" / "b" / f"{k}.png", rng.integers(0, 256, (16, 20 - k), dtype=np.uint8))
    with pytest.raises(DataError) as err:
        load_dataset(str(tmp_path / "d"))
    assert "--image-size" in str(err.value) and "\n" not in str(err.value)
    ref = load_dataset(str(tmp_path / "d"), image_size=8, test_fraction=0.3)
    assert ref.image_shape == (3, 8, 8)
    x0 = images.load_images([tmp_path / "d" / "a" / "0.png"], 8)[0].numpy()
    np.testing.assert_array_equal(x0, wide[:, 2:10])  # no resampling at scale 1: exactly the centre crop
    expect = torch.from_numpy(wide[:, 2:10]).permute(2, 0, 1).float() / 255
    expect = (expect - torch.tensor(ref.mean)[:, None, None]) / torch.tensor(ref.std)[:, None, None]
    (x, pos), = [(x, (index == 0).nonzero()) for x, index in ((ref.x_train, ref.train_index),
                                                             (ref.x_test, ref.test_index)) if bool((index == 0).any())]
    torch.testing.assert_close(x[int(pos)], expect.float(), rtol=0, atol=1e-5)  # file 0 is in one of the splits
    _assert_same(mapped_dataset(str(tmp_path / "d"), tmp_path, tmp_path / "cache", image_size=8, test_fraction=0.3),
                 ref)
    with pytest.raises(ConfigError) as err:
        load_dataset(str(_h5_rgb(tmp_path / "a.h5", n=30)), image_size=8)
    assert "image folders only" in str(err.value) and "\n" not in str(err.value)
