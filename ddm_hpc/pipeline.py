"""Runs stages in order with resume and config-drift checks, and prints the run summary."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from ddm_hpc.config import STAGES, Config
from ddm_hpc.data import DatasetBundle
from ddm_hpc.errors import ConfigError
from ddm_hpc.launch import execute
from ddm_hpc.storage import (UPSTREAM, artifact_path, open_read, plan_stage, read_attrs, require_upstream,
                             write_json_atomic)

log = logging.getLogger(__name__)


def stage_function(stage: str):
    """The ``run_<stage>(cfg, bundle=None) -> Path`` function of a stage (imported lazily)."""
    if stage == "train":
        from ddm_hpc.train import run_train as fn
    elif stage == "cluster":
        from ddm_hpc.cluster import run_cluster as fn
    elif stage == "distill":
        from ddm_hpc.distill import run_distill as fn
    elif stage == "attribute":
        from ddm_hpc.attribute import run_attribute as fn
    else:
        from ddm_hpc.evaluate import run_evaluate as fn
    return fn


def plan(cfg: Config, stages: tuple[str, ...]) -> dict[str, str]:
    """'run' or 'skip' per stage, raising before anything runs on drift or missing inputs."""
    out = Path(cfg.runtime.out)
    decisions: dict[str, str] = {}
    for stage in stages:
        upstream_runs = any(decisions.get(up) == "run" for up in UPSTREAM[stage])
        if upstream_runs:
            decisions[stage] = "run"  # its inputs are being recomputed
            continue
        require_upstream(out, stage, cfg)
        decisions[stage] = plan_stage(out, stage, cfg)
    return decisions


def preflight(cfg: Config, bundle: DatasetBundle, decisions: dict[str, str]) -> None:
    """Checks that need the data but no training, so bad options fail in seconds."""
    n_test, acfg = len(bundle.y_test), cfg.attribute
    if decisions.get("attribute") == "run":
        if acfg.query_positions() is None and acfg.n_queries > n_test:
            raise ConfigError(f"--n-queries {acfg.n_queries} exceeds the {n_test} test images: lower it or raise "
                              "--n-test")
    if decisions.get("cluster") == "run" and cfg.cluster.small_class == "error":
        counts = torch.bincount(bundle.y_train, minlength=bundle.num_classes)
        c = int(counts.argmin())
        if counts[c] < cfg.cluster.clusters_per_class:
            raise ConfigError(f"class {c} has {int(counts[c])} training images, fewer than --clusters-per-class "
                              f"{cfg.cluster.clusters_per_class}: lower --clusters-per-class, raise --n-train, "
                              "or pass --small-class reduce")


def run_stages(cfg: Config, stages: tuple[str, ...] = STAGES) -> dict[str, float]:
    """Run ``stages`` in order, skipping current artifacts; returns seconds per stage run."""
    from ddm_hpc.train import load_data

    out = Path(cfg.runtime.out)
    decisions = plan(cfg, stages)
    for stage, what in decisions.items():
        if what == "skip":
            log.info("%s: %s is up to date, skipping (pass --overwrite to recompute)", stage,
                     artifact_path(out, stage))
    timings: dict[str, float] = {}
    if "run" not in decisions.values():
        return timings
    t0 = time.perf_counter()
    bundle = load_data(cfg)
    timings["data"] = time.perf_counter() - t0
    preflight(cfg, bundle, decisions)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "config.json", {k: v for k, v in cfg.to_dict().items() if k != "runtime"})
    for stage in stages:
        if decisions[stage] == "run":
            t0 = time.perf_counter()
            execute(stage_function(stage), cfg, bundle=bundle)
            timings[stage] = time.perf_counter() - t0
    return timings


def summary(run_dir: str | Path, n_show: int = 10) -> str:
    """A human-readable summary of a run directory's artifacts."""
    run_dir = Path(run_dir)
    lines = [f"run directory: {run_dir}"]
    attrs = {s: read_attrs(artifact_path(run_dir, s)) for s in STAGES}
    if attrs["train"]:
        a = attrs["train"]
        lines.append(f"  train      {a['seconds']:7.1f} s  test accuracy {a['test_accuracy']:.4f}")
    if attrs["cluster"]:
        with open_read(artifact_path(run_dir, "cluster")) as f:
            sizes = f["clusters/size"][()]
        lines.append(f"  cluster    {attrs['cluster']['seconds']:7.1f} s  K = {len(sizes)} clusters, "
                     f"{sizes.min()}..{sizes.max()} images each")
    if attrs["distill"]:
        with open_read(artifact_path(run_dir, "distill")) as f:
            parts = [f"{lv} {f[lv]['init_loss'][()].mean():.3f} -> {f[lv]['final_loss'][()].mean():.3f}"
                     for lv in ("cluster", "class") if lv in f]
        lines.append(f"  distill    {attrs['distill']['seconds']:7.1f} s  {attrs['distill']['method']} matching loss "
                     f"(mean per synset) " + ", ".join(parts))
    if attrs["attribute"]:
        a = attrs["attribute"]
        lines.append(f"  attribute  {a['seconds']:7.1f} s  {a['n_finetunes_flat']} flat + "
                     f"{a['n_finetunes_hierarchical']} hierarchical fine-tunings of {a['finetune_steps']} steps")
        lines += _attribution_table(artifact_path(run_dir, "attribute"), str(a["objective"]), n_show)
    ev = read_attrs(artifact_path(run_dir, "evaluate"))
    if ev:
        lines.append(f"  evaluate   {ev['seconds']:7.1f} s  {run_dir / 'report.md'}")
        lines += _evaluation_table(artifact_path(run_dir, "evaluate"))
    return "\n".join(lines)


