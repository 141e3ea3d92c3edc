"""``ddm-hpc evaluate`` end to end on a tiny real-MNIST run: schema, recomputable metrics, resume, report."""
from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ddm_hpc.cli import main
from ddm_hpc.config import Config, EvaluateConfig
from ddm_hpc.errors import ConfigError, StageError
from ddm_hpc.context import RunContext
from ddm_hpc.evaluate import groundtruth_path, load_retrained, retrain_jobs, retrain_key
from ddm_hpc.metrics import spearman
from ddm_hpc.methods import MethodResult, cluster_means, spread_to_clusters

METHODS = "random,predict,clustering,ddm,ddm-match,ddm-seq,ddm-soft,tracin,trak"
ARGS = ["--preset", "smoke", "--n-masks", "6", "--noise-seeds", "1", "--methods", METHODS, "--proj-dim", "64",
        "--peer-checkpoints", "2", "--no-progress"]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, mnist_root):
    out = tmp_path_factory.mktemp("eval")
    assert main(["evaluate", *ARGS, "--data-root", str(mnist_root), "--out", str(out)]) == 0
    return out


def _ce(p, labels):
    return -np.log(np.clip(p[..., np.arange(len(labels)), labels], 1e-12, None))


def test_evaluation_schema(evaluated):
    with h5py.File(evaluated / "evaluation.h5") as f:
        assert f.attrs["complete"] and f.attrs["stage"] == "evaluate"
        q, k = len(f["query_index"]), len(f["gt/removed"])
        assert (q, k) == (3, 30)
        assert f["gt/base"].shape == (q, 10) and f["gt/base"].dtype == np.float32
        assert f["gt/outputs"].shape == (k, q, 10) and f["gt/outputs"].dtype == np.float32
        assert f["gt/noise"].shape == (1, q, 10)
        assert f["gt/masks"].shape == (6, k) and f["gt/mask_outputs"].shape == (6, q, 10)
        assert f["query_label"].dtype.kind == "i" and f["gt/removed"].dtype.kind == "i"
        np.testing.assert_allclose(f["gt/outputs"][()].sum(-1), 1.0, rtol=1e-5)
        assert sorted(f["methods"]) == sorted(METHODS.split(","))
        for name in f["methods"]:
            s = f["methods"][name]["scores"]
            assert s.shape == (q, k) and s.dtype == np.float32 and np.isfinite(s[()]).all(), name
            assert float(f["methods"][name]["seconds"][()]) >= 0
        # the full-data retraining is theta_tau bit for bit (on the CPU, and on a GPU with --deterministic), so its
        # softmax is the attribute stage's
        # (up to float32 rounding: attribute evaluates the queries in a larger batch; on a GPU that batch size may
        # take another, TF32, cuDNN algorithm: ~1e-4)
        tol = 1e-3 if torch.cuda.is_available() else 1e-6
        assert f["gt"].attrs["base_drift"] < tol
        with h5py.File(evaluated / "attribution.h5") as a:
            np.testing.assert_allclose(f["gt/base"][()], a["base_probs"][()], atol=tol)
            np.testing.assert_array_equal(f["query_index"][()], a["query_index"][()])
        # DDM's per-objective scores are the attribute stage's flat scores, unchanged; the file records which of them
        # locate Dist1 (the default's influence synsets: their own)
            for obj in ("dist1", "dist2", "dist3"):
                np.testing.assert_array_equal(f[f"methods/ddm/objectives/{obj}"][()], a[f"objectives/{obj}/scores"][()])
        assert f["methods/ddm"].attrs["dist1_by"] == "dist1" and f["methods/ddm-match"].attrs["dist1_by"] == "dist1"


