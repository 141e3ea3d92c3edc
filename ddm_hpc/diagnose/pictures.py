"""``pictures``: the paper's Fig. 3 heat map, top-k responsible clusters as image grids, predicted vs exact.

Everything is read from ``RUN/attribution.h5`` (and ``RUN/evaluation.h5`` when ``ddm-hpc evaluate`` has
run) plus the run's images (``RunContext.bundle``); nothing is trained.

Pictures written under ``RUN/diagnose/``:

  pictures_q<i>.png       for each of the first ``--n-pictures`` queries: the query image, then one row
                          per responsible cluster (``--top-k``, highest DDM score first) showing its first
                          ``--n-members`` member images (by training row), annotated with cluster id,
                          class, size, DDM score and, when the cluster was retrained without, the exact
                          change of the query's cross-entropy.
  pictures_q<i>_grid.png  the same rows as a raw pixel grid (:func:`image_grid`, no annotations).
  pictures_heatmap.png    class x class: row = query label, column = class of the clusters, mean over
                          queries of the DDM scores summed per class (from attribution.h5 alone).
  pictures_heatmap_exact.png, pictures_scatter_ddm.png
                          with evaluation.h5: ``report.plot_heatmap`` (DDM beside exact retraining)
                          and ``report.plot_scatter`` for ``ddm``.

Room: a task module of ``diagnose`` (imports ``context``, ``data``, ``diagnose.base``, ``diagnose.images``,
``report``, ``storage``).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from ddm_hpc.context import RunContext
from ddm_hpc.data import DatasetBundle, denormalize
from ddm_hpc.diagnose.base import Section, Task, diagnose_dir, register
from ddm_hpc.diagnose.images import image_grid, write_png
from ddm_hpc.errors import StageError
from ddm_hpc.report import (ce_change, class_by_class, draw_class_matrix, method_label, plot_heatmap, plot_scatter,
                            pyplot, read_evaluation, save_figure)
from ddm_hpc.storage import artifact_path

log = logging.getLogger(__name__)

DPI = 100  # report.save_figure's dpi: figure size in inches x DPI = PNG size in pixels
ROW_INCHES = 0.55  # height of one row (query or cluster) in a top-k figure
TEXT_INCHES = 4.2  # width of the annotation column right of the grid
TITLE_INCHES = 0.5  # height of the title band (plus margins)


# ----------------------------------------------------------------------------------------------- grids


# ----------------------------------------------------------------------------------------------- inputs


@dataclass
class AttributionView:
    """What the pictures need from ``attribution.h5``.

    Attributes:
        scores: float64 ``[Q, K]``, larger = more responsible; NaN where not scored (hierarchical
            search). A single stored row (``--query-mode batch``) is repeated for every query.
        query_position: int64 ``[Q]`` rows of ``bundle.x_test``; ``query_index`` the test-split indices.
        query_label, query_pred: int64 ``[Q]``: true label and theta_tau's prediction.
        assignment: int64 ``[N_train]`` cluster of each training row; ``cluster_class``, ``cluster_size`` ``[K]``.
        objective: the objective stored as ``scores``; ``shared_row``: True when one row serves all queries.
    """

    scores: np.ndarray
    query_position: np.ndarray
    query_index: np.ndarray
    query_label: np.ndarray
    query_pred: np.ndarray
    assignment: np.ndarray
    cluster_class: np.ndarray
    cluster_size: np.ndarray
    objective: str
    shared_row: bool


def read_attribution(run_dir: str | Path) -> AttributionView:
    """``RUN/attribution.h5`` as an :class:`AttributionView`; StageError when missing or incomplete."""
    path = artifact_path(run_dir, "attribute")
    if not path.is_file():
        raise StageError(f"pictures: {path} not found: run `ddm-hpc run --out {run_dir}` first")
    try:
        with h5py.File(path, "r", locking=False) as f:
            if not f.attrs.get("complete"):
                raise StageError(f"pictures: {path} is incomplete: rerun `ddm-hpc attribute --out {run_dir}`")
            scores = f["scores"][()].astype(np.float64)
            pos = f["query_position"][()].astype(np.int64)
            view = AttributionView(
                scores=scores, query_position=pos, query_index=f["query_index"][()].astype(np.int64),
                query_label=f["query_label"][()].astype(np.int64), query_pred=f["query_pred"][()].astype(np.int64),
                assignment=f["clusters/assignment"][()].astype(np.int64),
                cluster_class=f["clusters/class"][()].astype(np.int64),
                cluster_size=f["clusters/size"][()].astype(np.int64),
                objective=str(f.attrs.get("objective", "?")), shared_row=False)
    except (OSError, KeyError) as e:
        raise StageError(f"pictures: cannot read {path} ({e}): rerun `ddm-hpc attribute --out {run_dir}`") from e
    q, k = len(view.query_position), len(view.cluster_class)
    if view.scores.ndim != 2 or view.scores.shape[1] != k or view.scores.shape[0] not in (1, q):
        raise StageError(f"pictures: {path} has scores of shape {view.scores.shape} for {q} queries and {k} clusters: "
                         f"rerun `ddm-hpc attribute --out {run_dir}`")
    if view.scores.shape[0] != q:
        view.scores = np.repeat(view.scores, q, axis=0)
        view.shared_row = True
    return view


def _check_data(view: AttributionView, bundle: DatasetBundle, run_dir: Path) -> None:
    n_train, n_test = len(bundle.x_train), len(bundle.x_test)
    if len(view.assignment) != n_train or (len(view.query_position) and view.query_position.max() >= n_test):
        raise StageError(f"pictures: {run_dir}/attribution.h5 was made from other data ({len(view.assignment)} "
                         f"training rows, loaded {n_train}): run `ddm-hpc diagnose` with the run's own data options "
                         f"(its config.json)")


def read_exact(run_dir: str | Path, view: AttributionView) -> dict | None:
    """The exact side from ``RUN/evaluation.h5``, or None when ``ddm-hpc evaluate`` has not run.

    Returns:
        ``report.read_evaluation``'s dict plus ``effect`` float64 ``[n_removed, Q_eval]`` (exact change
        of each evaluated query's cross-entropy after retraining without ``removed[r]``) and ``column``
        int64 ``[Q]``: the evaluation column of each attribution query (-1 if not evaluated).
    """
    path = artifact_path(run_dir, "evaluate")
    if not path.is_file():
        return None
    try:
        d = read_evaluation(path)
    except (OSError, KeyError) as e:
        raise StageError(f"pictures: cannot read {path} ({e}): rerun `ddm-hpc evaluate --out {run_dir}`") from e
    d["effect"] = ce_change(d["outputs"], d["base"], d["labels"]).astype(np.float64)
    where = {int(i): j for j, i in enumerate(d["query_index"])}
    d["column"] = np.array([where.get(int(i), -1) for i in view.query_index], dtype=np.int64)
    return d


# ----------------------------------------------------------------------------------------------- numbers


def top_clusters(scores: np.ndarray, k: int) -> np.ndarray:
    """int64 ``[Q, min(k, K)]``: cluster ids by decreasing score (NaN last; ties by lower id)."""
    s = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=-np.inf)
    return np.argsort(-s, axis=1, kind="stable")[:, :min(k, s.shape[1])].astype(np.int64)


def cluster_members(assignment: np.ndarray, cluster: int, n: int) -> np.ndarray:
    """int64 ``[n]``: the first ``n`` training rows of ``cluster`` in index order, -1 padded."""
    out = np.full(n, -1, dtype=np.int64)
    rows = np.flatnonzero(assignment == cluster)[:n]
    out[:len(rows)] = rows
    return out


def class_matrix(scores: np.ndarray, labels: np.ndarray, cluster_class: np.ndarray, n_cls: int) -> np.ndarray:
    """float64 ``[L, L]``: row = query label, column = cluster class, mean over queries of the scores summed
    over that class's clusters (``report.class_by_class``; NaN scores count 0, rows without queries are NaN)."""
    return class_by_class(np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=0.0), np.asarray(labels),
                         np.asarray(cluster_class), n_cls)