def _evaluation_table(path: Path) -> list[str]:
    from ddm_hpc.report import LABELS, ORDER

    lines = ["  method                      Dist1x100   Dist2   Dist3     LDS   online s"]
    with open_read(path) as f:
        for name in [m for m in ORDER if m in f["methods"]]:
            g = f["methods"][name]
            a = g.attrs
            lines.append(f"  {LABELS[name]:26s} {a['dist1']:9.2f} {a['dist2']:7.3f} {a['dist3']:7.4f} "
                         f"{a['lds']:7.3f} {float(g['seconds'][()]):10.1f}")
        ref = f["reference"].attrs
        for row in ("oracle", "noise floor (seed reruns)"):
            if f"{row}/dist1" in ref:
                lines.append(f"  {row:26s} {ref[row + '/dist1']:9.2f} {ref[row + '/dist2']:7.3f} "
                             f"{ref[row + '/dist3']:7.4f}")
    return lines


def _attribution_table(path: Path, objective: str, n_show: int) -> list[str]:
    with open_read(path) as f:
        scores = f["scores"][()]
        top = f["top_clusters"][()]
        qi, ql, qp = f["query_index"][()], f["query_label"][()], f["query_pred"][()]
        cls_of, size = f["clusters/class"][()], f["clusters/size"][()]
        hier = {k: f["hierarchy"][k][()] for k in f["hierarchy"]} if "hierarchy" in f else None
    lines = [f"top clusters by {objective} (score = effect of removing the cluster; larger = more responsible):"]
    for r in range(min(n_show, len(scores))):
        head = f"test[{qi[r]}] label {ql[r]} pred {qp[r]}" if len(scores) == len(qi) else "query batch"
        tops = "  ".join(f"#{k} (class {cls_of[k]}, {size[k]} imgs, {scores[r, k]:+.4f})" for k in top[r, :3])
        line = f"  {head}: {tops}"
        if hier is not None:
            line += f"  | hierarchical: class {hier['class'][r]} -> #{hier['cluster'][r]}"
        lines.append(line)
    return lines


def load_saved_config(run_dir: str | Path) -> dict:
    """The config a run directory was last run with ({} if none)."""
    p = Path(run_dir) / "config.json"
    return json.loads(p.read_text()) if p.exists() else {}


__all__ = ["run_stages", "summary", "load_saved_config"]
