"""Stage ``evaluate``: exact leave-cluster-out retraining, every attribution method scored against it.

The retrainings (:func:`retrain_jobs`: base, leave-one-out x seeds, noise seeds, LDS subsets x
seeds; each with ``ddm_hpc.retrain``) run through the job layer (:func:`ddm_hpc.launch.run_sharded`;
local processes or a SLURM array), one shard per retrained model, merged into ``groundtruth.h5`` keyed
by what the retrainings depend on (:func:`retrain_key`), so a rerun with other methods retrains
nothing and an interrupted one redoes only missing shards. Then every ``--methods`` entry (the method
registry, ``ddm_hpc.methods``) is scored on the same queries and clusters with the metrics of
``ddm_hpc.metrics``; the variant runs the methods declare (:func:`variants`) are made by the pipeline
before this stage runs.

``evaluation.h5`` holds the ground truth (``gt/*``, layout in ``ddm_hpc.retrain``), the LDS subsets
(``gt/masks``, ``gt/mask_outputs``), every method's scores (``methods/<name>``), the reference rows and
Table 4; ``report.md`` is written from it alone (``ddm_hpc.report``). With several removal protocols
(``--gt-removal drop,zero-weight``) or kept fractions (``--lds-alphas 0.9``) the headline datasets
above are the first protocol at ``--alpha``, and also
  gt/protocols/<removal>/outputs              [n_removed, Q, L] that protocol's leave-one-outs
  gt/protocols/<removal>/alpha_<i>/masks      bool [n_masks, K] (attrs alpha), outputs [n_masks, Q, L]
  methods/<name> attrs '<removal>/<metric>', '<removal>/lds@<alpha>' (+ '_sem')
  reference attrs 'protocols:<removal>/<row>/<metric>', 'protocols:apart/dist1', 'protocols:apart/rank'.

Room: a stage (imports ``config``, ``context``, ``data``, ``importer``, ``launch``, ``methods``, ``metrics``, ``report``,
``retrain``, ``storage``, ``unlearn``, ``variants``).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from ddm_hpc.config import Config, EvaluateConfig
from ddm_hpc.context import RunContext
from ddm_hpc.data import DatasetBundle
from ddm_hpc.errors import StageError
from ddm_hpc.importer import check_retrainable
from ddm_hpc.launch import run_sharded, shard_key, shard_range
from ddm_hpc.methods import REGISTRY, MethodResult, resolve, score_methods
from ddm_hpc.metrics import (METRICS, gt_objectives, located_clusters, located_values, mean_sem, oracle_values,
                             predicted_subset_effect, random_subset_masks, spearman)
from ddm_hpc.report import FROM_THETA_0, method_label, method_order, write_report
from ddm_hpc.retrain import GroundTruth, fill_ground_truth, query_probs, retrain_without
from ddm_hpc.storage import (ParamTable, artifact_path, atomic_h5, create_dataset, intact, open_read, read_attrs,
                             upstream_uids, verify, write_provenance)
from ddm_hpc.unlearn import train_all_accuracy, unlearn_all_accuracy
from ddm_hpc.utils import generator, progress
from ddm_hpc.variants import Variant

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- retraining jobs
@dataclass(frozen=True)
class RetrainJob:
    """One exact retraining: leave out ``removed`` clusters, init and data order from seed + offset.

    kind: 'base' (full data, offset 0), 'loo' (one cluster), 'noise' (full data, offset >= 1) or
    'mask' (a random LDS subset); ``index`` is the cluster id, noise offset or mask row; ``removal``
    the protocol (``--gt-removal``); ``alpha`` the position in ``EvaluateConfig.alpha_list()`` of a mask's
    kept fraction.
    """

    kind: str
    index: int
    removed: tuple[int, ...]
    seed_offset: int
    removal: str = "drop"
    alpha: int = 0


def removed_clusters(cfg: Config, k: int) -> torch.Tensor:
    """Cluster ids retrained without one at a time: all K, or a seeded choice of --n-removed."""
    n = cfg.evaluate.removed_count(k)
    if n == k:
        return torch.arange(k)
    return torch.randperm(k, generator=generator(cfg.seed, 73))[:n].sort().values


def lds_masks(cfg: Config, k: int, alpha: int = 0) -> torch.Tensor:
    """bool [n_masks, K] random cluster subsets (True = kept) for the LDS at kept fraction
    ``cfg.evaluate.alpha_list()[alpha]``; the same subsets under every removal protocol."""
    ec = cfg.evaluate
    if ec.n_masks == 0:
        return torch.zeros(0, k, dtype=torch.bool)
    gen = generator(cfg.seed, 71) if alpha == 0 else generator(cfg.seed, 71, alpha)
    return random_subset_masks(k, ec.n_masks, ec.alpha_list()[alpha], gen)


def retrain_jobs(cfg: Config, k: int) -> list[RetrainJob]:
    """Every retraining the evaluate stage needs, in a fixed order (the shard layout depends on it).

    The headline protocol's jobs come first in the order runs made before ``--gt-removal`` and
    ``--lds-alphas`` existed use (base, leave-one-out, noise, LDS subsets), then its subsets at the
    further kept fractions, then every further protocol's leave-one-out and subsets (base and noise reruns
    remove nothing, so the protocols share them)."""
    ec = cfg.evaluate
    removals, n_alphas = ec.removal_list(), len(ec.alpha_list())

    def loo(removal: str) -> list[RetrainJob]:
        return [RetrainJob("loo", int(c), (int(c),), s, removal) for c in removed_clusters(cfg, k)
                for s in range(ec.gt_seeds)]

    def masks(removal: str, a: int) -> list[RetrainJob]:
        out = []
        for m, mask in enumerate(lds_masks(cfg, k, a)):
            rem = tuple(int(i) for i in torch.nonzero(~mask)[:, 0])
            out += [RetrainJob("mask", m, rem, s, removal, a) for s in range(ec.gt_seeds)]
        return out

    head = removals[0]
    jobs = [RetrainJob("base", 0, (), 0, head), *loo(head)]
    jobs += [RetrainJob("noise", s, (), s, head) for s in range(1, ec.noise_seeds + 1)]
    jobs += [j for a in range(n_alphas) for j in masks(head, a)]
    for removal in removals[1:]:
        jobs += loo(removal) + [j for a in range(n_alphas) for j in masks(removal, a)]
    return jobs


RETRAIN_OPTIONS = ("n_removed", "gt_seeds", "noise_seeds", "n_masks", "alpha")
ADDED_RETRAIN_OPTIONS = ("lds_alphas", "gt_removal")  # in the key only away from their defaults


def retrain_key(cfg: Config, query_pos: torch.Tensor) -> str:
    """Hash of everything the retrainings depend on: data/model/train/cluster options, the train and
    cluster artifacts, the retraining options of ``evaluate`` and the queries (not the methods)."""
    ec = cfg.evaluate
    opts = {k: getattr(ec, k) for k in RETRAIN_OPTIONS}
    opts.update({k: getattr(ec, k) for k in ADDED_RETRAIN_OPTIONS
                 if getattr(ec, k) != EvaluateConfig.__dataclass_fields__[k].default})
    extra = json.dumps({"evaluate": opts, "clusters": upstream_uids(cfg.runtime.out, "distill"),
                        "queries": query_pos.tolist()}, sort_keys=True)
    return shard_key(cfg, "cluster", extra)


def groundtruth_path(run_dir: str | Path) -> Path:
    """The merged retrainings (kept, so a rerun with other methods retrains nothing)."""
    return Path(run_dir) / "groundtruth.h5"


def retrain_task(cfg: Config, shard: int, n_shards: int, bundle: DatasetBundle | None = None
                 ) -> dict[str, np.ndarray]:
    """Job-layer task: the retrainings ``shard_range(n_jobs, shard, n_shards)`` of :func:`retrain_jobs`.

    Returns ``probs`` float32 [n, Q, L] (softmax on the queries), ``job`` int64 [n], ``seconds`` [n].
    """
    ctx = RunContext(cfg, bundle)
    bundle, device, assignment, query_x = ctx.bundle, ctx.device, ctx.assignment, ctx.query_x
    jobs = retrain_jobs(cfg, ctx.k)
    i0, i1 = shard_range(len(jobs), shard, n_shards)
    model = ctx.build_model().to(device)
    table = ParamTable.from_module(model)
    probs, secs = [], []
    for i in progress(range(i0, i1), f"retrain[{i0}:{i1} of {len(jobs)}]", cfg.runtime.progress and i1 - i0 > 1):
        t0 = time.perf_counter()
        job = jobs[i]
        flat = retrain_without(cfg, bundle, assignment, list(job.removed), job.seed_offset, device, job.removal)
        probs.append(query_probs(model, table, flat, query_x).numpy())
        secs.append(time.perf_counter() - t0)
    return {"probs": np.stack(probs).astype(np.float32), "job": np.arange(i0, i1, dtype=np.int64),
            "seconds": np.asarray(secs, dtype=np.float64)}


def merge_retrain(cfg: Config, paths: list[Path], bundle: DatasetBundle | None = None) -> Path:
    """Job-layer merge: every shard's retrainings, in job order, into ``RUN/groundtruth.h5``."""
    run_dir = Path(cfg.runtime.out)
    probs, jobs, secs = [], [], []
    for p in paths:
        with h5py.File(p, "r", locking=False) as f:
            probs.append(f["probs"][()])
            jobs.append(f["job"][()])
            secs.append(f["seconds"][()])
    job = np.concatenate(jobs)
    if not np.array_equal(job, np.arange(len(job))):
        raise StageError(f"retraining shards cover jobs {job.tolist()[:8]}...: delete {run_dir / 'shards'} and rerun")
    query_pos = RunContext(cfg).query_pos
    path = groundtruth_path(run_dir)
    with atomic_h5(path) as f:
        create_dataset(f, "probs", data=np.concatenate(probs))
        create_dataset(f, "seconds", data=np.concatenate(secs))
        f.attrs["key"] = retrain_key(cfg, query_pos)
    return path