def _images01(x: torch.Tensor, bundle: DatasetBundle) -> np.ndarray:
    """float ``[N, C, H, W]`` normalised -> [0, 1] numpy."""
    return denormalize(x.float(), bundle.mean, bundle.std).clamp(0, 1).cpu().numpy()


def query_rows(bundle: DatasetBundle, query_position: int, members: np.ndarray) -> np.ndarray:
    """The cells of one top-k picture: float ``[(1 + k) * n, C, H, W]`` on [0, 1], NaN = blank cell.

    Row 0: the query image then blanks; row 1 + r: the members ``members[r]`` (``[k, n]``, -1 = blank).
    """
    k, n = members.shape
    c, h, w = bundle.image_shape
    cells = np.full(((1 + k) * n, c, h, w), np.nan, dtype=np.float64)
    cells[0] = _images01(bundle.x_test[query_position:query_position + 1], bundle)[0]
    flat = members.reshape(-1)
    ok = np.flatnonzero(flat >= 0)
    if len(ok):
        cells[n + ok] = _images01(bundle.x_train[torch.from_numpy(flat[ok])], bundle)
    return cells


# ----------------------------------------------------------------------------------------------- figures


def _fmt(v: float) -> str:
    return f"{v:+.3g}" if math.isfinite(v) else "n/a"


