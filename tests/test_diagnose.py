"""``ddm-hpc diagnose``: useless data, noisy data, unlearning and transferability against direct computations.

The pure pieces (orders, masks, precision/recall, corruption, objectives, the student's loss) are checked
against hand computations; the sections run end to end on a tiny real-MNIST run and every table number is
recomputed from the section's HDF5 file and the run's artifacts.
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from ddm_hpc.cli import main
from ddm_hpc.config import Config, DiagnoseConfig, merge, smoke_preset
from ddm_hpc.data import DatasetBundle
from ddm_hpc.diagnose import read_section
from ddm_hpc.context import RunContext, load_data
from ddm_hpc.diagnose.removal import (RetrainPlan, ce_sum, class_balanced, cluster_order, corrupt, keep_first, kl_sum,
                                      n_removed, precision_recall, random_orders, removal_plan, retrain_plan,
                                      sample_order, train_student, val_removal_probs)
from ddm_hpc.errors import ConfigError

ARGS = ["--preset", "smoke", "--removal-seeds", "2", "--unlearn-clusters", "3", "--fractions", "10,50",
        "--noisy-fractions", "10,30", "--transfer-fractions", "20", "--no-progress"]


# ----------------------------------------------------------------------------- pure pieces
def test_cluster_order_removes_lowest_clusters_first():
    assignment = np.array([2, 0, 1, 2, 0, 1, 1])
    scores = np.array([0.5, -1.0, 3.0])  # cluster 1 first, then 0, then 2
    order = cluster_order(scores, assignment, seed=0)
    assert sorted(order.tolist()) == list(range(7))
    assert [int(assignment[i]) for i in order] == [1, 1, 1, 0, 0, 2, 2]
    keep = keep_first(order, 4)  # all of cluster 1 and one row of cluster 0
    assert keep.sum() == 3 and not keep[[2, 5, 6]].any()
    assert (~keep[[1, 4]]).sum() == 1


def test_class_balanced_takes_each_class_evenly():
    labels = np.array([0] * 6 + [1] * 6 + [2] * 3)
    order = np.arange(15)  # an unbalanced ranking: all of class 0 first
    bal = class_balanced(order, labels)
    assert sorted(bal.tolist()) == list(range(15))
    for n, want in ((3, [1, 1, 1]), (5, [2, 2, 1]), (10, [4, 4, 2])):
        assert np.bincount(labels[bal[:n]], minlength=3).tolist() == want
    for c in range(3):  # each class keeps its own order
        rows = bal[labels[bal] == c]
        assert np.array_equal(rows, np.sort(rows))
    rev = class_balanced(order[::-1], labels)
    assert rev[:3].tolist() == [5, 11, 14]


def test_sample_order_and_counts():
    order = sample_order(np.array([0.1, 5.0, 2.0, 5.0]))
    assert order.tolist() == [1, 3, 2, 0]  # highest first, stable on ties
    assert n_removed(10, 2000) == 200 and n_removed(1, 300) == 3
    r = random_orders(50, 3, seed=0)
    assert len(r) == 3 and all(sorted(o.tolist()) == list(range(50)) for o in r)
    assert not np.array_equal(r[0], r[1])


def test_precision_recall_against_known_indices():
    corrupted = np.zeros(10, dtype=bool)
    corrupted[[0, 1, 2, 3]] = True
    keep = np.ones(10, dtype=bool)
    keep[[0, 1, 7]] = False  # 2 of 3 removed are corrupted; 2 of 4 corrupted removed
    p, r = precision_recall(keep, corrupted)
    assert p == pytest.approx(2 / 3) and r == pytest.approx(0.5)


def test_build_plan_layout():
    orders = {"a": np.arange(10), "random": random_orders(10, 2, 0)}
    plan = removal_plan(orders, [20.0, 50.0], 10, seeds=2)
    assert len(plan.seed) == 2 + 2 * 2 * 2
    assert plan.method[:2] == ["full", "full"] and plan.keep[:2].all()
    a20 = [j for j, m in enumerate(plan.method) if m == "a" and plan.percent[j] == 20.0]
    assert [int(plan.seed[j]) for j in a20] == [0, 1]
    for j in a20:
        assert np.array_equal(np.nonzero(~plan.keep[j])[0], [0, 1])
    r50 = [j for j, m in enumerate(plan.method) if m == "random" and plan.percent[j] == 50.0]
    assert (~plan.keep[r50]).sum(1).tolist() == [5, 5] and not np.array_equal(plan.keep[r50[0]], plan.keep[r50[1]])
    other = removal_plan(orders, [20.0, 40.0], 10, seeds=2)
    assert plan.job_keys()[:4] == other.job_keys()[:4] and plan.job_keys()[4:6] != other.job_keys()[4:6]
    keys = plan.job_keys()
    assert keys[0] == keys[0] and len(set(keys)) == len(keys)  # full-data seeds 0 and 1 differ by seed
    assert RetrainPlan(plan.keep, plan.seed, plan.method, plan.percent, student=True).job_keys()[0] != keys[0]
    # the retraining's own options are part of every key: other epochs or student options miss the cache
    from ddm_hpc.diagnose.removal import retrain_salt

    cfg = Config()
    longer = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=cfg.train.epochs + 1))
    kd = dataclasses.replace(cfg, diagnose=dataclasses.replace(cfg.diagnose, kd_alpha=0.9))
    assert plan.job_keys(retrain_salt(cfg, False)) != plan.job_keys(retrain_salt(longer, False))
    assert retrain_salt(cfg, False) == retrain_salt(kd, False) and retrain_salt(cfg, True) != retrain_salt(kd, True)


def _bundle(n: int = 40, classes: int = 4) -> DatasetBundle:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 6, 6, generator=g) * 0.5 + 0.25  # away from 0 and 1: the noise is never clipped
    y = torch.arange(n) % classes
    return DatasetBundle("t", (x - 0.5) / 0.25, y, (x[:8] - 0.5) / 0.25, y[:8], torch.arange(n), torch.arange(8),
                         classes, (0.5,), (0.25,))


def test_corrupt_noise_and_labels():
    b = _bundle(n=400)
    x, y, c = corrupt(b, "noise", 0.25, 0.05, seed=3)
    clean = b.x_train * 0.25 + 0.5
    assert c.sum() == 100
    assert torch.equal(y, b.y_train)
    assert torch.allclose(x[~torch.from_numpy(c)], clean[~torch.from_numpy(c)], atol=1e-6)
    delta = (x - clean)[torch.from_numpy(c)]
    assert float(delta.std()) == pytest.approx(0.05, rel=0.05)  # 100 x 36 Gaussian draws
    x2, y2, c2 = corrupt(b, "labels", 0.25, 0.05, seed=3)
    assert c2.sum() == 100 and torch.allclose(x2, clean, atol=1e-6)
    flipped = y2 != b.y_train
    assert torch.equal(flipped, torch.from_numpy(c2))  # every corrupted label changed, no other
    assert int(y2.max()) < 4 and int(y2.min()) >= 0


def test_objectives_against_direct_sums():
    p = torch.tensor([[[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], [[0.2, 0.5, 0.3], [0.3, 0.3, 0.4]]])  # [K=2, V=2, L=3]
    y = torch.tensor([0, 2])
    assert torch.allclose(ce_sum(p, y), torch.tensor([-np.log(0.7) - np.log(0.8), -np.log(0.2) - np.log(0.4)],
                                                     dtype=torch.float32))
    s = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    pn, sn = p.double().numpy(), s.double().numpy()
    want = [(pn[k] * np.log(pn[k] / sn)).sum() for k in range(2)]
    assert torch.allclose(kl_sum(p, s), torch.tensor(want, dtype=torch.float32), atol=1e-6)


def test_student_without_kd_is_plain_training():
    """alpha = 0 leaves only cross-entropy: the student trains exactly as train_trajectory trains it."""
    from ddm_hpc.diagnose.removal import build_student
    from ddm_hpc.storage import ParamTable
    from ddm_hpc.train import train_trajectory

    b = _bundle()
    cfg = Config.from_dict({"train": {"epochs": 2, "batch_size": 8},
                            "diagnose": {"kd_alpha": 0.0, "student_width": 16}})
    keep = torch.ones(40, dtype=torch.bool)
    keep[::3] = False
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 4))
    st = train_student(cfg, b, teacher, keep, seed=5, device=torch.device("cpu"))
    ref = build_student(cfg, b, 5)
    traj = train_trajectory(ref, b.x_train, b.y_train, b.x_test[:0], b.y_test[:0], cfg.train, 5,
                                torch.device("cpu"), keep=keep, show_progress=False)
    got = ParamTable.from_module(st).flatten(dict(st.named_parameters()))
    assert torch.equal(got, traj.params[-1])
    cfg_kd = dataclasses.replace(cfg, diagnose=dataclasses.replace(cfg.diagnose, kd_alpha=0.5))
    st2 = train_student(cfg_kd, b, teacher, keep, seed=5, device=torch.device("cpu"))
    assert not torch.equal(ParamTable.from_module(st2).flatten(dict(st2.named_parameters())), got)


def test_diagnose_config_errors():
    with pytest.raises(ConfigError, match="--tasks"):
        DiagnoseConfig(tasks="useless,bogus")
    with pytest.raises(ConfigError, match="--fractions"):
        DiagnoseConfig(fractions="10,120")
    with pytest.raises(ConfigError, match="--corruptions"):
        DiagnoseConfig(corruptions="blur")
    with pytest.raises(ConfigError, match="--corrupt-fraction"):
        DiagnoseConfig(corrupt_fraction=1.5)


# ----------------------------------------------------------------------------- end to end on real MNIST
@pytest.fixture(scope="module")
def diagnosed(tmp_path_factory, mnist_root):
    out = tmp_path_factory.mktemp("diag")
    rc = main(["diagnose", *ARGS, "--tasks", "useless,noisy,unlearn,transfer", "--corruptions", "labels",
               "--data-root", str(mnist_root), "--out", str(out)])
    assert rc == 0
    cfg = Config.from_dict(merge(smoke_preset(), {"data": {"data_root": str(mnist_root)}, "runtime": {"out": str(out)},
                                                  "diagnose": {"removal_seeds": 2}}))
    return out, cfg


def _table_cells(lines: list[str], label: str) -> list[str]:
    row = next(line for line in lines if line.startswith(f"| {label} |"))
    return [c.strip() for c in row.strip("|").split("|")[1:]]


def _cell(v: np.ndarray) -> str:
    v = v * 100
    return f"{v.mean():.1f} ± {v.std(ddof=1):.1f}"


def test_useless_ranking_is_the_attribute_stage_global_objective(diagnosed):
    """Eq. 14 per cluster from the leave-one-out fine-tunes equals attribution.h5's flat global scores."""
    out, cfg = diagnosed
    val = val_removal_probs(cfg, load_data(cfg))
    with h5py.File(out / "attribution.h5") as f:
        want = f["objectives/global/scores"][0]
    sec = read_section(out / "diagnose" / "useless.h5")
    np.testing.assert_allclose(sec.arrays["ddm_cluster_scores"], want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(val.eq14(), want, rtol=1e-4, atol=1e-4)


def test_useless_table_recomputes_from_the_file(diagnosed):
    out, cfg = diagnosed
    sec = read_section(out / "diagnose" / "useless.h5")
    a = sec.arrays
    method = a["method"].astype(str)
    n = 300
    with h5py.File(out / "clusters.h5") as f:
        assignment = f["clusters/assignment"][()]
    ddm = cluster_order(a["ddm_cluster_scores"], assignment, cfg.seed)
    keep = np.unpackbits(a["keep_bits"], axis=1, count=n).astype(bool)
    lowest = int(np.argmin(a["ddm_cluster_scores"]))
    y = load_data(cfg).y_train.numpy()
    for p in (10.0, 50.0):
        sel = (method == "ddm") & (a["percent"] == p)
        assert (a["removed"][sel] == n_removed(p, n)).all()
        assert _table_cells(sec.lines, "DDM (Eq. 14 ranking)")[1 + [10.0, 50.0].index(p)] == _cell(a["accuracy"][sel])
        # the retrained rows are exactly the lowest-ranked clusters' members, the lowest cluster removed whole
        for j in np.nonzero(sel)[0]:
            np.testing.assert_array_equal(keep[j], keep_first(ddm, n_removed(p, n)))
            assert not keep[j][assignment == lowest].any()
        # class-balanced: the same ranking within each class, the same share of every class
        for j in np.nonzero((method == "ddm-bal") & (a["percent"] == p))[0]:
            np.testing.assert_array_equal(keep[j], keep_first(class_balanced(ddm, y), n_removed(p, n)))
            per_class = np.bincount(y[~keep[j]], minlength=10)
            assert per_class.max() - per_class.min() <= 1
        # random whole clusters: balanced too, another draw per seed
        rc = np.nonzero((method == "random-clusters") & (a["percent"] == p))[0]
        assert len(rc) == 2 and not np.array_equal(keep[rc[0]], keep[rc[1]])
        for j in rc:
            per_class = np.bincount(y[~keep[j]], minlength=10)
            assert per_class.max() - per_class.min() <= 1
    full = a["accuracy"][method == "full"]
    assert _table_cells(sec.lines, "Random select")[0] == _cell(full)


def test_retrainings_equal_a_direct_retraining(diagnosed):
    """The job layer's accuracy for a plan row is a direct exact retraining of that row's keep mask."""
    from ddm_hpc.models import build_target
    from ddm_hpc.retrain import retrain_keep
    from ddm_hpc.storage import ParamTable
    from ddm_hpc.train import accuracy
    from ddm_hpc.trajectory import load_into

    out, cfg = diagnosed
    bundle = load_data(cfg)
    sec = read_section(out / "diagnose" / "useless.h5")
    # full-data seed-0 retraining is theta_tau bit for bit (CPU; a GPU with --deterministic), so its accuracy is the run's own
    model = RunContext(cfg, bundle).trained_model()
    assert sec.arrays["accuracy"][0] == pytest.approx(accuracy(model, bundle.x_test, bundle.y_test))
    keep = np.unpackbits(sec.arrays["keep_bits"][-1], count=len(bundle.y_train)).astype(bool)
    seed = int(sec.arrays["seed"][-1])
    net = build_target(cfg, bundle)
    flat = retrain_keep(cfg, bundle, torch.from_numpy(keep), seed)
    acc = accuracy(load_into(net, ParamTable.from_module(net), flat), bundle.x_test, bundle.y_test)
    assert sec.arrays["accuracy"][-1] == pytest.approx(acc)


def test_rerun_retrains_only_new_jobs(diagnosed, monkeypatch):
    import ddm_hpc.diagnose.removal as removal

    out, cfg = diagnosed
    bundle = load_data(cfg)
    sec = read_section(out / "diagnose" / "useless.h5")
    a = sec.arrays
    keep = np.unpackbits(a["keep_bits"], axis=1, count=len(bundle.y_train)).astype(bool)
    plan = removal.RetrainPlan(keep, a["seed"], a["method"].astype(str).tolist(), a["percent"])
    monkeypatch.setattr(removal, "retrain_plan_task", lambda *a, **k: pytest.fail("retrained a cached job"))
    res = retrain_plan(cfg, bundle, "useless", plan.subset(list(range(len(a["seed"])))[::-1]))  # any order, no retraining
    np.testing.assert_array_equal(res["accuracy"], a["accuracy"][::-1])
    monkeypatch.undo()
    extra = keep[-1].copy()
    extra[np.nonzero(extra)[0][:7]] = False  # one new job: only it retrains
    calls = []
    real = removal.retrain_plan_task
    monkeypatch.setattr(removal, "retrain_plan_task", lambda *args, **kw: calls.append(1) or real(*args, **kw))
    both = removal.RetrainPlan(np.stack([keep[0], extra]), np.array([0, 0]), ["full", "x"], np.array([0.0, 1.0]))
    res = retrain_plan(cfg, bundle, "useless", both)
    assert len(calls) == 1 and res["accuracy"][0] == a["accuracy"][0]
    with h5py.File(out / "diagnose" / "useless-retrained.h5") as f:
        assert len(f["job_key"]) == len(set(f["job_key"][()].tolist())) == len(set(plan.job_keys())) + 1
    # another training schedule: nothing cached applies
    calls.clear()
    longer = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=cfg.train.epochs + 1))
    retrain_plan(longer, bundle, "useless", both.subset([1]))
    assert len(calls) == 1