def run_retrainings(cfg: Config, query_pos: torch.Tensor, bundle: DatasetBundle | None = None) -> Path:
    """Every retraining through the job layer, one shard per retrained model (resumable); reuses a
    current ``groundtruth.h5``."""
    run_dir = Path(cfg.runtime.out)
    key = retrain_key(cfg, query_pos)
    path = groundtruth_path(run_dir)
    attrs = read_attrs(path)
    if attrs is not None and attrs.get("key") == key and intact(path):
        log.info("evaluate: %s is current, no retraining needed", path)
        return path
    n_jobs = len(retrain_jobs(cfg, RunContext(cfg).k))
    one_each = dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, shards=n_jobs))
    return run_sharded("evaluate", one_each, retrain_task, n_jobs, merge_retrain, stage="cluster",
                       key_extra=key, context={"bundle": bundle} if bundle is not None else None)


@dataclass
class Retrained:
    """Merged retraining results (see :func:`load_retrained`).

    ``gt``, ``masks`` and ``mask_outputs`` are the headline protocol at ``--alpha`` (what Table 1 scores);
    ``outputs`` and ``subsets`` hold every protocol and kept fraction (:meth:`view` selects one).
    """

    gt: GroundTruth
    removed: torch.Tensor  # int64 [n_removed]
    masks: torch.Tensor  # bool [n_masks, K]
    mask_outputs: torch.Tensor  # float32 [n_masks, Q, L]
    seconds_per_retrain: float
    outputs: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # removal -> [n_removed, Q, L]
    subsets: dict[tuple[str, float], tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=dict)

    def view(self, removal: str, alpha: float) -> Retrained:
        """The same retrainings with ``removal``'s leave-one-outs and its subsets at kept fraction ``alpha``."""
        masks, mask_outputs = self.subsets[(removal, alpha)]
        gt = dataclasses.replace(self.gt, outputs=self.outputs[removal])
        return dataclasses.replace(self, gt=gt, masks=masks, mask_outputs=mask_outputs)


