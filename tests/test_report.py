"""report: the figures' text fits and is readable (the trial: the scatter's y label was cut off, the heat map's
values too small to read)."""
from __future__ import annotations

import numpy as np
import pytest

from ddm_hpc.diagnose.pictures import class_matrix_figure
from ddm_hpc.report import pyplot, scatter_figure


def _evaluation(n_queries: int, n_clusters: int = 12, n_cls: int = 3) -> dict:
    rng = np.random.default_rng(0)
    base = rng.dirichlet(np.ones(n_cls), n_queries)
    return {"methods": {"ddm": {"scores": rng.normal(size=(n_queries, n_clusters)), "attrs": {"label": "DDM-full"}}},
            "removed": np.arange(n_clusters), "outputs": rng.dirichlet(np.ones(n_cls), (n_clusters, n_queries)),
            "base": base, "labels": np.arange(n_queries) % n_cls, "query_index": np.arange(n_queries) * 7}


def _inside(fig, artist) -> bool:
    fig.canvas.draw()
    box = artist.get_window_extent(fig.canvas.get_renderer())
    return box.x0 >= 0 and box.y0 >= 0 and box.x1 <= fig.bbox.width and box.y1 <= fig.bbox.height


@pytest.mark.parametrize("n_queries", [1, 3, 10])
def test_scatter_axis_labels_fit_in_the_figure(n_queries):
    fig = scatter_figure(_evaluation(n_queries), "ddm")
    try:
        assert _inside(fig, fig._supylabel) and _inside(fig, fig._supxlabel)
    finally:
        pyplot().close(fig)


def test_heat_map_values_are_readable_and_fit_their_cells():
    mat = np.random.default_rng(1).random((10, 10)) * 0.05
    fig = class_matrix_figure(mat, "DDM dist1 scores")
    try:
        ax = fig.axes[0]
        texts = [t for t in ax.texts if t.get_text()]
        assert len(texts) == 100 and min(t.get_fontsize() for t in texts) >= 7
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        cell = ax.get_window_extent(renderer).width / 10
        assert max(t.get_window_extent(renderer).width for t in texts) < cell
    finally:
        pyplot().close(fig)