def test_noisy_precision_recall_against_corrupted_indices(diagnosed):
    out, cfg = diagnosed
    sec = read_section(out / "diagnose" / "noisy.h5")
    a = {k[len("labels/"):]: v for k, v in sec.arrays.items() if k.startswith("labels/")}
    corrupted = a["corrupted"]
    assert corrupted.sum() == round(0.2 * 300)
    runs = sorted((out / "diagnose").glob("noisy-labels-*"))
    assert len(runs) == 1
    with np.load(runs[0] / "data.npz") as d:
        assert np.array_equal(d["corrupted"], corrupted)
        clean = load_data(cfg).y_train.numpy()
        assert np.array_equal(d["y"] != clean, corrupted)  # flipped labels are exactly the corrupted rows
    with h5py.File(runs[0] / "clusters.h5") as f:
        assignment = f["clusters/assignment"][()]
    method = a["method"].astype(str)
    orders = {"ddm": cluster_order(a["ddm_cluster_scores"], assignment, cfg.seed),
              "loss": sample_order(a["training_loss"])}
    for name, order in orders.items():
        for p in (10.0, 30.0):
            sel = np.nonzero((method == name) & (a["percent"] == p))[0]
            keep = keep_first(order, n_removed(p, 300))
            removed = ~keep
            want_p = (removed & corrupted).sum() / removed.sum()
            want_r = (removed & corrupted).sum() / corrupted.sum()
            np.testing.assert_allclose(a["precision"][sel], want_p)
            np.testing.assert_allclose(a["recall"][sel], want_r)
    flipped = cluster_order(-a["ddm_cluster_scores"], assignment, cfg.seed)  # the reversed-ranking sign check
    want = [precision_recall(keep_first(flipped, n_removed(p, 300)), corrupted) for p in (10.0, 30.0)]
    np.testing.assert_allclose(a["ddm_reversed_precision_recall"], want)
    # the default synsets have learned labels already: no separate learned-label ranking, no ddm-soft variant
    with h5py.File(runs[0] / "synsets.h5") as f:
        assert str(f.attrs["syn_labels"]) == "learn" and str(f.attrs["target"]) == "influence"
    assert not (runs[0] / "variants" / "ddm-soft").exists() and "ddm-soft" not in set(method)
    assert "ddm-soft_cluster_scores" not in a and "Sign check, DDM + learned labels" not in "\n".join(sec.lines)
    # the loss ranking on flipped labels finds them far above chance (20 %) at 10 % removed
    sel = (method == "loss") & (a["percent"] == 10.0)
    assert a["precision"][sel].mean() > 0.3