def load_retrained(cfg: Config, k: int, query_pos: torch.Tensor) -> Retrained:
    """Split ``groundtruth.h5`` (job order of :func:`retrain_jobs`) into base, leave-outs, noise, subsets."""
    path = groundtruth_path(cfg.runtime.out)
    attrs = read_attrs(path)
    if attrs is None or attrs.get("key") != retrain_key(cfg, query_pos):
        raise StageError(f"{path} is missing or was made for other retrainings: rerun `ddm-hpc evaluate`")
    verify(path, "evaluate")
    with h5py.File(path, "r", locking=False) as f:
        probs = torch.from_numpy(f["probs"][()])
        secs = f["seconds"][()]
    jobs = retrain_jobs(cfg, k)
    ec = cfg.evaluate
    q, n_cls = probs.shape[1:]
    removed = removed_clusters(cfg, k)

    def rows(kind: str, removal: str | None = None, alpha: int | None = None) -> torch.Tensor:
        pick = [i for i, j in enumerate(jobs) if j.kind == kind and removal in (None, j.removal)
                and alpha in (None, j.alpha)]
        return probs[pick]

    outputs, subsets = {}, {}
    for removal in ec.removal_list():
        outputs[removal] = rows("loo", removal).view(len(removed), ec.gt_seeds, q, n_cls).mean(1)
        for a, alpha in enumerate(ec.alpha_list()):
            masks = lds_masks(cfg, k, a)
            subsets[(removal, alpha)] = (masks, rows("mask", removal, a).view(len(masks), ec.gt_seeds, q,
                                                                              n_cls).mean(1))
    head = ec.removal_list()[0]
    gt = GroundTruth(probs[0], outputs[head], rows("noise"), ec.gt_seeds, float(secs.sum()))
    masks, mask_out = subsets[(head, ec.alpha)]
    return Retrained(gt, removed, masks, mask_out, float(secs.mean()), outputs, subsets)