def test_metrics_recompute_from_the_file(evaluated):
    """Every table number follows from the stored scores and ground truth (Eq. 10 and LDS by hand)."""
    from ddm_hpc.report import read_evaluation

    d = read_evaluation(evaluated / "evaluation.h5")
    by_rule = {(n, f"by_{m}"): d["methods"][n]["attrs"][f"dist1_by_{m}"] for n in d["methods"] for m in ("dist1", "dist2")}
    with h5py.File(evaluated / "evaluation.h5") as f:
        base, out, labels = f["gt/base"][()], f["gt/outputs"][()], f["query_label"][()]
        removed = f["gt/removed"][()]
        masks, mask_out = f["gt/masks"][()], f["gt/mask_outputs"][()]
        for name in f["methods"]:
            g = f["methods"][name]
            scores = g["scores"][()]
            objs = {m: g[f"objectives/{m}"][()] for m in ("dist1", "dist2", "dist3")} if "objectives" in g else \
                {"dist1": scores, "dist2": scores, "dist3": -scores}
            rules = {f"by_{m}": objs[m] for m in ("dist1", "dist2")}  # the report's two locating-rule columns
            objs["dist1"] = objs[g.attrs["dist1_by"]]
            for m in ("dist1", "dist2", "dist3", *rules):
                vals = []
                for qi in range(len(labels)):
                    r = int(np.argmax({**objs, **rules}[m][qi, removed]))
                    d1 = np.linalg.norm(out[r, qi] - base[qi])
                    vals.append({"dist1": 100 * d1, "dist2": -np.log(max(out[r, qi, labels[qi]], 1e-12)),
                                 "dist3": 1 / (1 + d1)}.get(m, 100 * d1))
                if m in rules:
                    if "objectives" in g:  # DDM rows: both rules in the report's columns
                        assert by_rule[name, m] == pytest.approx(np.mean(vals), rel=1e-5), (name, m)
                    else:
                        assert np.isnan(by_rule[name, m]), name
                    continue
                assert g.attrs[m] == pytest.approx(np.mean(vals), rel=1e-5, abs=1e-7), (name, m)
            pred = (~masks).astype(np.float64) @ scores.T.astype(np.float64)  # removed-sum, [n_masks, Q]
            actual = _ce(mask_out, labels)
            rho = spearman(torch.from_numpy(pred), torch.from_numpy(actual)).numpy()
            assert g.attrs["lds"] == pytest.approx(np.nanmean(rho), rel=1e-6, abs=1e-9), name
        ref = f["reference"].attrs
        d1 = np.linalg.norm(out - base[None], axis=-1)
        assert ref["oracle/dist1"] == pytest.approx(100 * d1.max(0).mean(), rel=1e-5)
        nz = np.linalg.norm(f["gt/noise"][()] - base[None], axis=-1)
        assert ref["noise floor (seed reruns)/dist1"] == pytest.approx(100 * nz.mean(), rel=1e-5)
        # oracle bounds every method's located Dist1
        for name in f["methods"]:
            assert f["methods"][name].attrs["dist1"] <= ref["oracle/dist1"] + 1e-6
        t4 = dict(f["table4"].attrs)
    assert 0 <= t4["theta_0"] <= 1 and 0 <= t4["ddm"] <= 1 and "ddm-match" in t4
    assert set(t4) == {"theta_0", "theta_tau", "ddm", "ddm-match", "ddm-match/from theta_0", "ddm-soft"}
    # the paper's protocol for DDM-match: theta_0 trained (descent, the attribute stage's T, rate and weights) on
    # all of its synsets, recomputed here with finetune_many from theta_0
    from ddm_hpc.synsets import read_synsets
    from ddm_hpc.unlearn import Unlearner, finetune_many, removal_spec
    match = evaluated / "variants" / "ddm-match"
    cfg = Config.from_dict({**json.loads((match / "config.json").read_text()),
                            "runtime": {"out": str(match), "progress": False}})
    ctx = RunContext(cfg)
    level, u = read_synsets(ctx.run_dir, "cluster"), Unlearner.of_run(ctx)
    reader = ctx.trajectory()
    ipc = level.images.shape[1]
    spec = removal_spec(torch.zeros(1, len(level.size)), ipc, u.weights(level))
    probs = finetune_many(u.model, reader.params(0), level.images.reshape(-1, *level.images.shape[2:]),
                          level.flat_targets(), spec, u.steps, u.lr, 1.0, ctx.bundle.x_test, 1, torch.device("cpu"),
                          show_progress=False)
    assert level.unlearn_direction == -1.0 and u.steps > 1
    assert t4["ddm-match/from theta_0"] == pytest.approx(float((probs[0].argmax(1) == ctx.bundle.y_test).float().mean()))
    text = (evaluated / "report.md").read_text()
    assert "DDM-match: theta_0 trained on all synsets (the paper's Table 4)" in text