def test_unlearn_section_numbers(diagnosed):
    from ddm_hpc.unlearn import unlearn_all_accuracy

    out, cfg = diagnosed
    bundle = load_data(cfg)
    sec = read_section(out / "diagnose" / "unlearn.h5")
    assert sec.attrs["table4/ddm"] == pytest.approx(unlearn_all_accuracy(RunContext(cfg, bundle, torch.device("cpu"))))
    assert (out / "variants" / "ddm-match" / "synsets.h5").is_file()
    from ddm_hpc.unlearn import train_all_accuracy
    from ddm_hpc.variants import forward_matching
    ctx = RunContext(cfg, bundle, torch.device("cpu"))
    match = RunContext(forward_matching().config(cfg), bundle, torch.device("cpu"))
    assert sec.attrs["table4/ddm-match/from theta_0"] == pytest.approx(train_all_accuracy(ctx, match))
    assert "theta_0 trained on all DDM-match synsets" in "\n".join(sec.lines)
    with h5py.File(out / "train.h5") as f:
        assert sec.attrs["table4/theta_0"] == pytest.approx(float(f["trajectory/test_accuracy"][0]))
    rows = sec.arrays["single/rows"].astype(str).tolist()
    exact = rows.index("exact retraining without the cluster")
    assert len(rows) == 5 and "fine-tune on a batch of the remaining data" in rows
    np.testing.assert_array_equal(sec.arrays[f"single/{exact}/to_exact"], 0.0)
    with h5py.File(out / "diagnose" / "unlearn-retrained.h5") as f:
        np.testing.assert_allclose(sec.arrays[f"single/{exact}/test"], f["accuracy"][()])
        # the forget set of exact retraining: the model never saw those rows
        assert f["train_pred"].shape == (3, 300)
    assert len(sec.arrays["clusters"]) == 3