# ----------------------------------------------------------------------------- metrics
def method_metrics(res, r: Retrained, labels: torch.Tensor) -> dict[str, object]:
    """Eq. 10 metrics (mean and s.e.m. over queries) and the LDS of one :class:`~ddm_hpc.methods.MethodResult`.

    Returns:
        {'dist1', 'dist2', 'dist3', 'lds': (mean, sem), 'located': int64 [3, Q] cluster ids,
         'lds_per_query': float64 [Q]}. Dist1 is x100 as in the paper's tables.
    """
    out: dict[str, object] = {}
    for m in METRICS:
        out[m] = mean_sem(located_values(res.for_metric(m), r.gt.outputs, r.removed, r.gt.base, labels)[m])
    out["located"] = torch.stack([r.removed[located_clusters(res.for_metric(m), r.removed)] for m in METRICS])
    if len(r.masks):
        # a removal raises the query's CE by the removed clusters' scores: predict with the removed sum
        pred = predicted_subset_effect(res.scores, ~r.masks)
        actual = gt_objectives(r.mask_outputs, r.gt.base, labels)["dist2"].float()
        per_q = spearman(pred, actual)
        out["lds"] = mean_sem(per_q)
        out["lds_per_query"] = per_q
    else:
        out["lds"] = (float("nan"), float("nan"))
        out["lds_per_query"] = torch.full((len(labels),), float("nan"))
    return out


def reference_rows(r: Retrained, labels: torch.Tensor) -> dict[str, dict[str, tuple[float, float]]]:
    """Rows the report prints beside the methods: the oracle, the mean over all clusters, the noise floor."""
    objs = gt_objectives(r.gt.outputs, r.gt.base, labels)
    scale = {"dist1": 100.0, "dist2": 1.0, "dist3": 1.0}
    oracle = oracle_values(r.gt.outputs, r.removed, r.gt.base, labels)
    rows = {"oracle": {m: mean_sem(oracle[m]) for m in METRICS},
            "mean over clusters": {m: mean_sem(objs[m].mean(0) * scale[m]) for m in METRICS}}
    if len(r.gt.noise):
        nz = gt_objectives(r.gt.noise, r.gt.base, labels)
        rows["noise floor (seed reruns)"] = {m: mean_sem(nz[m].mean(0) * scale[m]) for m in METRICS}
    return rows


def protocol_metrics(results: dict[str, MethodResult], r: Retrained, labels: torch.Tensor, cfg: Config
                     ) -> dict[str, dict[str, tuple[float, float]]]:
    """Every method under every removal protocol and LDS kept fraction: name -> {'<removal>/<metric>': (mean, sem),
    '<removal>/lds@<alpha>': (mean, sem)}."""
    ec = cfg.evaluate
    out: dict[str, dict[str, tuple[float, float]]] = {name: {} for name in results}
    for removal in ec.removal_list():
        for a, alpha in enumerate(ec.alpha_list()):
            view = r.view(removal, alpha)
            for name, res in results.items():
                m = method_metrics(res, view, labels)
                if a == 0:
                    out[name].update({f"{removal}/{metric}": m[metric] for metric in METRICS})
                out[name][f"{removal}/lds@{alpha:g}"] = m["lds"]
    return out


def protocol_reference(r: Retrained, labels: torch.Tensor, cfg: Config) -> dict[str, tuple[float, float]]:
    """Reference rows per protocol ('<removal>/<row>/<metric>') and, with two protocols, how far apart their
    retrained outputs lie: 'apart/dist1' (x100, L2 between the two softmaxes, mean over clusters and queries)
    and 'apart/rank' (per query, Spearman across clusters between the two protocols' CE changes)."""
    ec = cfg.evaluate
    out: dict[str, tuple[float, float]] = {}
    for removal in ec.removal_list():
        for row, vals in reference_rows(r.view(removal, ec.alpha), labels).items():
            out.update({f"{removal}/{row}/{metric}": v for metric, v in vals.items()})
    removals = ec.removal_list()
    if len(removals) == 2:
        a, b = (r.outputs[x].double() for x in removals)
        out["apart/dist1"] = mean_sem(((a - b).norm(dim=-1) * 100.0).mean(0))
        ce = {x: gt_objectives(r.outputs[x], r.gt.base, labels)["dist2"] for x in removals}
        out["apart/rank"] = mean_sem(spearman(ce[removals[0]], ce[removals[1]]))
    return out