def test_report_tables_and_plots(evaluated):
    from matplotlib.image import imread

    text = (evaluated / "report.md").read_text()
    for row in ("Random select", "Predict-based", "Clustering-based", "DDM w/o cluster", "DDM-match",
                "DDM-full", "DDM-full + learned labels", "TracInCP", "TRAK", "*oracle*", "*noise floor (seed reruns)*", "theta_0"):
        assert row in text, row
    with h5py.File(evaluated / "evaluation.h5") as f:
        d1 = f["methods/ddm"].attrs["dist1"]
    assert f"{d1:.2f} ±" in text  # the table prints the stored number
    assert "| Dist1 by Dist1 scores ↑ | Dist1 by Dist2 scores ↑ |" in text
    for png in ("scatter_ddm.png", "scatter_trak.png", "heatmap.png"):
        path = evaluated / png
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        img = imread(path)
        assert img.shape[0] >= 200 and img.shape[1] >= 300 and img[..., :3].std() > 0.05, png  # not blank
        assert f"]({png})" in text


def test_report_rules_of_a_file_predating_dist1_by(evaluated, tmp_path):
    """Before ``dist1_by`` was stored, a fixed-target row kept its Dist2 scores as objectives/dist1: the report then
    leaves the Dist1-scores column empty instead of showing the Dist2 rule under its name."""
    from ddm_hpc.report import read_evaluation

    old = tmp_path / "evaluation.h5"
    shutil.copy(evaluated / "evaluation.h5", old)
    with h5py.File(old, "r+") as f:
        g = f["methods/ddm"]
        del g.attrs["dist1_by"], g["objectives/dist1"]
        g["objectives/dist1"] = g["objectives/dist2"][()]  # as when the default located Dist1 by its Dist2 scores
        g.attrs["note"] = f"{g.attrs['note']}; Dist1 located by the dist2 scores"
        del f["methods/ddm-match"].attrs["dist1_by"]
    new, d = read_evaluation(evaluated / "evaluation.h5"), read_evaluation(old)
    assert np.isnan(d["methods"]["ddm"]["attrs"]["dist1_by_dist1"])
    assert d["methods"]["ddm"]["attrs"]["dist1_by_dist2"] == new["methods"]["ddm"]["attrs"]["dist1_by_dist2"]
    assert d["methods"]["ddm-match"]["attrs"]["dist1_by_dist1"] == new["methods"]["ddm-match"]["attrs"]["dist1_by_dist1"]


def _cfg(run_dir, **evaluate):
    d = json.loads((run_dir / "config.json").read_text())
    d["evaluate"].update(evaluate)
    return Config.from_dict({**d, "runtime": {"out": str(run_dir), "progress": False}})


def test_rerun_reuses_the_retrainings(evaluated, mnist_root):
    gt = groundtruth_path(evaluated)
    mtime = gt.stat().st_mtime_ns
    assert not (evaluated / "shards").exists()  # merged shards are removed
    with h5py.File(evaluated / "evaluation.h5") as f:
        before = {n: f["methods"][n].attrs["dist1"] for n in f["methods"]}
    # other methods, same retrainings: nothing is retrained
    assert main(["evaluate", *ARGS, "--methods", "random,ddm", "--data-root", str(mnist_root), "--out",
                 str(evaluated), "--overwrite"]) == 0
    assert gt.stat().st_mtime_ns == mtime
    with h5py.File(evaluated / "evaluation.h5") as f:
        assert sorted(f["methods"]) == ["ddm", "random"]
        assert {n: f["methods"][n].attrs["dist1"] for n in f["methods"]} == {n: before[n] for n in ("ddm", "random")}
    # restore the full evaluation for the other tests (variants and retrainings are reused)
    assert main(["evaluate", *ARGS, "--data-root", str(mnist_root), "--out", str(evaluated), "--overwrite"]) == 0
    assert gt.stat().st_mtime_ns == mtime