def test_transfer_table(diagnosed):
    out, _ = diagnosed
    sec = read_section(out / "diagnose" / "transfer.h5")
    a = sec.arrays
    method = a["method"].astype(str)
    assert np.isfinite(a["student_accuracy"]).all() and len(a["ddm_cluster_scores"]) == 30
    sel = (method == "ddm-kl") & (a["percent"] == 20.0)
    assert _table_cells(sec.lines, "DDM (KL ranking)")[1] == _cell(a["student_accuracy"][sel])


def test_markdown_report_embeds_sections(diagnosed):
    out, _ = diagnosed
    text = (out / "diagnostics.md").read_text()
    for title in ("Useless / harmful data", "Noisy data", "Quick unlearning", "Transferability"):
        assert f"## {title}" in text
    (out / "diagnostics.md").unlink()
    r = subprocess.run([sys.executable, "-m", "ddm_hpc.diagnose", str(out)], capture_output=True, text=True)
    assert r.returncode == 0 and (out / "diagnostics.md").read_text() == text


def test_bad_input_one_line_errors(tmp_path, capsys, diagnosed):
    out, cfg = diagnosed
    assert main(["diagnose", "--tasks", "bogus", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--tasks" in err and "choose from" in err
    r = subprocess.run([sys.executable, "-m", "ddm_hpc.diagnose", str(tmp_path / "none")], capture_output=True, text=True)
    assert r.returncode != 0 and "run `ddm-hpc diagnose" in r.stderr
    no_val = dataclasses.replace(cfg, attribute=dataclasses.replace(cfg.attribute, n_val=0))
    with pytest.raises(ConfigError, match="--n-val"):
        val_removal_probs(no_val, load_data(cfg))


def test_unlearning_baseline_specs():
    from ddm_hpc.diagnose.unlearn import ascent_spec, remaining_spec

    assignment = np.array([0, 1, 0, 2, 1, 0, 2, 2])
    ga = ascent_spec(assignment, np.array([0, 2]))
    assert ga.rows.tolist() == [[0, 2, 5], [3, 6, 7]]
    np.testing.assert_allclose(ga.weights.numpy(), 1 / 3)
    ft = remaining_spec(assignment, np.array([0, 1]), batch=4, seed=0)
    for i, c in enumerate((0, 1)):
        picked = ft.rows[i][ft.weights[i] > 0].numpy()
        assert len(picked) == 4 and len(set(picked.tolist())) == 4 and (assignment[picked] != c).all()
        assert float(ft.weights[i].sum()) == pytest.approx(1.0)
    from ddm_hpc.diagnose.unlearn import compact

    x, y = torch.arange(8.0)[:, None] * 10, torch.arange(8) % 3
    spec, cx, cy = compact(ga, x, y)
    assert len(cx) == 6  # rows 0, 2, 3, 5, 6, 7
    assert torch.equal(cx[spec.rows], x[ga.rows]) and torch.equal(cy[spec.rows], y[ga.rows])
