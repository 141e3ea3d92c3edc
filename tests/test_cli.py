"""End-to-end CLI on a small real-MNIST subset: artifacts, schema, resume, drift, bad input."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch

from ddm_hpc.cli import main

SMOKE = ["--preset", "smoke"]


def _run(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, mnist_root):
    out = tmp_path_factory.mktemp("run")
    t0 = time.perf_counter()
    code = main(["run", *SMOKE, "--data-root", str(mnist_root), "--out", str(out), "--no-progress"])
    assert code == 0
    assert time.perf_counter() - t0 < 180  # the budget for this test on CPU
    return out


def test_attribution_schema_and_values(smoke_run):
    with h5py.File(smoke_run / "attribution.h5") as f:
        assert f.attrs["complete"] and f.attrs["stage"] == "attribute"
        cfg = json.loads(f.attrs["config"])
        assert cfg["cluster"]["clusters_per_class"] == 3 and "git_revision" in f.attrs and "versions" in f.attrs
        scores = f["scores"][()]
        k = len(f["clusters/class"])
        assert scores.dtype == np.float32 and scores.shape == (3, k) and k == 30
        assert np.isfinite(scores).all()
        assert f["query_index"].shape == (3,) and f["query_index"].dtype.kind == "i"
        assert f["clusters/assignment"].shape == (300,)
        assert sorted(np.unique(f["clusters/class"][()])) == list(range(10))
        # scores are the WLS fit of the stored outputs: with leave-one-out perturbations the fit is
        # exact, so score[q, k] must equal dist1 of fine-tuned model k on query q, recomputed here.
        outputs, base = f["outputs"][()], f["base_probs"][()]
        assert outputs.shape == (k, 3, 10) and f["perturbations"].shape == (k, k)
        dist1 = np.linalg.norm(outputs - base[None], axis=-1).T
        np.testing.assert_allclose(scores, dist1, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(f["top_clusters"][()][:, 0], scores.argmax(1))
        # hierarchical search: a class per query, then one of that class's clusters
        cls = f["hierarchy/class"][()]
        best = f["hierarchy/cluster"][()]
        np.testing.assert_array_equal(f["clusters/class"][()][best], cls)
        assert 10 <= f.attrs["n_finetunes_hierarchical"] <= 10 + 3 * 3
    # query_index are test-set indices: the base prediction is the model's on that test image
    from ddm_hpc.data import load_dataset

    with h5py.File(smoke_run / "train.h5") as f:
        test_index = f["data/test_index"][()]
    with h5py.File(smoke_run / "attribution.h5") as f:
        assert set(f["query_index"][()]) <= set(test_index)
        b = load_dataset("mnist", json.loads(f.attrs["config"])["data"]["data_root"], n_train=300, n_test=100)
        pos = f["query_position"][()]
        np.testing.assert_array_equal(b.test_index[pos].numpy(), f["query_index"][()])
        np.testing.assert_array_equal(b.y_test[pos].numpy(), f["query_label"][()])


def test_synsets_and_trajectory(smoke_run):
    with h5py.File(smoke_run / "synsets.h5") as f:
        assert f["cluster/images"].shape == (30, 10, 1, 28, 28)  # the default: 10 images per synset
        assert f["class/images"].shape == (10, 10, 1, 28, 28)
        assert f.attrs["method"] == "ddm" and f.attrs["target"] == "influence" and f.attrs["syn_labels"] == "learn"
        assert f["cluster/layer_rates"].shape[0] == 30  # per-tensor rates, used by the one-step fine-tune
    with h5py.File(smoke_run / "train.h5") as f:
        assert f["trajectory/params"].shape[0] == 4  # theta_0..theta_3
        assert f["trajectory/params"].dtype == np.float32
        assert f["trajectory/epoch"][()].tolist() == [0, 1, 2, 3]
        assert len(f["params/name"]) == f["params/offset"].shape[0]


def test_rerun_resumes_without_recomputing(smoke_run, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in smoke_run.glob("*.h5")}
    code, out, err = _run(["run", "--out", str(smoke_run), "--no-progress"], capsys)  # options from config.json
    assert code == 0, err
    assert "up to date" in err and "top clusters" in out
    assert {p.name: p.stat().st_mtime_ns for p in smoke_run.glob("*.h5")} == before


def test_config_drift_is_refused(smoke_run, capsys):
    before = (smoke_run / "train.h5").stat().st_mtime_ns
    code, _, err = _run(["train", "--out", str(smoke_run), "--epochs", "2"], capsys)
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert "epochs: 3 -> 2" in line and "--overwrite" in line
    assert (smoke_run / "train.h5").stat().st_mtime_ns == before
    # a downstream stage with a changed upstream option is refused too
    code, _, err = _run(["attribute", "--out", str(smoke_run), "--clusters-per-class", "2"], capsys)
    assert code == 2 and "clusters.h5" in err and "clusters_per_class: 3 -> 2" in err


def test_stage_by_stage_with_hierarchical_only(tmp_path, mnist_root, capsys):
    common = ["--out", str(tmp_path), "--no-progress"]
    code, _, err = _run(["cluster", *common], capsys)
    assert code == 2 and "train.h5 is missing" in err
    assert _run(["train", *SMOKE, "--data-root", str(mnist_root), *common], capsys)[0] == 0
    for stage in ("cluster", "distill"):
        assert _run([stage, *common], capsys)[0] == 0
    code, out, err = _run(["attribute", "--search", "hierarchical", "--objective", "dist2", *common], capsys)
    assert code == 0, err
    with h5py.File(tmp_path / "attribution.h5") as f:
        scores = f["scores"][()]
        cls = f["hierarchy/class"][()]
        for q in range(len(scores)):
            in_class = f["clusters/class"][()] == cls[q]
            assert np.isfinite(scores[q, in_class]).all() and np.isnan(scores[q, ~in_class]).all()
        assert f.attrs["objective"] == "dist2" and "outputs" not in f


@pytest.mark.parametrize("args, expected", [
    (["--data-root", "/nonexistent/data"], "/nonexistent/data/MNIST/raw"),
    (["--dataset", "imagenet-1m"], "mnist"),
    (["--clusters-per-class", "50"], "--clusters-per-class"),
    (["--n-queries", "500"], "--n-queries"),
    (["--model-args", "{oops"], "--model-args"),
    (["--model", "nosuchnet"], "convnet"),
])
def test_bad_input_gives_one_line_error(tmp_path, mnist_root, capsys, args, expected):
    full = ["run", *SMOKE, "--data-root", str(mnist_root), "--out", str(tmp_path / "r"), "--no-progress", *args]
    code, out, err = _run(full, capsys)
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("ddm-hpc: error:") and expected in last
    assert "Traceback" not in err
    assert not list((tmp_path / "r").glob("attribution.h5"))


def test_device_cuda_without_gpu_is_an_error(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    code, _, err = _run(["train", "--device", "cuda", "--out", str(tmp_path)], capsys)
    assert code == 2 and "no CUDA GPU" in err


def test_console_script_help_lists_flags_with_defaults():
    res = subprocess.run([sys.executable, "-m", "ddm_hpc.cli", "run", "--help"], capture_output=True, text=True)
    assert res.returncode == 0
    for flag in ["--dataset", "--data-root", "--model", "--clusters-per-class", "--epochs", "--n-train",
                 "--n-test", "--n-queries", "--out", "--device", "--seed", "--executor"]:
        assert flag in res.stdout, flag
    flat = " ".join(res.stdout.split())
    assert "(default: 30)" in flat and "(default: 'mnist')" in flat and "(default: 'convnet')" in flat
    bad = subprocess.run([sys.executable, "-m", "ddm_hpc.cli", "run", "--epochs", "x"], capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid int value" in bad.stderr


def test_attribute_variants_and_show(smoke_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "variants"
    shutil.copytree(smoke_run, run)
    common = ["--out", str(run), "--no-progress", "--overwrite"]
    # one batch query over all queries, global objective (Eq. 14) and random perturbations with WLS
    code, out, err = _run(["attribute", "--query-mode", "batch", "--search", "flat", "--perturbation", "random",
                           "--n-perturbations", "40", "--beta", "shap", *common], capsys)
    assert code == 0, err
    with h5py.File(run / "attribution.h5") as f:
        assert f["scores"].shape == (1, 30) and f["perturbations"].shape == (40, 30)
        assert f["objectives/global/scores"].shape == (1, 30)
        assert ((f["perturbations"][()] == 0).sum(1) >= 1).all()
    code, out, err = _run(["attribute", "--objective", "global", "--search", "both", *common], capsys)
    assert code == 0, err
    with h5py.File(run / "attribution.h5") as f:
        assert f.attrs["objective"] == "global" and f["scores"].shape == (1, 30)
        assert f["hierarchy/class"].shape == (1,)
        np.testing.assert_array_equal(f["scores"][()], f["objectives/global/scores"][()])
    code, out, _ = _run(["show", str(run)], capsys)
    assert code == 0 and "query batch" in out and "global" in out


def test_an_added_option_at_its_default_keeps_the_stage_keys():
    """Options marked ``added`` (e.g. --image-size) leave every stage key unchanged while at their default,
    so runs made before they existed stay valid; set, they change the keys of the stages that read them."""
    from ddm_hpc import graph
    from ddm_hpc.config import Config

    default, sized = Config(), Config.from_dict({"data": {"image_size": 64}})
    for stage in graph.BY_NAME:
        assert "image_size" not in default.stage_dict(stage)["data"]
        assert sized.stage_dict(stage)["data"]["image_size"] == 64
        assert default.stage_key(stage) != sized.stage_key(stage)
    assert Config.from_dict({"data": {"image_size": 0}}).stage_key("train") == default.stage_key("train")


def test_a_second_command_on_a_locked_run_directory_fails_in_one_line(tmp_path, capsys):
    """Two commands never write one run directory at once: the second is refused naming the holder; the lock
    goes with the process (flock), and a command that fails before writing leaves no directory behind."""
    from ddm_hpc.pipeline import run_lock

    run = tmp_path / "run"
    with run_lock(run, "run"):
        code, _, err = _run(["train", "--preset", "smoke", "--out", str(run)], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1
        assert "in use by pid" in err and "ddm-hpc run" in err and "--out" in err
    assert not run.exists()  # the holder made it and wrote nothing: removed
    code, _, err = _run(["show", str(tmp_path / "nowhere")], capsys)
    assert code == 2 and "not a run directory" in err


def test_incompatible_options_fail_before_any_stage(tmp_path, capsys, mnist_root):
    code, _, err = _run(["run", "--preset", "smoke", "--levels", "cluster", "--out", str(tmp_path / "a")], capsys)
    assert code == 2 and "--search both needs class synsets" in err and not (tmp_path / "a").exists()
    code, _, err = _run(["run", "--preset", "smoke", "--query-index", "99999", "--data-root", str(mnist_root),
                         "--out", str(tmp_path / "b")], capsys)
    assert code == 2 and "--query-index [99999] outside the test subset" in err
    assert not (tmp_path / "b" / "train.h5").exists()


def test_temp_files_of_killed_writers_are_shown_then_removed(tmp_path, capsys, mnist_root):
    from ddm_hpc.launch import status

    run = tmp_path / "run"
    args = ["train", "--preset", "smoke", "--no-progress", "--data-root", str(mnist_root), "--out", str(run)]
    assert main(args) == 0
    orphan = run / ".train.h5.tmp.99999"
    orphan.write_bytes(b"x" * 10)
    in_shards = run / "shards" / "distill" / ".distill-00000-of-00002.h5.tmp.99999"
    in_shards.parent.mkdir(parents=True)
    in_shards.write_bytes(b"x")
    text = status(run)
    assert "2 temp file(s) of interrupted writers" in text and ".train.h5.tmp.99999" in text
    capsys.readouterr()
    assert main(args) == 0  # up to date, but it held the lock: the orphan outside shards/ is gone
    assert not orphan.exists() and in_shards.exists()


def test_threads_option_sets_and_logs_the_torch_threads(tmp_path, capsys, mnist_root):
    import torch

    before = torch.get_num_threads()
    try:
        assert main(["train", "--preset", "smoke", "--threads", "1", "--no-progress", "--data-root",
                     str(mnist_root), "--out", str(tmp_path / "run")]) == 0
        assert torch.get_num_threads() == 1 and "threads: 1 torch thread(s) per process" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)
    assert main(["train", "--threads", "-1", "--out", str(tmp_path / "bad")]) == 2
    assert "--threads must be >= 0" in capsys.readouterr().err