def figure_size(grid_shape: tuple[int, ...], n_rows: int) -> tuple[float, float]:
    """Inches (width, height) of a top-k figure; x ``DPI`` = its PNG size (rounded to whole pixels)."""
    gh, gw = grid_shape[:2]
    img_h = ROW_INCHES * n_rows
    img_w = img_h * gw / gh
    return round(img_w + TEXT_INCHES, 2), round(img_h + TITLE_INCHES, 2)


def plot_topk(grid: np.ndarray, row_labels: list[str], title: str, cell: int, pad: int, path: Path) -> Path:
    """The raw grid with one annotation to the right of each row (row r's centre at ``pad + r * cell + h/2``)."""
    plt = pyplot()

    width, height = figure_size(grid.shape, len(row_labels))
    fig = plt.figure(figsize=(width, height))
    img_w, img_h = width - TEXT_INCHES, height - TITLE_INCHES
    ax = fig.add_axes((0.1 / width, 0.1 / height, img_w / width, img_h / height))
    ax.imshow(grid, interpolation="nearest")
    ax.axis("off")
    for r, text in enumerate(row_labels):
        ax.text(grid.shape[1] + 2 * pad, pad + r * cell + (cell - pad) / 2, text, va="center", ha="left",
                fontsize=7, clip_on=False)
    fig.suptitle(title, fontsize=8, x=0.02, ha="left", y=1 - 0.08 / height, va="top")
    return save_figure(fig, path)


def plot_class_matrix(mat: np.ndarray, title: str, path: Path) -> Path:
    """One class x class heat map with its values written in the cells (PNG at ``path``)."""
    return save_figure(class_matrix_figure(mat, title), path)