def test_groundtruth_layout_and_key(evaluated):
    cfg = _cfg(evaluated)
    qpos = RunContext(cfg).query_pos
    r = load_retrained(cfg, 30, qpos)
    jobs = retrain_jobs(cfg, 30)
    with h5py.File(groundtruth_path(evaluated)) as f:
        probs = f["probs"][()]
        assert probs.shape == (len(jobs), 3, 10) and (f["seconds"][()] > 0).all()
    with h5py.File(evaluated / "evaluation.h5") as f:
        np.testing.assert_array_equal(f["gt/outputs"][()], r.gt.outputs.numpy())
        np.testing.assert_array_equal(f["gt/masks"][()], r.masks.numpy())
    loo = [i for i, j in enumerate(jobs) if j.kind == "loo"]
    np.testing.assert_array_equal(probs[loo], r.gt.outputs.numpy())  # one seed: no averaging
    # the key follows the retraining options and the queries, not the methods
    assert retrain_key(_cfg(evaluated, methods="random"), qpos) == retrain_key(cfg, qpos)
    assert retrain_key(_cfg(evaluated, n_masks=7), qpos) != retrain_key(cfg, qpos)
    assert retrain_key(cfg, qpos[:2]) != retrain_key(cfg, qpos)
    with pytest.raises(StageError, match="groundtruth.h5"):
        load_retrained(_cfg(evaluated, noise_seeds=3), 30, qpos)


def test_retrain_jobs_layout(tmp_path):
    cfg = Config.from_dict({"evaluate": {"n_removed": 4, "gt_seeds": 2, "noise_seeds": 3, "n_masks": 5},
                            "runtime": {"out": str(tmp_path)}})
    jobs = retrain_jobs(cfg, 10)
    kinds = [j.kind for j in jobs]
    assert kinds[0] == "base" and jobs[0].removed == () and jobs[0].seed_offset == 0
    assert kinds.count("base") == 1 and kinds.count("loo") == 8 and kinds.count("noise") == 3
    assert kinds.count("mask") == 10
    loo = [j for j in jobs if j.kind == "loo"]
    assert len({j.removed for j in loo}) == 4 and {j.seed_offset for j in loo} == {0, 1}
    assert [j.seed_offset for j in jobs if j.kind == "noise"] == [1, 2, 3]
    assert all(len(j.removed) == 5 for j in jobs if j.kind == "mask")  # alpha 0.5 keeps 5 of 10
    assert retrain_jobs(cfg, 10) == jobs  # seeded


def test_spread_to_clusters_and_cluster_means():
    g = torch.Generator().manual_seed(0)
    src = torch.randint(0, 4, (40,), generator=g)
    dst = torch.randint(0, 6, (40,), generator=g)
    scores = torch.randn(3, 4, dtype=torch.float64, generator=g)
    got = spread_to_clusters(scores, src, dst, 6)
    want = torch.zeros(3, 6, dtype=torch.float64)
    for i in range(40):
        want[:, dst[i]] += scores[:, src[i]] / (src == src[i]).sum()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got.sum(1), scores[:, torch.unique(src)].sum(1))  # mass is conserved
    vals = torch.randn(40, 2, dtype=torch.float64, generator=g)
    means = cluster_means(vals, dst, 7)
    for c in range(7):
        rows = vals[dst == c]
        torch.testing.assert_close(means[c], rows.mean(0) if len(rows) else torch.zeros(2, dtype=torch.float64))


def test_method_result_locates_dist3_at_the_least_responsible():
    s = torch.tensor([[0.1, 0.9, 0.5]])
    r = MethodResult(s, 0.0)
    assert int(r.for_metric("dist1").argmax()) == 1 and int(r.for_metric("dist3").argmax()) == 0
    r2 = MethodResult(s, 0.0, per_objective={"dist3": torch.tensor([[0.0, 0.0, 1.0]])})
    assert int(r2.for_metric("dist3").argmax()) == 2
    d1, d2 = torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0.0, 0.0, 1.0]])
    r3 = MethodResult(s, 0.0, per_objective={"dist1": d1, "dist2": d2}, dist1_by="dist2")
    assert int(r3.for_metric("dist1").argmax()) == 2 and r3.per_objective["dist1"] is d1  # its own scores kept
    assert int(MethodResult(s, 0.0, per_objective={"dist1": d1}, dist1_by="dist2").for_metric("dist1").argmax()) == 0


