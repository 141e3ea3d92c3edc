"""``report.md`` and its PNG plots, computed from ``evaluation.h5`` alone.

Everything printed is read from the file (plus the run's train.h5/clusters.h5 attrs for context),
so the report can be regenerated, and every number recomputed, without retraining anything:
``python -m ddm_hpc.report RUN/evaluation.h5``. Runs with other ``--seed``s tabulate as mean ± std
over seeds: ``python -m ddm_hpc.report --seeds seeds.md RUN_A/evaluation.h5 RUN_B/evaluation.h5``.

Tables:
  * Table 1/2 shape: methods x {Dist1 (x100), Dist1 located by the Dist1 scores and by the Dist2 scores (DDM
    rows: both locating rules), Dist2, Dist3, LDS, online s, offline s}, each mean +- s.e.m. over queries,
    followed by the oracle, the mean over all clusters (what a random pick scores in expectation) and the
    noise floor (full-data reruns with other seeds).
  * Table 4 shape: test accuracy of theta_0, theta_tau and theta_tau fine-tuned on all synsets.
Plots (``--plots``): per-query predicted vs exact effect (``scatter_<method>.png``) and the class x
class attribution heat map of the paper's Fig. 3, DDM beside exact retraining (``heatmap.png``).

Rows, labels and plots follow the method registry (``ddm_hpc.methods``): each method's label and plot
flags are also stored in ``evaluation.h5``, so a report of a method registered by a plugin is rebuilt
without it.

Room: imports ``methods`` (the registry) and ``metrics``; the evaluate stage and the diagnostics call it.
matplotlib is imported where a figure is drawn (deferred: heavy, and ``--no-plots`` never needs it).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path

import h5py
import numpy as np
import torch

from ddm_hpc.methods import REGISTRY
from ddm_hpc.methods.ddm import LOCATED_BY
from ddm_hpc.metrics import METRICS, spearman

log = logging.getLogger(__name__)


def method_order(names) -> list[str]:
    """``names`` in the registry's order (registered methods), then any others alphabetically."""
    names = list(names)
    return [n for n in REGISTRY if n in names] + sorted(n for n in names if n not in REGISTRY)


def _attr(name: str, attrs, key: str, default: object) -> object:
    """A method's ``key`` as stored in evaluation.h5 (``attrs``), else its registry entry's, else ``default``."""
    if attrs is not None and key in attrs:
        return attrs[key]
    m = REGISTRY.get(name)
    return getattr(m, key, default) if m is not None else default


def method_label(name: str, attrs=None) -> str:
    """The report row of method ``name``: its stored label, its registry label, or its name."""
    return str(_attr(name, attrs, "label", name))


def _fmt(mean: float, sem: float, digits: int, missing: str = "n/a") -> str:
    if not math.isfinite(mean):
        return missing
    return f"{mean:.{digits}f} ± {sem:.{digits}f}"


def _secs(s: float) -> str:
    return f"{s:.1f}" if s >= 0.1 else f"{s:.3f}"