def class_matrix_figure(mat: np.ndarray, title: str):
    """The figure of :func:`plot_class_matrix`: cells of ~0.45 in for 10 classes, so 8 pt values fit in them."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6.8, 5.8))
    draw_class_matrix(fig, ax, mat, title, annotate=mat.shape[0] <= 12)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------- section


def pictures_section(dc: RunContext) -> Section:
    """Top-k cluster grids, the class x class heat map and (with evaluation.h5) predicted vs exact.

    Arrays of the section (``P`` drawn queries, ``k`` = top_k, ``n`` = n_members, ``L`` classes):
    ``query_position``/``query_index``/``query_label``/``query_pred`` ``[P]``; ``top_clusters``,
    ``top_scores``, ``top_class``, ``top_size``, ``exact_effect`` (NaN = not retrained) ``[P, k]``;
    ``members`` ``[P, k, n]`` training rows shown (-1 = blank); ``class_matrix`` ``[L, L]`` over all
    queries of attribution.h5; with evaluation.h5 ``class_matrix_eval_ddm``/``class_matrix_exact``
    ``[L, L]`` over the retrained clusters (what ``pictures_heatmap_exact.png`` shows).
    """
    dcfg = dc.cfg.diagnose
    run_dir, out = dc.run_dir, diagnose_dir(dc.run_dir)
    bundle = dc.bundle
    view = read_attribution(run_dir)
    _check_data(view, bundle, run_dir)
    ev = read_exact(run_dir, view)
    n_cls = bundle.num_classes
    q_all, k_all = view.scores.shape
    p = min(dcfg.n_pictures, q_all)
    k = min(dcfg.top_k, k_all)
    n = dcfg.n_members
    pad = 2
    cell = bundle.image_size[0] + pad

    top = top_clusters(view.scores[:p], k)  # [P, k]
    top_scores = np.take_along_axis(view.scores[:p], top, 1)
    members = np.stack([np.stack([cluster_members(view.assignment, int(c), n) for c in row]) for row in top]) \
        if p else np.zeros((0, k, n), dtype=np.int64)
    exact = np.full((p, k), np.nan)
    if ev is not None:
        removed_row = {int(c): r for r, c in enumerate(ev["removed"])}
        for i in range(p):
            col = int(ev["column"][i])
            for j, c in enumerate(top[i]):
                if col >= 0 and int(c) in removed_row:
                    exact[i, j] = ev["effect"][removed_row[int(c)], col]

    images: list[Path] = []
    table = ["| query (test idx) | label | pred | rank | cluster | class | size | DDM score | exact ΔCE |",
             "|---|---|---|---|---|---|---|---|---|"]
    for i in range(p):
        qpos, qidx = int(view.query_position[i]), int(view.query_index[i])
        label, pred = int(view.query_label[i]), int(view.query_pred[i])
        grid = image_grid(query_rows(bundle, qpos, members[i]), ncol=n, pad=pad, rgb=True)
        write_png(grid, out / f"pictures_q{i}_grid.png")
        labels = [f"query test[{qidx}]: label {label}, predicted {pred}"]
        for j in range(k):
            c = int(top[i, j])
            if ev is None:
                ex = ""
            elif int(ev["column"][i]) < 0:
                ex = "; exact: query not evaluated"
            elif math.isfinite(exact[i, j]):
                ex = f"; exact ΔCE {_fmt(exact[i, j])}"
            else:
                ex = "; exact: not retrained"
            labels.append(f"#{j + 1} cluster {c} (class {int(view.cluster_class[c])}, {int(view.cluster_size[c])} "
                          f"imgs)\nDDM score {_fmt(top_scores[i, j])}{ex}")
            table.append(f"| {qidx} | {label} | {pred} | {j + 1} | {c} | {int(view.cluster_class[c])} | "
                         f"{int(view.cluster_size[c])} | {_fmt(top_scores[i, j])} | {_fmt(exact[i, j])} |")
        title = (f"test[{qidx}] (label {label}, pred {pred}): top-{k} clusters by {view.objective} score, "
                 f"first {n} members each")
        images.append(plot_topk(grid, labels, title, cell, pad, out / f"pictures_q{i}.png"))
        log.info("pictures: query %d (test[%d]) -> %s", i, qidx, images[-1])

    mat = class_matrix(view.scores, view.query_label, view.cluster_class, n_cls)
    images.append(plot_class_matrix(mat, f"DDM {view.objective} scores: mean over {q_all} queries, summed per class",
                                    out / "pictures_heatmap.png"))
    arrays: dict[str, np.ndarray] = {
        "query_position": view.query_position[:p], "query_index": view.query_index[:p],
        "query_label": view.query_label[:p], "query_pred": view.query_pred[:p], "top_clusters": top,
        "top_scores": top_scores.astype(np.float64), "top_class": view.cluster_class[top],
        "top_size": view.cluster_size[top], "members": members, "exact_effect": exact, "class_matrix": mat}

    shared = (" (one score row for the whole batch query, `--query-mode batch`: every query shares it)"
              if view.shared_row else "")
    lines = [f"From `attribution.h5`: {q_all} queries, K = {k_all} clusters, `scores` = {view.objective} "
             f"(larger = more responsible){shared}.", "",
             f"- `pictures_q<i>.png` (first {p} queries): the query image, then its top-{k} clusters by score, "
             f"highest first, one row each with the cluster's first {n} member images (by training row); "
             "annotations: cluster id, class, size, DDM score"
             + (", exact change of the query's cross-entropy after retraining without the cluster "
                "(`evaluation.h5`)." if ev is not None else ".")
             + " `pictures_q<i>_grid.png`: the same grid, unannotated, at full resolution.",
             "- `pictures_heatmap.png` (paper Fig. 3): row = query label, column = class of the clusters, value = "
             "mean over queries of the scores summed over that class's clusters"
             + (" (NaN scores of the hierarchical search count 0)" if np.isnan(view.scores).any() else "")
             + "; empty rows have no query of that label.", ""]
    if ev is None:
        lines.append("- No `evaluation.h5`: run `ddm-hpc evaluate` for the exact comparison (predicted vs exact "
                     "scatter, DDM beside exact heat map, exact effects in the table).")
    else:
        shown = tuple(m for m in ("ddm", "ddm-soft") if m in ev["methods"])
        removed = ev["removed"]
        if shown:
            images.append(plot_heatmap(ev, view.cluster_class, out / "pictures_heatmap_exact.png", shown))
            arrays["class_matrix_eval_ddm"] = class_by_class(ev["methods"][shown[0]]["scores"][:, removed],
                                                            ev["labels"], view.cluster_class[removed], n_cls)
            arrays["class_matrix_exact"] = class_by_class(ev["effect"].T, ev["labels"], view.cluster_class[removed],
                                                         n_cls)
            lines.append(f"- `pictures_heatmap_exact.png`: the same matrix from `evaluation.h5` over its "
                         f"{len(removed)} retrained clusters and {len(ev['labels'])} queries, "
                         f"{', '.join(method_label(m) for m in shown)} beside the exact change of the "
                         "cross-entropy.")
        if "ddm" in ev["methods"]:
            images.append(plot_scatter(ev, "ddm", out / "pictures_scatter_ddm.png"))
            lines.append(f"- `pictures_scatter_ddm.png`: per query, the DDM score of each of the {len(removed)} "
                         "retrained clusters against the exact change of the query's cross-entropy when it is "
                         "removed (ρ: Spearman).")
        else:
            lines.append("- `evaluation.h5` has no `ddm` scores: rerun `ddm-hpc evaluate` with `--methods` "
                         "including ddm for the predicted vs exact scatter.")
    lines += ["", f"Top-{k} clusters of the drawn queries (exact ΔCE: n/a = not retrained"
              + ("" if ev is not None else "; no evaluation.h5") + "):", "", *table]
    attrs = {"top_k": k, "n_members": n, "n_pictures": p, "n_queries": q_all, "n_clusters": k_all,
             "objective": view.objective, "has_evaluation": int(ev is not None), "shared_row": int(view.shared_row),
             "n_exact_known": int(np.isfinite(exact).sum())}
    return Section(name="pictures", title="Pictures: top-k responsible clusters, class x class heat map, predicted "
                   "vs exact", lines=lines, images=images, arrays=arrays, attrs=attrs)


register(Task("pictures", pictures_section))