def test_bad_evaluate_options_fail_in_one_line(capsys, tmp_path):
    assert main(["evaluate", "--methods", "ddm,bogus", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ddm-hpc: error: --methods") and "bogus" in err and len(err.splitlines()) == 1
    with pytest.raises(ConfigError, match="--alpha"):
        EvaluateConfig(alpha=1.0)
    with pytest.raises(ConfigError, match="--gt-seeds"):
        EvaluateConfig(gt_seeds=0)
    assert not any(tmp_path.iterdir())  # nothing written


def test_mean_and_std_over_seeds(evaluated, mnist_root, tmp_path):
    from ddm_hpc.report import main as report_main

    other = tmp_path / "seed1"
    assert main(["evaluate", *ARGS, "--methods", "random,ddm", "--seed", "1", "--data-root", str(mnist_root),
                 "--out", str(other)]) == 0
    out = tmp_path / "seeds.md"
    report_main(["--seeds", str(out), str(evaluated / "evaluation.h5"), str(other / "evaluation.h5")])
    text = out.read_text()
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert "Random select" in rows and "DDM (this run's synsets)" in rows and "TRAK (peer)" not in rows  # common
    vals = []
    for run in (evaluated, other):
        with h5py.File(run / "evaluation.h5") as f:
            vals.append(f["methods/ddm"].attrs["dist1"])
    assert f"{np.mean(vals):.2f} ± {np.std(vals, ddof=1):.2f}" in rows["DDM (this run's synsets)"]
    with pytest.raises(SystemExit):
        report_main(["--seeds", str(out), str(tmp_path / "missing.h5")])


def test_variant_on_another_variants_synsets_reproduces_it(evaluated):
    """What benchmarks/finetune_sweep.py relies on: a variant that takes ``ddm-soft``'s synsets (linked, not
    distilled again) and reruns only attribute with the same options reproduces ``ddm-soft``'s scores;
    other fine-tune steps change them."""
    from ddm_hpc.methods import read_ddm_scores
    from ddm_hpc.pipeline import materialise
    from ddm_hpc.storage import artifact_path, read_attrs
    from ddm_hpc.config import PAIRS_DISTILL
    from ddm_hpc.variants import PAIRS_ATTRIBUTE, learned_labels, synset_variant

    cfg = Config.from_dict({**json.loads((evaluated / "config.json").read_text()),
                            "runtime": {"out": str(evaluated), "progress": False}})
    ctx = RunContext(cfg)
    labels, k = ctx.query_y, ctx.k
    with h5py.File(evaluated / "clusters.h5") as f, h5py.File(evaluated / "attribution.h5") as a:
        assert torch.equal(torch.from_numpy(a["query_label"][()]), labels) and k == len(f["clusters/class"])
    soft_variant = learned_labels()
    soft = soft_variant.directory(cfg)
    assert soft == evaluated / "variants" / "ddm-soft"
    ref = read_ddm_scores(soft, "").scores
    for steps, same in ((0, True), (1, False)):
        variant = synset_variant(f"t-steps{steps}", {**PAIRS_DISTILL, "syn_labels": "learn"}, ("attribute",),
                                 attribute={**PAIRS_ATTRIBUTE, "finetune_steps": steps},
                                 sources={"distill": soft_variant})
        (out,) = materialise(cfg, [variant])
        assert read_attrs(artifact_path(out, "distill"))["uid"] == read_attrs(artifact_path(soft, "distill"))["uid"]
        assert torch.equal(read_ddm_scores(out, "").scores, ref) == same, steps


# ----------------------------------------------------------------------------- removal protocols, kept fractions
PROTO_ARGS = ["--preset", "smoke", "--n-masks", "4", "--noise-seeds", "1", "--methods",
              "random,clustering,ddm-hier,replay",
              "--gt-removal", "drop,zero-weight", "--lds-alphas", "0.9", "--no-progress", "--no-plots"]


@pytest.fixture(scope="module")
def protocols(tmp_path_factory, mnist_root):
    out = tmp_path_factory.mktemp("protocols")
    assert main(["evaluate", *PROTO_ARGS, "--data-root", str(mnist_root), "--out", str(out)]) == 0
    return out


def test_protocol_jobs_extend_the_default_layout(tmp_path):
    """Runs made before --gt-removal/--lds-alphas keep their shard layout and key: the headline protocol's jobs
    come first, in the old order; the other protocol shares base and noise and removes the same clusters."""
    base = {"evaluate": {"n_masks": 3, "noise_seeds": 1}, "runtime": {"out": str(tmp_path)}}
    old = retrain_jobs(Config.from_dict(base), 6)
    both = Config.from_dict({**base, "evaluate": {**base["evaluate"], "gt_removal": "drop,zero-weight",
                                                  "lds_alphas": "0.9"}})
    jobs = retrain_jobs(both, 6)
    assert jobs[:len(old)] == old
    zero = [j for j in jobs if j.removal == "zero-weight"]
    assert [j.kind for j in zero].count("loo") == 6 and [j.kind for j in zero].count("mask") == 6
    drop_rm = sorted(j.removed for j in jobs if j.removal == "drop" and j.kind != "base" and j.kind != "noise")
    assert drop_rm == sorted(j.removed for j in zero)  # the same removals under both protocols
    assert all(len(j.removed) == 1 for j in jobs if j.kind == "mask" and j.alpha == 1)  # alpha 0.9 keeps 5 of 6
    qpos = torch.arange(3)
    assert retrain_key(Config.from_dict({**base, "evaluate": {**base["evaluate"], "gt_removal": "drop",
                                                              "lds_alphas": ""}}), qpos) == \
        retrain_key(Config.from_dict(base), qpos)
    assert retrain_key(both, qpos) != retrain_key(Config.from_dict(base), qpos)
    for bad in ({"gt_removal": "drop,drop"}, {"gt_removal": "reshuffle"}, {"lds_alphas": "0.5"},
                {"lds_alphas": "1.5"}, {"lds_alphas": "x"}):
        with pytest.raises(ConfigError, match="--gt-removal|--lds-alphas"):
            EvaluateConfig(**bad)


def test_protocol_metrics_recompute_from_the_file(protocols):
    """Every protocol's Dist1 and every (protocol, alpha) LDS follow from the stored datasets."""
    with h5py.File(protocols / "evaluation.h5") as f:
        assert f["gt"].attrs["removals"] == "drop,zero-weight"
        base, labels, removed = f["gt/base"][()], f["query_label"][()], f["gt/removed"][()]
        np.testing.assert_array_equal(f["gt/protocols/drop/outputs"][()], f["gt/outputs"][()])  # headline = drop
        drop, zero = f["gt/protocols/drop/outputs"][()], f["gt/protocols/zero-weight/outputs"][()]
        assert not np.array_equal(drop, zero) and np.abs(drop - zero).max() < 0.5
        for name in f["methods"]:
            g = f["methods"][name]
            d1_scores = g["objectives/dist1"][()] if "objectives" in g else g["scores"][()]
            for removal in ("drop", "zero-weight"):
                out = f[f"gt/protocols/{removal}/outputs"][()]
                pick = np.argmax(d1_scores[:, removed], 1)
                want = np.mean([100 * np.linalg.norm(out[r, q] - base[q]) for q, r in enumerate(pick)])
                assert g.attrs[f"{removal}/dist1"] == pytest.approx(want, rel=1e-5), (name, removal)
                for a in ("alpha_0", "alpha_1"):
                    sub = f[f"gt/protocols/{removal}/{a}"]
                    masks, mask_out = sub["masks"][()], sub["outputs"][()]
                    pred = (~masks).astype(np.float64) @ g["scores"][()].T.astype(np.float64)
                    rho = spearman(torch.from_numpy(pred), torch.from_numpy(_ce(mask_out, labels))).numpy()
                    key = f"{removal}/lds@{sub.attrs['alpha']:g}"
                    assert g.attrs[key] == pytest.approx(np.nanmean(rho), rel=1e-6, abs=1e-9), (name, key)
        ref = f["reference"].attrs
        apart = 100 * np.linalg.norm(drop - zero, axis=-1).mean(0).mean()
        assert ref["protocols:apart/dist1"] == pytest.approx(apart, rel=1e-5)
    text = (protocols / "report.md").read_text()
    assert "## Ground-truth protocols and drop fractions" in text and "LDS α=0.9 zero-weight" in text
    assert "Replay (exact, anchor)" in text


def test_zero_weight_base_is_theta_tau_and_replay_is_near_the_oracle(protocols):
    """The zero-weight full-data rerun is theta_tau bit for bit (all-ones weights = the plain mean), and the
    replay anchor locates clusters at least as well as the clustering baseline on the smoke run."""
    with h5py.File(protocols / "evaluation.h5") as f:
        assert f["gt"].attrs["base_drift"] < 1e-6
        rep, clu = f["methods/replay"].attrs, f["methods/clustering"].attrs
        assert rep["zero-weight/lds@0.5"] > 0.5 and rep["zero-weight/dist1"] >= clu["zero-weight/dist1"] - 1e-6
        assert "replayed theta_tau matches train.h5 to 0" in rep["note"]


def test_seed_table_has_the_protocol_columns_and_marks_ties(protocols):
    from ddm_hpc.report import seed_table

    path = protocols / "evaluation.h5"
    lines = seed_table([path, path])  # the same run twice: std 0, so only equal means tie
    text = "\n".join(lines)
    assert "By ground-truth protocol and LDS kept fraction α:" in text and "LDS α=0.9 zero-weight" in text
    with h5py.File(path) as f:
        best = max(f["methods"], key=lambda n: f["methods"][n].attrs["zero-weight/dist1"])
        worst = min(f["methods"], key=lambda n: f["methods"][n].attrs["zero-weight/dist1"])
        b, w = (f["methods"][n].attrs["zero-weight/dist1"] for n in (best, worst))
    assert f"**{b:.2f} ± 0.00**" in text and f"| {w:.2f} ± 0.00 |" in text or b == w
    assert "the two protocols' outputs apart" in text


def test_hierarchical_row_locates_the_searchs_pick(protocols):
    """ddm-hier (Eq. 11) scores the cluster the class-first search picks: Dist1 is exact retraining without
    ``hierarchy/cluster``; its LDS reads the class scores spread over their clusters."""
    with h5py.File(protocols / "attribution.h5") as a, h5py.File(protocols / "evaluation.h5") as f:
        pick = a["hierarchy/cluster"][()]
        cls = a["hierarchy/class_scores"][()]
        with h5py.File(protocols / "clusters.h5") as c:
            cluster_class = c["clusters/class"][()]
        base, out, removed = f["gt/base"][()], f["gt/outputs"][()], f["gt/removed"][()]
        row = {int(r): i for i, r in enumerate(removed)}
        want = np.mean([100 * np.linalg.norm(out[row[int(k)], q] - base[q]) for q, k in enumerate(pick)])
        g = f["methods/ddm-hier"]
        assert g.attrs["dist1"] == pytest.approx(want, rel=1e-5)
        sizes = np.bincount(cluster_class)
        np.testing.assert_allclose(g["scores"][()], cls[:, cluster_class] / sizes[cluster_class], rtol=1e-6)


def _displacement_variant(evaluated, monkeypatch, method: str = "ddm-disp"):
    """The evaluated run's ``ddm-disp`` (or ``ddm-inf``, ``ddm-fw``, ``ddm-fws``) variant, small (3 matching steps,
    2 images per cluster): (config, directory)."""
    from ddm_hpc import variants
    from ddm_hpc.pipeline import materialise
    settings, make = variants.ONE_STEP_VARIANTS[method]
    monkeypatch.setitem(settings, "distill_steps", 3)
    monkeypatch.setitem(settings, "ipc", 2)
    cfg = Config.from_dict({**json.loads((evaluated / "config.json").read_text()),
                            "runtime": {"out": str(evaluated), "progress": False}})
    (out,) = materialise(cfg, [make()])
    return cfg, out


@pytest.mark.parametrize("method, target", [("ddm-disp", "displacement"), ("ddm-inf", "influence"),
                                            ("ddm-fw", "influence"), ("ddm-fws", "influence")])
def test_displacement_row_is_one_unweighted_step_on_its_synsets(evaluated, monkeypatch, method, target):
    """``ddm-disp``, ``ddm-inf``, ``ddm-fw`` and ``ddm-fws``: the variant distils --target displacement (influence)
    synsets with per-tensor rates a_k (ddm-fw, ddm-fws: Fisher-weighted tensors) and fine-tunes one unweighted
    step of rate lr per cluster; its Dist2 scores are the CE change at theta_tau - lr c a_k * grad L(theta_tau; S_k)
    (recomputed here from the synsets, their stored rates and the --contraction factors c, which only ddm-disp
    fits); they also locate ddm-disp's Dist1, not the influence rows'."""
    from torch.func import functional_call

    from ddm_hpc.methods import score_methods
    from ddm_hpc.trajectory import TrajectoryReader

    cfg, out = _displacement_variant(evaluated, monkeypatch, method)
    stored = json.loads((out / "config.json").read_text())["distill"]
    assert stored["tensor_weights"] == {"ddm-fw": "fisher", "ddm-fws": "fisher-sqrt"}.get(method, "none")
    ctx = RunContext(cfg)
    res = score_methods(ctx, [method])[method]
    assert torch.equal(res.for_metric("dist1"), res.for_metric("dist2")) == (method == "ddm-disp")
    assert res.dist1_by == ("dist2" if method == "ddm-disp" else "dist1")
    with h5py.File(out / "synsets.h5") as f:
        assert f.attrs["target"] == target
        images, targets = torch.from_numpy(f["cluster/images"][()]), torch.from_numpy(f["cluster/targets"][()])
        rates, names = torch.from_numpy(f["cluster/layer_rates"][()]), json.loads(f.attrs["layer_rate_names"])
        assert ("contraction" in f) == (method == "ddm-disp")
        if "contraction" in f:
            rates = rates * torch.from_numpy(f["contraction"][()])[None]  # --contraction (ddm-disp fits one)
    reader = TrajectoryReader.of_run(evaluated)
    theta = {k: v.detach() for k, v in reader.params(reader.tau).items()}
    model = ctx.build_model().eval()
    xq, yq = ctx.query_x, ctx.query_y
    with torch.no_grad():
        base = F.cross_entropy(functional_call(model, theta, (xq,)), yq, reduction="none")
    want = []
    for k in range(ctx.k):
        p = {n: v.clone().requires_grad_(True) for n, v in theta.items()}
        loss = F.cross_entropy(functional_call(model, p, (images[k],)), targets[k])
        g = torch.autograd.grad(loss, list(p.values()))
        stepped = {n: v.detach() - cfg.train.lr * rates[k, names.index(n)] * gi for (n, v), gi in zip(p.items(), g)}
        with torch.no_grad():
            want.append(F.cross_entropy(functional_call(model, stepped, (xq,)), yq, reduction="none") - base)
    torch.testing.assert_close(res.scores, torch.stack(want, 1), rtol=1e-3, atol=1e-5)
    assert not torch.allclose(rates, torch.ones_like(rates), atol=0.05)  # the rates matter to this check


def test_contraction_factors_reproduce_from_an_independent_retraining(evaluated, monkeypatch):
    """``ddm-disp``'s ``--contraction``: retraining without the stored subset's clusters (from theta_0, the run's
    order) and the synsets' rated steps (one autograd step per cluster) give, per tensor, the stored factor
    sum <dtheta, P> / |P|^2 (clipped to [0, 1]); and the factors are not all 1, so they matter."""
    from torch.func import functional_call

    from ddm_hpc import variants
    from ddm_hpc.retrain import retrain_without
    from ddm_hpc.trajectory import TrajectoryReader

    cfg, out = _displacement_variant(evaluated, monkeypatch)
    ctx = RunContext(cfg)
    with h5py.File(out / "synsets.h5") as f:
        images, targets = torch.from_numpy(f["cluster/images"][()]), torch.from_numpy(f["cluster/targets"][()])
        rates, names = torch.from_numpy(f["cluster/layer_rates"][()]), json.loads(f.attrs["layer_rate_names"])
        factors, kept = torch.from_numpy(f["contraction"][()]), torch.from_numpy(f["contraction_kept"][()])
    assert kept.shape == (variants.DISPLACEMENT["contraction"], ctx.k)
    reader = TrajectoryReader.of_run(evaluated)
    theta = {k: v.detach() for k, v in reader.params(reader.tau).items()}
    flat_tau = torch.cat([theta[n].reshape(-1) for n in names]).double()
    moves = torch.stack([retrain_without(cfg, ctx.bundle, ctx.assignment, torch.nonzero(~kp)[:, 0]).double()
                         - flat_tau for kp in kept])
    model = ctx.build_model().eval()
    steps = []
    for k in range(ctx.k):
        p = {n: v.clone().requires_grad_(True) for n, v in theta.items()}
        g = torch.autograd.grad(F.cross_entropy(functional_call(model, p, (images[k],)), targets[k]), list(p.values()))
        steps.append({n: -cfg.train.lr * rates[k, names.index(n)] * gi for n, gi in zip(p, g)})
    p0 = 0
    for i, n in enumerate(names):
        size = theta[n].numel()
        pred = torch.stack([sum(steps[k][n] for k in torch.nonzero(~kp)[:, 0].tolist()).reshape(-1) for kp in kept])
        real = moves[:, p0:p0 + size]
        p0 += size
        den = float((pred.double() ** 2).sum())
        want = min(1.0, max(0.0, float((pred.double() * real).sum()) / den)) if den > 0 else 1.0
        assert float(factors[i]) == pytest.approx(want, rel=1e-3, abs=1e-6), n
    assert not torch.allclose(factors, torch.ones_like(factors), atol=0.05)