def table4(ctx: RunContext, results: dict[str, MethodResult]) -> dict[str, float]:
    """Paper Table 4: test accuracy of theta_0, theta_tau, theta_tau fine-tuned on all of this run's synsets (DDM),
    and on all synsets of each scored method that declares a Table 4 column; for forward-matched synsets also
    theta_0 *trained* on all of them (``<name>/from theta_0``: the paper's protocol for DDM-match)."""
    with open_read(artifact_path(ctx.run_dir, "train")) as f:
        accs = f["trajectory/test_accuracy"][()]
    out = {"theta_0": float(accs[0]), "theta_tau": float(accs[-1]), "ddm": unlearn_all_accuracy(ctx)}
    for name in results:
        if name != "ddm" and REGISTRY[name].table4:
            synsets = RunContext(REGISTRY[name].synset_run(ctx.cfg), ctx.bundle, ctx.device)
            out[name] = unlearn_all_accuracy(ctx, synsets)
            if synsets.cfg.distill.method == "ddm-match":
                out[f"{name}/{FROM_THETA_0}"] = train_all_accuracy(ctx, synsets)
    return out


def check(cfg: Config) -> None:
    """Every ``--methods`` name is registered, and an imported run states its recipe (one-line errors before anything
    runs)."""
    for m in resolve(cfg.evaluate.method_list()):
        m.check(cfg)
    check_retrainable(cfg)


def variants(cfg: Config) -> list[Variant]:
    """The variant runs the ``--methods`` read (made by the pipeline before the stage runs)."""
    return [v for m in resolve(cfg.evaluate.method_list()) for v in m.variants(cfg)]