def ce_change(outputs: np.ndarray, base: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Exact change of the query's cross-entropy when each cluster is removed: [n_removed, Q]."""
    q = np.arange(len(labels))
    ce = -np.log(np.clip(outputs[:, q, labels], 1e-12, None))
    return ce - (-np.log(np.clip(base[q, labels], 1e-12, None)))[None]


def _rho(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman correlation of two 1-D arrays (``metrics.spearman``, the LDS's own)."""
    return float(spearman(torch.from_numpy(a)[:, None], torch.from_numpy(b)[:, None])[0])


def read_evaluation(path: str | Path) -> dict:
    """Everything the report needs from ``evaluation.h5``."""
    with h5py.File(path, "r", locking=False) as f:
        if not f.attrs.get("complete"):
            raise OSError(f"{path} is incomplete: rerun `ddm-hpc evaluate`")
        d = {"base": f["gt/base"][()], "outputs": f["gt/outputs"][()], "removed": f["gt/removed"][()],
             "labels": f["query_label"][()], "query_index": f["query_index"][()],
             "gt_attrs": dict(f["gt"].attrs), "attrs": dict(f.attrs), "table4": dict(f["table4"].attrs),
             "reference": dict(f["reference"].attrs), "n_noise": len(f["gt/noise"]), "n_masks": len(f["gt/masks"])}
        d["methods"] = {}
        for name in f["methods"]:
            g = f["methods"][name]
            d["methods"][name] = {"scores": g["scores"][()], "seconds": float(g["seconds"][()]),
                                  "offline": float(g["offline_seconds"][()]), "attrs": dict(g.attrs),
                                  "objectives": {k: g["objectives"][k][()] for k in g.get("objectives", {})}}
    for name, m in d["methods"].items():  # derived from the stored scores, so older files get it too
        for obj in ("dist1", "dist2"):
            m["attrs"][f"dist1_by_{obj}"], m["attrs"][f"dist1_by_{obj}_sem"] = dist1_by_rule(d, name, obj)
    return d


def _context_lines(run_dir: Path, d: dict) -> list[str]:
    lines = []
    cfg = json.loads(str(d["attrs"].get("config", "{}")))
    data, model, train = cfg.get("data", {}), cfg.get("model", {}), cfg.get("train", {})
    ga = d["gt_attrs"]
    lines.append(f"- Run: `{run_dir}`; {data.get('dataset')} ({data.get('n_train')} train / {data.get('n_test')} test "
                 f"images), {model.get('model')} width {model.get('width')}, {train.get('epochs')} epochs, seed "
                 f"{cfg.get('seed')}; K = {len(d['methods'][next(iter(d['methods']))]['scores'][0])} clusters, "
                 f"{len(d['labels'])} queries.")
    removal = str(cfg.get("evaluate", {}).get("gt_removal", "drop")).split(",")[0]
    more = ""
    if "removals" in ga:
        alphas = ", ".join(f"{a:g}" for a in np.atleast_1d(ga["alphas"]))
        more = (f"; the same again for each kept fraction ({alphas}) and each protocol ({ga['removals']}), "
                "the headline tables being the first of each")
    how = ("full run's minibatches, the removed clusters' rows weighing 0" if removal == "zero-weight" else
           "full run's data order minus the removed clusters")
    lines.append(f"- Ground truth: {int(ga.get('n_retrainings', 0))} exact retrainings from the same theta_0 with the "
                 f"{how} ({len(d['removed'])} leave-one-cluster-out x "
                 f"{int(d['attrs'].get('n_gt_seeds', 1))} seed(s), {d['n_noise']} noise reruns, {d['n_masks']} LDS "
                 f"subsets keeping {cfg.get('evaluate', {}).get('alpha', 0.5):g} of the clusters{more}), {ga.get('seconds_per_retrain', float('nan')):.1f} s each, "
                 f"{ga.get('seconds', float('nan')) / 60:.1f} min in all. The full-data retraining reproduces "
                 f"theta_tau to {ga.get('base_drift', float('nan')):.1g} in softmax.")
    return lines


def dist1_by_rule(d: dict, name: str, objective: str) -> tuple[float, float]:
    """Dist1 (x100, mean ± s.e.m.) of the cluster a method's ``objective`` (dist1 or dist2) scores locate: both
    locating rules for methods with one score matrix per objective (DDM rows), whichever rule their Dist1 column
    uses; NaN for the others (one matrix: their Dist1), and for Dist1 scores a file predating ``dist1_by`` did not
    keep (it stored the Dist2 scores in their place)."""
    m = d["methods"][name]
    if objective not in m["objectives"]:
        return math.nan, math.nan
    if objective == "dist1" and "dist1_by" not in m["attrs"] and LOCATED_BY.format("dist2") in str(
            m["attrs"].get("note", "")):
        return math.nan, math.nan
    scores = m["objectives"][objective]
    pick = np.argmax(scores[:, d["removed"]], 1)
    q = np.arange(len(pick))
    d1 = 100.0 * np.linalg.norm(d["outputs"][pick, q] - d["base"], axis=-1)
    return float(d1.mean()), float(d1.std(ddof=1) / math.sqrt(len(d1))) if len(d1) > 1 else 0.0


def table1(d: dict) -> list[str]:
    lines = ["| Method | Dist1 (x100) ↑ | Dist1 by Dist1 scores ↑ | Dist1 by Dist2 scores ↑ | Dist2 ↑ | Dist3 ↑ | LDS ↑ "
             "| online s | offline s |", "|---|---|---|---|---|---|---|---|---|"]
    for name in method_order(d["methods"]):
        a, m = d["methods"][name]["attrs"], d["methods"][name]
        cells = [_fmt(a["dist1"], a["dist1_sem"], 2), _fmt(a["dist1_by_dist1"], a["dist1_by_dist1_sem"], 2, "-"),
                 _fmt(a["dist1_by_dist2"], a["dist1_by_dist2_sem"], 2, "-"), _fmt(a["dist2"], a["dist2_sem"], 3),
                 _fmt(a["dist3"], a["dist3_sem"], 4), _fmt(a["lds"], a["lds_sem"], 3), _secs(m["seconds"]),
                 _secs(m["offline"]) if m["offline"] else "-"]
        lines.append(f"| {method_label(name, a)} | " + " | ".join(cells) + " |")
    ref = d["reference"]
    for row in ("oracle", "mean over clusters", "noise floor (seed reruns)"):
        if f"{row}/dist1" not in ref:
            continue
        cells = [_fmt(ref[f"{row}/{m}"], ref[f"{row}/{m}_sem"], dg) for m, dg in zip(METRICS, (2, 3, 4))]
        lines.append(f"| *{row}* | {cells[0]} | - | - | " + " | ".join(cells[1:]) + " | - | - | - |")
    return lines


def findings(d: dict) -> list[str]:
    """Plain statements of where DDM stands; generated, so they cannot drift from the numbers."""
    meth = d["methods"]
    if "ddm" not in meth:
        return []
    out = []
    for m in (*METRICS, "lds"):
        vals = {n: meth[n]["attrs"][m] for n in meth if math.isfinite(meth[n]["attrs"][m])}
        if "ddm" not in vals:
            continue
        ranked = sorted(vals, key=lambda n: -vals[n])
        better = [method_label(n, meth[n]["attrs"]) for n in ranked[:ranked.index("ddm")]]
        name = "LDS" if m == "lds" else m.capitalize()
        if better:
            out.append(f"- {name}: DDM (this run) ranks {ranked.index('ddm') + 1} of {len(ranked)}; better: "
                       f"{', '.join(better)}.")
        else:
            out.append(f"- {name}: DDM (this run) ranks first of {len(ranked)}.")
    ref = d["reference"]
    if "noise floor (seed reruns)/dist1" in ref:
        out.append(f"- Signal versus noise: removing one cluster changes a query's softmax by "
                   f"{ref['mean over clusters/dist1']:.2f} (x100, mean over clusters); a full-data rerun with another "
                   f"seed changes it by {ref['noise floor (seed reruns)/dist1']:.2f}.")
    return out


def protocol_table(d: dict) -> list[str]:
    """Every method under each removal protocol (Dist1) and each (protocol, kept fraction) (LDS), with each
    protocol's oracle, mean over clusters and noise floor, and how far the protocols' outputs lie apart."""
    ga = d["gt_attrs"]
    if "removals" not in ga:
        return []
    removals = str(ga["removals"]).split(",")
    alphas = [float(a) for a in np.atleast_1d(ga["alphas"])]
    cols = [(f"Dist1 {r}", f"{r}/dist1", 2) for r in removals]
    cols += [(f"LDS α={a:g} {r}", f"{r}/lds@{a:g}", 3) for a in alphas for r in removals]
    lines = ["| Method | " + " | ".join(c for c, _, _ in cols) + " |", "|---|" + "---|" * len(cols)]
    for name in method_order(d["methods"]):
        a = d["methods"][name]["attrs"]
        cells = [_fmt(a[k], a[f"{k}_sem"], dg) if k in a else "n/a" for _, k, dg in cols]
        lines.append(f"| {method_label(name, a)} | " + " | ".join(cells) + " |")
    ref = d["reference"]
    for row in ("oracle", "mean over clusters", "noise floor (seed reruns)"):
        cells = []
        for _, k, dg in cols:
            key = f"protocols:{k.split('/')[0]}/{row}/dist1"
            cells.append(_fmt(ref[key], ref[f"{key}_sem"], dg) if "lds@" not in k and key in ref else "-")
        lines.append(f"| *{row}* | " + " | ".join(cells) + " |")
    if "protocols:apart/dist1" in ref:
        r0, r1 = removals
        effect = [ref.get(f"protocols:{r}/mean over clusters/dist1", float("nan")) for r in removals]
        noise = ref.get(f"protocols:{r0}/noise floor (seed reruns)/dist1", float("nan"))
        lines += ["", f"- {r0} against {r1}: the two protocols' retrained softmaxes lie "
                  f"{ref['protocols:apart/dist1']:.2f} ± {ref['protocols:apart/dist1_sem']:.2f} apart (Dist1 x100, mean "
                  f"over clusters and queries); removing a cluster moves the output by {effect[0]:.2f} ({r0}) and "
                  f"{effect[1]:.2f} ({r1}), a full-data rerun with another seed by {noise:.2f}. Per query, the two "
                  f"protocols rank the clusters' CE changes with Spearman {ref['protocols:apart/rank']:.3f} ± "
                  f"{ref['protocols:apart/rank_sem']:.3f}."]
    return lines


FROM_THETA_0 = "from theta_0"  # Table 4 key suffix: theta_0 trained on a method's synsets (``evaluate.table4``)


def table4(d: dict) -> list[str]:
    """theta_0, theta_tau, then DDM and every other method with a Table 4 column (registry order), each forward-
    matched one also as theta_0 trained on its synsets (the paper's protocol for DDM-match)."""
    t = d["table4"]
    cols = [("theta_0 (exact: trained on nothing)", "theta_0"), ("theta_tau", "theta_tau")]
    names = {k.split("/")[0] for k in t if k not in ("theta_0", "theta_tau")}
    unlearned = ["ddm"] * ("ddm" in names) + [n for n in method_order(names) if n != "ddm"]
    for name in unlearned:
        attrs = d["methods"].get(name, {}).get("attrs")
        label = _attr(name, attrs, "table4", "") or method_label(name, attrs)
        if name in t:
            cols.append((f"{label}: theta_tau fine-tuned on all synsets (ours)", name))
        if f"{name}/{FROM_THETA_0}" in t:
            cols.append((f"{label}: theta_0 trained on all synsets (the paper's Table 4)", f"{name}/{FROM_THETA_0}"))
    return ["| " + " | ".join(h for h, _ in cols) + " |", "|" + "---|" * len(cols),
            "| " + " | ".join(f"{100 * t[k]:.1f} %" for _, k in cols) + " |"]


def plot_scatter(d: dict, name: str, path: Path, n_show: int = 10) -> Path:
    """Per query: the method's score of each left-out cluster against the exact CE change (PNG at ``path``)."""
    return save_figure(scatter_figure(d, name, n_show), path)


def scatter_figure(d: dict, name: str, n_show: int = 10):
    """The figure of :func:`plot_scatter`: up to 5 queries a row, the axis labels inside the figure."""
    plt = pyplot()

    m = d["methods"][name]
    scores = m["scores"][:, d["removed"]]
    exact = ce_change(d["outputs"], d["base"], d["labels"])  # [n_removed, Q]
    n = min(n_show, len(d["labels"]))
    cols = min(5, n)
    rows = math.ceil(n / cols)
    # one row of 2.8 in was shorter than the y label at 9 pt (cut off): two lines, and at least 3.2 in
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols + 0.4, max(2.8 * rows, 3.2)), squeeze=False)
    for q in range(n):
        ax = axes[q // cols][q % cols]
        ax.scatter(scores[q], exact[:, q], s=8, alpha=0.7)
        ax.set_title(f"test[{d['query_index'][q]}] y={d['labels'][q]}  ρ={_rho(scores[q], exact[:, q]):+.2f}",
                     fontsize=8)
        ax.tick_params(labelsize=7)
    for q in range(n, rows * cols):
        axes[q // cols][q % cols].axis("off")
    fig.supxlabel(f"{method_label(name, m['attrs'])} score of the cluster", fontsize=9)
    fig.supylabel("exact change of the query's CE\nwhen the cluster is removed", fontsize=9)
    fig.tight_layout()
    return fig


def class_by_class(values: np.ndarray, labels: np.ndarray, cluster_class: np.ndarray, n_cls: int) -> np.ndarray:
    """[L, L]: row = query label, column = cluster class, mean over queries of the summed values."""
    out = np.full((n_cls, n_cls), np.nan)
    for c in range(n_cls):
        rows = labels == c
        if rows.any():
            per_class = np.stack([values[rows][:, cluster_class == j].sum(1) for j in range(n_cls)], 1)
            out[c] = per_class.mean(0)
    return out


def plot_heatmap(d: dict, cluster_class: np.ndarray, path: Path, names: tuple[str, ...] = ("ddm",)) -> Path:
    """Class x class attribution (the paper's Fig. 3): each method's scores beside exact CE changes."""
    plt = pyplot()

    n_cls = d["base"].shape[1]
    removed = d["removed"]
    exact = ce_change(d["outputs"], d["base"], d["labels"]).T  # [Q, n_removed]
    cc = cluster_class[removed]
    mats = [class_by_class(d["methods"][n]["scores"][:, removed], d["labels"], cc, n_cls) for n in names]
    mats.append(class_by_class(exact, d["labels"], cc, n_cls))
    titles = [f"{method_label(n, d['methods'][n]['attrs'])} scores" for n in names] + ["exact retraining (CE change)"]
    fig, axes = plt.subplots(1, len(mats), figsize=(4.5 * len(mats), 4))
    for ax, mat, title in zip(axes, mats, titles):
        draw_class_matrix(fig, ax, mat, title, "class of the removed clusters")
    fig.tight_layout()
    return save_figure(fig, path)


def draw_class_matrix(fig, ax, mat: np.ndarray, title: str, xlabel: str = "class of the clusters",
                      annotate: bool = False) -> None:
    """One class x class heat map on ``ax`` (rows: query label), with a colour bar; ``annotate`` writes the values."""
    n = mat.shape[0]
    im = ax.imshow(mat, cmap="viridis")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("query label")
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    if annotate:
        finite = mat[np.isfinite(mat)]
        mid = float(finite.mean()) if finite.size else 0.0
        for i in range(n):
            for j in range(n):
                if math.isfinite(mat[i, j]):
                    ax.text(j, i, f"{mat[i, j]:.2g}", ha="center", va="center", fontsize=annotation_size(n),
                            color="black" if mat[i, j] > mid else "white")
    fig.colorbar(im, ax=ax, fraction=0.046)


def annotation_size(n: int) -> float:
    """Font size (pt) of the values in an n x n heat map: 8 pt up to 10 classes (5 pt was unreadable), at least 6."""
    return max(6.0, min(8.0, 80.0 / max(n, 1)))


def pyplot():
    """matplotlib.pyplot on the Agg backend (deferred: see the module docstring)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    """Save ``fig`` as a PNG at ``path`` (temp file, then rename) and close it."""
    plt = pyplot()
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def write_report(eval_path: str | Path, out: str | Path, plots: bool = True) -> Path:
    """Write ``out`` (Markdown) and, with ``plots``, its PNGs beside it; returns ``out``."""
    eval_path, out = Path(eval_path), Path(out)
    run_dir = eval_path.parent
    d = read_evaluation(eval_path)
    lines = ["# DDM evaluation report", "", *_context_lines(run_dir, d), "",
             "## Locating the responsible cluster (paper Eq. 10, Tables 1-2) and LDS", "",
             "Each method picks one cluster per query (Dist1/Dist2: its top cluster; Dist3: the cluster it ranks "
             "least influential; 'Dist1 by Dist1 / Dist2 scores': Dist1 of the cluster the Dist1 / Dist2 scores rank "
             "top, the two locating rules of methods with one score matrix per objective, the Dist1 column using one "
             "of them, as its row's note says); the value is what exact retraining "
             "without that cluster gives. Larger is better "
             "in every column. LDS: Spearman correlation, per query, between the method's predicted effect of "
             "removing half of the clusters and the exact change of the query's cross-entropy. Mean ± s.e.m. over "
             "queries. Seconds: online = answering these queries given the offline artifacts; offline = "
             "distillation, paid once.", "", *table1(d), "", *findings(d), ""]
    protocols = protocol_table(d)
    if protocols:
        lines += ["## Ground-truth protocols and drop fractions", "",
                  "The same methods against each exact-retraining protocol (drop: the removed rows leave the data "
                  "order and the rest is re-batched; zero-weight: every minibatch keeps its slots and the removed rows "
                  "weigh 0) and at each LDS kept fraction α (α = 0.9: a tenth of the clusters removed), each with its "
                  "own random subsets. Mean ± s.e.m. over queries.", "", *protocols, ""]
    lines += ["## Unlearning everything (paper Table 4)", "", *table4(d), ""]
    if plots:
        with h5py.File(run_dir / "clusters.h5", "r", locking=False) as f:
            cluster_class = f["clusters/class"][()]
        names = method_order(d["methods"])
        figs = [plot_scatter(d, name, run_dir / f"scatter_{name}.png") for name in names
                if _attr(name, d["methods"][name]["attrs"], "scatter", False)]
        shown = tuple(n for n in names if _attr(n, d["methods"][n]["attrs"], "heatmap", False))
        if shown:
            figs.append(plot_heatmap(d, cluster_class, run_dir / "heatmap.png", shown))
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in figs] + [""]
    notes = [f"- {method_label(n, d['methods'][n]['attrs'])}: {d['methods'][n]['attrs'].get('note', '')}"
             for n in method_order(d["methods"])]
    lines += ["## How each method scored", "", *notes, ""]
    tmp = out.with_name(f".{out.name}.tmp.{os.getpid()}")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, out)
    return out


def _columns_over_runs(runs: list[dict], names: list[str], cols: list[tuple[str, str, int]]) -> list[str]:
    """Rows ``names`` x columns (header, attr key, digits) as mean ± std over ``runs``; per column the best mean
    and every mean within twice the larger of the two stds of it are bold (ties: not told apart by the seeds)."""
    stats = {}
    for name in names:
        for _, key, _ in cols:
            v = np.array([r["methods"][name]["attrs"].get(key, np.nan) for r in runs], dtype=np.float64)
            stats[name, key] = (float(v.mean()), float(v.std(ddof=1)))
    lines = ["| Method | " + " | ".join(h for h, _, _ in cols) + " |", "|---|" + "---|" * len(cols)]
    best = {}
    for _, key, _ in cols:
        finite = [n for n in names if math.isfinite(stats[n, key][0])]
        best[key] = max(finite, key=lambda n: stats[n, key][0]) if finite else None
    for name in names:
        cells = []
        for _, key, dg in cols:
            mean, std = stats[name, key]
            cell = _fmt(mean, std, dg, "-" if key.startswith("dist1_by_") else "n/a")
            top = best[key]
            if top is not None and math.isfinite(mean):
                bm, bs = stats[top, key]
                if bm - mean <= 2 * max(bs, std):
                    cell = f"**{cell}**"
            cells.append(cell)
        lines.append(f"| {method_label(name, runs[0]['methods'][name]['attrs'])} | " + " | ".join(cells) + " |")
    return lines


def seed_table(eval_paths: list[str | Path]) -> list[str]:
    """Methods x metrics as mean ± std over runs (e.g. the same options with other ``--seed``s).

    Each run contributes its per-query mean; the std is over runs (ddof 1), so it measures how much
    a conclusion depends on the seed (data subset, init, clusters, queries), which s.e.m. over one
    run's queries does not. Bold: the best mean of a column and every mean closer to it than twice the
    larger std (a tie). Runs evaluated under several protocols or kept fractions get a second table.
    """
    runs = [read_evaluation(p) for p in eval_paths]
    if len(runs) < 2:
        raise ValueError("seed_table needs at least two evaluation.h5 files (runs with different --seed)")
    names = [m for m in method_order(runs[0]["methods"]) if all(m in r["methods"] for r in runs)]
    cols = [(h, m, dg) for h, m, dg in zip(("Dist1 (x100) ↑", "Dist1 by Dist1 scores ↑", "Dist1 by Dist2 scores ↑",
                                            "Dist2 ↑", "Dist3 ↑", "LDS ↑"),
                                           ("dist1", "dist1_by_dist1", "dist1_by_dist2", "dist2", "dist3", "lds"),
                                           (2, 2, 2, 3, 4, 3))]
    lines = [f"Mean ± std over {len(runs)} runs: " + ", ".join(str(p) for p in eval_paths) + ". Bold: the best "
             "mean of the column and the means within twice the spread of it (ties).", "",
             *_columns_over_runs(runs, names, cols)]
    protocols = [str(r["gt_attrs"].get("removals", "")) for r in runs]
    if protocols[0] and len(set(protocols)) == 1:
        ga = runs[0]["gt_attrs"]
        removals, alphas = protocols[0].split(","), [float(a) for a in np.atleast_1d(ga["alphas"])]
        pcols = [(f"Dist1 {r}", f"{r}/dist1", 2) for r in removals]
        pcols += [(f"LDS α={a:g} {r}", f"{r}/lds@{a:g}", 3) for a in alphas for r in removals]
        lines += ["", "By ground-truth protocol and LDS kept fraction α:", "", *_columns_over_runs(runs, names, pcols)]
        ref_keys = [("protocols:apart/dist1", "the two protocols' outputs apart (Dist1 x100)")]
        ref_keys += [(f"protocols:{r}/mean over clusters/dist1", f"removing a cluster, {r} (Dist1 x100)")
                     for r in removals]
        ref_keys += [(f"protocols:{removals[0]}/noise floor (seed reruns)/dist1", "a seed rerun (Dist1 x100)"),
                     ("protocols:apart/rank", "Spearman between the protocols' CE changes")]
        for key, text in ref_keys:
            v = np.array([r["reference"].get(key, np.nan) for r in runs], dtype=np.float64)
            if np.isfinite(v).all():
                lines.append(f"- {text}: {v.mean():.3f} ± {v.std(ddof=1):.3f}")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m ddm_hpc.report", description="regenerate report.md from "
                                 "evaluation.h5, or tabulate several runs as mean ± std over seeds")
    ap.add_argument("evaluations", nargs="+", help="RUN/evaluation.h5 file(s)")
    ap.add_argument("--seeds", metavar="OUT.md", help="write the mean ± std table over the given runs to OUT.md")
    args = ap.parse_args(argv)
    for p in args.evaluations:
        if not Path(p).is_file():
            sys.exit(f"ddm_hpc.report: error: {p}: no such file; pass RUN/evaluation.h5 of an evaluated run")
    if args.seeds:
        out = Path(args.seeds)
        tmp = out.with_name(f".{out.name}.tmp.{os.getpid()}")
        tmp.write_text("\n".join(["# DDM evaluation over seeds", "", *seed_table(args.evaluations), ""]))
        os.replace(tmp, out)
        print(out)
        return
    for p in args.evaluations:
        print(write_report(p, Path(p).parent / "report.md"))


if __name__ == "__main__":
    main()