# ----------------------------------------------------------------------------- the stage
def run(cfg: Config, bundle: DatasetBundle | None = None) -> Path:
    """Retrain exactly, score every method, write ``evaluation.h5`` and ``report.md`` (+ PNGs).

    The retrainings run on the configured executor (SLURM arrays included); scoring the methods (on the
    variant runs the pipeline made) and the report run in this process."""
    t0 = time.perf_counter()
    ctx = RunContext(cfg, bundle)
    run_dir, query_pos, k, labels, queries = ctx.run_dir, ctx.query_pos, ctx.k, ctx.query_y, ctx.queries
    n_jobs = len(retrain_jobs(cfg, k))
    log.info("evaluate: %d exact retrainings (K=%d leave-one-out x %d seeds, %d noise seeds, %d LDS subsets per kept "
             "fraction %s; removal %s), %d queries", n_jobs, len(removed_clusters(cfg, k)), cfg.evaluate.gt_seeds,
             cfg.evaluate.noise_seeds, cfg.evaluate.n_masks, ",".join(f"{a:g}" for a in cfg.evaluate.alpha_list()),
             cfg.evaluate.gt_removal, len(query_pos))
    run_retrainings(cfg, query_pos, ctx.bundle)
    retrained = load_retrained(cfg, k, query_pos)
    retrain_seconds = retrained.gt.seconds  # summed over the retrainings, whenever they ran
    drift = float((retrained.gt.base - torch.from_numpy(queries["base_probs"])).abs().max())
    if drift > 1e-4:
        log.warning("evaluate: the full-data retraining differs from theta_tau by %.2g in softmax: training is not "
                    "deterministic on this device, so ground truth carries that noise too", drift)

    results = score_methods(ctx, cfg.evaluate.method_list())
    metrics = {name: method_metrics(res, retrained, labels) for name, res in results.items()}
    refs = reference_rows(retrained, labels)
    ec = cfg.evaluate
    several = len(ec.removal_list()) * len(ec.alpha_list()) > 1
    by_protocol = protocol_metrics(results, retrained, labels, cfg) if several else {}
    protocol_refs = protocol_reference(retrained, labels, cfg) if several else {}
    t4 = table4(ctx, results)

    path = artifact_path(run_dir, "evaluate")
    with atomic_h5(path) as f:
        fill_ground_truth(f, retrained.gt, retrained.removed, queries["query_index"], labels)
        create_dataset(f, "query_position", data=query_pos.numpy())
        create_dataset(f["gt"], "masks", data=retrained.masks.numpy())
        create_dataset(f["gt"], "mask_outputs", data=retrained.mask_outputs.float().numpy())
        f["gt"].attrs.update(seconds=retrain_seconds, seconds_per_retrain=retrained.seconds_per_retrain,
                             base_drift=drift, n_retrainings=n_jobs)
        if several:  # every protocol's leave-one-outs and every kept fraction's subsets
            f["gt"].attrs.update(removals=",".join(ec.removal_list()), alphas=np.asarray(ec.alpha_list()))
            for removal, outs in retrained.outputs.items():
                g = f.create_group(f"gt/protocols/{removal}")
                create_dataset(g, "outputs", data=outs.float().numpy())
                for a, alpha in enumerate(ec.alpha_list()):
                    masks, mask_out = retrained.subsets[(removal, alpha)]
                    sub = g.create_group(f"alpha_{a}")
                    sub.attrs["alpha"] = alpha
                    create_dataset(sub, "masks", data=masks.numpy())
                    create_dataset(sub, "outputs", data=mask_out.float().numpy())
        for name, res in results.items():
            m = REGISTRY[name]
            g = f.create_group(f"methods/{name}")
            create_dataset(g, "scores", data=res.scores.float().numpy())
            create_dataset(g, "seconds", data=np.float64(res.seconds))
            create_dataset(g, "offline_seconds", data=np.float64(res.offline_seconds))
            create_dataset(g, "located", data=metrics[name]["located"].numpy())
            create_dataset(g, "lds_per_query", data=metrics[name]["lds_per_query"].float().numpy())
            for obj, s in res.per_objective.items():
                create_dataset(g, f"objectives/{obj}", data=s.float().numpy())
            g.attrs["note"] = res.note
            g.attrs["dist1_by"] = res.dist1_by  # objectives/dist1 holds the Dist1 scores whichever rule locates
            g.attrs.update(label=m.label, scatter=m.scatter, heatmap=m.heatmap, table4=m.table4)
            for metric in (*METRICS, "lds"):
                g.attrs[metric], g.attrs[f"{metric}_sem"] = metrics[name][metric]
            for key, (mean, sem) in by_protocol.get(name, {}).items():
                g.attrs[key], g.attrs[f"{key}_sem"] = mean, sem
        r = f.create_group("reference")
        for row, vals in refs.items():
            for metric, (mean, sem) in vals.items():
                r.attrs[f"{row}/{metric}"], r.attrs[f"{row}/{metric}_sem"] = mean, sem
        for key, (mean, sem) in protocol_refs.items():
            r.attrs[f"protocols:{key}"], r.attrs[f"protocols:{key}_sem"] = mean, sem
        f.create_group("table4").attrs.update(t4)
        write_provenance(f, cfg, "evaluate", time.perf_counter() - t0)
    report = write_report(path, run_dir / "report.md", plots=cfg.evaluate.plots)
    log.info("evaluate: %d methods against %d retrainings in %.1f s -> %s, %s", len(results), n_jobs,
             time.perf_counter() - t0, path, report)
    return path


def summary(run_dir: str | Path, n_show: int = 10) -> list[str]:
    """The ``ddm-hpc show`` lines of ``evaluation.h5``: one row per method, then the reference rows."""
    path = artifact_path(run_dir, "evaluate")
    ev = read_attrs(path)
    if not ev:
        return []
    lines = [f"  evaluate   {ev['seconds']:7.1f} s  {Path(run_dir) / 'report.md'}",
             "  method                      Dist1x100   Dist2   Dist3     LDS   online s"]
    with open_read(path) as f:
        for name in method_order(f["methods"]):
            g = f["methods"][name]
            a = g.attrs
            lines.append(f"  {method_label(name, a):26s} {a['dist1']:9.2f} {a['dist2']:7.3f} {a['dist3']:7.4f} "
                         f"{a['lds']:7.3f} {float(g['seconds'][()]):10.1f}")
        ref = f["reference"].attrs
        for row in ("oracle", "noise floor (seed reruns)"):
            if f"{row}/dist1" in ref:
                lines.append(f"  {row:26s} {ref[row + '/dist1']:9.2f} {ref[row + '/dist2']:7.3f} "
                             f"{ref[row + '/dist3']:7.4f}")
    return lines
