"""Stage ``attribute``: perturb the synset, fine-tune, measure the objective, fit W (Eq. 7-9, 11).

For each perturbation p in {0,1}^K (p_k = 0: cluster k removed) the trained model theta_tau is
fine-tuned on the synsets of the removed clusters (Eq. 9, :class:`ddm_hpc.unlearn.Unlearner`).
The objective o(p) of each fine-tuned model is then fit by weighted least squares with the
removal indicators z = 1 - p:

    o(p) ~ b + sum_k z_k A_k,      weights beta_p by the number of zeros,     (Eq. 8)

with the unperturbed model (p = 1, no fine-tuning) as one more row. ``scores`` = A: the effect
of removing a cluster on the objective; larger = more responsible (for dist3, whose value
falls as the output changes, the largest score marks the *least* influential cluster, as in
the paper). The paper's W on p equals -A.

Objectives per query (Eq. 10 evaluated on the fine-tuned model instead of a retrained one):
  dist1 = |softmax(p) - softmax(theta_tau)|_2, dist2 = CE(softmax(p), y), dist3 = 1/(1 + dist1),
  global = sum of dist2 over a validation set (Eq. 14).

Hierarchical search (Eq. 11): leave-one-out over the L class synsets picks a class per query,
then leave-one-out over that class's C cluster synsets picks the cluster: L + C fine-tunings
per distinct chosen class instead of L x C.

Sharding (``--shards``): the fine-tunings are the work. Each part (flat: the |P| perturbations;
class: the L class leave-one-outs; within a chosen class: its C leave-one-outs) is cut into
blocks of ``--batch-models`` perturbations (``AttributeConfig.block``; a block is split further
only if memory is short), and tasks take contiguous runs of blocks. Phase 1 (``attribute-flat``)
runs the flat and class parts; phase 2 (``attribute-hier``) the within-class parts of the
classes phase 1 chose; the merge fits W and writes ``attribution.h5``. A block is fine-tuned the
same way whichever task runs it, so the artifact is the same for any shard count.

Room: a stage (imports ``config``, ``context``, ``data``, ``launch``, ``metrics``, ``models``, ``storage``, ``synsets``,
``unlearn``).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from ddm_hpc.config import AttributeConfig, Config
from ddm_hpc.context import RunContext
from ddm_hpc.data import DatasetBundle
from ddm_hpc.errors import ConfigError, StageError
from ddm_hpc.launch import remove_shards, resolve_shards, run_sharded, shard_paths, shard_range
from ddm_hpc.metrics import objective_values
from ddm_hpc.models import forward_with
from ddm_hpc.storage import artifact_path, atomic_h5, create_dataset, open_read, read_attrs, write_provenance
from ddm_hpc.synsets import SynsetLevel, read_synsets
from ddm_hpc.unlearn import Unlearner
from ddm_hpc.utils import generator

log = logging.getLogger(__name__)
OBJECTIVES = ("dist1", "dist2", "dist3", "global")


# ----------------------------------------------------------------------------- perturbations + WLS
def loo_perturbations(k: int) -> torch.Tensor:
    """uint8 [K, K]: row i removes cluster i only (1 = kept)."""
    return (1 - torch.eye(k, dtype=torch.uint8))


def random_perturbations(k: int, n: int, removal_prob: float, gen: torch.Generator) -> torch.Tensor:
    """uint8 [n, K] Bernoulli masks, each removing at least one cluster (1 = kept)."""
    p = (torch.rand(n, k, generator=gen) >= removal_prob).to(torch.uint8)
    for i in range(n):
        while p[i].all():
            p[i] = (torch.rand(k, generator=gen) >= removal_prob).to(torch.uint8)
    return p


def beta_weights(perturbations: torch.Tensor, kind: str) -> torch.Tensor:
    """float64 [n] weights by the number of zeros z of each row, scaled to max 1.

    inverse: 1/z; uniform: 1; shap: the Shapley kernel (K-1) / (C(K,z) z (K-z)), with z = K
    rows (all removed) given the largest finite weight.
    """
    k = perturbations.shape[1]
    z = (perturbations == 0).sum(1).double()
    if kind == "uniform":
        w = torch.ones_like(z)
    elif kind == "inverse":
        w = 1.0 / z.clamp(min=1)
    elif kind == "shap":
        logc = torch.lgamma(torch.tensor(k + 1.0)) - torch.lgamma(z + 1) - torch.lgamma(k - z + 1)
        w = (k - 1) / (torch.exp(logc) * z * (k - z))
        finite = torch.isfinite(w) & (w > 0)
        w[~finite] = w[finite].max() if finite.any() else 1.0
    else:
        raise ConfigError(f"--beta must be inverse, uniform or shap; got {kind!r}")
    return w / w.max()


def fit_wls(perturbations: torch.Tensor, outcomes: torch.Tensor, beta: torch.Tensor,
            base: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted least squares of outcomes on removal indicators (Eq. 8).

    Args:
        perturbations: {0,1} [n, K] (1 = kept).
        outcomes: [n, Q] objective of each perturbed model for Q queries.
        beta: [n] non-negative weights.
        base: optional [Q] objective of the unperturbed model, added as a row of weight max(beta).

    Returns:
        (scores [Q, K], intercept [Q]) in float64: outcome ~ intercept + (1 - p) @ scores.
    """
    z = 1.0 - perturbations.double()
    y = outcomes.double()
    w = beta.double()
    if base is not None:
        z = torch.cat([torch.zeros(1, z.shape[1], dtype=z.dtype), z])
        y = torch.cat([base.double()[None], y])
        w = torch.cat([w.max()[None], w])
    design = torch.cat([torch.ones(len(z), 1, dtype=z.dtype), z], 1)
    sw = w.sqrt()[:, None]
    sol = torch.linalg.lstsq(design * sw, y * sw, driver="gelsd").solution  # [K+1, Q]
    return sol[1:].T.contiguous(), sol[0]


# ----------------------------------------------------------------------------- objectives
def all_objectives(probs: torch.Tensor, base: torch.Tensor, labels: torch.Tensor, n_q: int, mode: str
                   ) -> dict[str, torch.Tensor]:
    """Objectives of [M, n_q + n_val, L] outputs: per-query ones plus 'global' over the val rows."""
    out = objective_values(probs[:, :n_q], base[:n_q], labels[:n_q], mode)
    if probs.shape[1] > n_q:
        val = objective_values(probs[:, n_q:], base[n_q:], labels[n_q:], "single")["dist2"]
        out["global"] = val.sum(1, keepdim=True)
    return out


# ----------------------------------------------------------------------------- the stage
@dataclass
class Scorer:
    """The objectives of fine-tuned models and their WLS fit: the queries and validation images, theta_tau's
    outputs on them (``base``) and the fit's options."""

    eval_x: torch.Tensor  # [n_q + n_val, C, H, W]
    eval_y: torch.Tensor  # [n_q + n_val]
    base: torch.Tensor  # [n_q + n_val, L] softmax of theta_tau
    n_q: int
    query_mode: str
    beta: str

    def fit(self, perturbations: torch.Tensor, probs: torch.Tensor
            ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """WLS fit of every objective of ``probs`` [M, E, L]: (scores {obj: [Q, G]}, intercepts {obj: [Q]})."""
        objs = all_objectives(probs, self.base, self.eval_y, self.n_q, self.query_mode)
        base_objs = all_objectives(self.base[None], self.base, self.eval_y, self.n_q, self.query_mode)
        beta = beta_weights(perturbations, self.beta)
        scores, intercepts = {}, {}
        for name, o in objs.items():
            s, b = fit_wls(perturbations, o, beta, base_objs[name][0])
            scores[name], intercepts[name] = s.float(), b.float()
        return scores, intercepts


def select_queries(acfg: AttributeConfig, n_test: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(query positions [n_q], validation positions [n_val]) in the test subset, disjoint."""
    perm = torch.randperm(n_test, generator=generator(seed, 41))
    explicit = acfg.query_positions()
    if explicit is not None:
        bad = [i for i in explicit if not 0 <= i < n_test]
        if bad:
            raise ConfigError(f"--query-index {bad} outside the test subset of {n_test} images: use 0..{n_test - 1}")
        queries = torch.tensor(explicit, dtype=torch.long)
    else:
        if acfg.n_queries > n_test:
            raise ConfigError(f"--n-queries {acfg.n_queries} exceeds the {n_test} test images: lower it or raise --n-test")
        queries = perm[:acfg.n_queries]
    rest = perm[~torch.isin(perm, queries)]
    if acfg.objective == "global" and acfg.n_val == 0:
        raise ConfigError("--objective global needs --n-val > 0 validation images")
    return queries, rest[:acfg.n_val]


def choose_classes(scorer: Scorer, class_pert: torch.Tensor, class_probs: torch.Tensor, primary: str) -> torch.Tensor:
    """int64 [Q]: per query, the class whose removal scores highest on the primary objective."""
    scores, _ = scorer.fit(class_pert, class_probs)
    return scores[primary].argmax(1)


def hierarchy_result(scorer: Scorer, primary: str, class_pert: torch.Tensor, class_probs: torch.Tensor,
                     cluster_class: torch.Tensor, within: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``hierarchy/`` datasets from the class-level outputs and each chosen class's LOO outputs."""
    cls_scores, _ = scorer.fit(class_pert, class_probs)
    cs = cls_scores[primary]  # [Q, L]
    chosen = cs.argmax(1)
    c_max = int(torch.bincount(cluster_class).max())
    inside = torch.full((len(cs), c_max), float("nan"))
    best = torch.full((len(cs),), -1, dtype=torch.long)
    n_ft = len(class_pert)
    for c in chosen.unique().tolist():
        ids = torch.nonzero(cluster_class == c)[:, 0]
        s, _ = scorer.fit(loo_perturbations(len(ids)), within[c])
        rows = torch.nonzero(chosen == c)[:, 0]
        inside[rows, :len(ids)] = s[primary][rows]
        best[rows] = ids[s[primary][rows].argmax(1)]
        n_ft += len(ids)
    return {"class_scores": cs, "class": chosen, "cluster_scores": inside, "cluster": best,
            "n_finetunes": torch.tensor(n_ft)}


# ----------------------------------------------------------------------------- the stage, sharded
@dataclass
class Part:
    """A list of perturbations of one synset level (optionally a subset of its groups)."""

    name: str  # flat, class, or within<c>
    level: str  # cluster or class
    ids: torch.Tensor | None  # groups of the level the perturbations index (None = all)
    perturbations: torch.Tensor  # uint8 [M, G] (1 = kept)


@dataclass
class AttributeSetup:
    """Everything the tasks and the merge of the stage share, built from (cfg, data)."""

    unlearner: Unlearner
    scorer: Scorer
    q_pos: torch.Tensor
    v_pos: torch.Tensor
    assignment: np.ndarray
    cluster_class: torch.Tensor
    sizes: np.ndarray
    levels: dict[str, SynsetLevel]

    def level(self, part: Part) -> SynsetLevel:
        lv = self.levels[part.level]
        return lv if part.ids is None else lv.subset(part.ids)

    def finetune(self, part: Part, rows: slice, desc: str) -> torch.Tensor:
        """Softmax outputs float32 [m, E, L] on the queries and validation images of ``part``'s perturbation rows."""
        return self.unlearner.unlearn(self.level(part), part.perturbations, self.scorer.eval_x, rows, desc)


def attribute_setup(cfg: Config, bundle: DatasetBundle | None = None) -> AttributeSetup:
    """Load the target theta_tau, the queries, the base outputs and the synsets."""
    acfg = cfg.attribute
    ctx = RunContext(cfg, bundle)
    unlearner = Unlearner.of_run(ctx)
    with open_read(artifact_path(cfg.runtime.out, "cluster")) as f:
        assignment = f["clusters/assignment"][()]
        cluster_class = torch.from_numpy(f["clusters/class"][()])
        sizes = f["clusters/size"][()]
    q_pos, v_pos = select_queries(acfg, len(ctx.bundle.y_test), cfg.seed)
    eval_pos = torch.cat([q_pos, v_pos])
    eval_x, eval_y = ctx.bundle.x_test[eval_pos], ctx.bundle.y_test[eval_pos]
    with torch.no_grad():
        base = forward_with(unlearner.model, unlearner.theta, eval_x.to(ctx.device),
                            unlearner.buffers).softmax(-1).float().cpu()
    scorer = Scorer(eval_x, eval_y, base, len(q_pos), acfg.query_mode, acfg.beta)
    levels = {"cluster": read_synsets(cfg.runtime.out, "cluster")}  # read once: flat and hierarchical use it
    if acfg.search in ("hierarchical", "both"):
        levels["class"] = read_synsets(cfg.runtime.out, "class")
    return AttributeSetup(unlearner, scorer, q_pos, v_pos, assignment, cluster_class, sizes, levels)


def _n_classes(cfg: Config) -> int:
    return int((read_attrs(artifact_path(cfg.runtime.out, "train")) or {}).get("num_classes", 0))


def flat_parts(cfg: Config) -> list[Part]:
    """Phase 1: the flat perturbations and (for the hierarchical search) the class leave-one-outs."""
    acfg = cfg.attribute
    with open_read(artifact_path(cfg.runtime.out, "cluster")) as f:
        k = len(f["clusters/class"])
    parts = []
    if acfg.search in ("flat", "both"):
        if acfg.perturbation == "loo":
            pert = loo_perturbations(k)
        else:
            pert = random_perturbations(k, acfg.perturbation_count(k), acfg.removal_prob, generator(cfg.seed, 43))
        parts.append(Part("flat", "cluster", None, pert))
    if acfg.search in ("hierarchical", "both"):
        parts.append(Part("class", "class", None, loo_perturbations(_n_classes(cfg))))
    return parts


def hier_parts(chosen: torch.Tensor, cluster_class: torch.Tensor) -> list[Part]:
    """Phase 2: leave-one-out within each chosen class."""
    parts = []
    for c in chosen.unique().tolist():
        ids = torch.nonzero(cluster_class == c)[:, 0]
        parts.append(Part(f"within{c}", "cluster", ids, loo_perturbations(len(ids))))
    return parts


def blocks(cfg: Config, parts: list[Part]) -> list[tuple[int, int, int]]:
    """Work items: (part index, row0, row1) blocks of ``AttributeConfig.block`` perturbations."""
    size = cfg.attribute.block
    return [(i, r0, min(r0 + size, len(p.perturbations))) for i, p in enumerate(parts)
            for r0 in range(0, len(p.perturbations), size)]


def _finetune_shard(cfg: Config, shard: int, n_shards: int, setup: AttributeSetup, parts: list[Part]
                    ) -> dict[str, np.ndarray]:
    """Fine-tune this shard's blocks: ``<part>/rows`` int64 [m] and ``<part>/probs`` float32 [m, E, L]."""
    work = blocks(cfg, parts)
    i0, i1 = shard_range(len(work), shard, n_shards)
    rows: dict[str, list[np.ndarray]] = {}
    probs: dict[str, list[np.ndarray]] = {}
    seconds: dict[str, float] = {}
    for pi, r0, r1 in work[i0:i1]:
        part = parts[pi]
        t0 = time.perf_counter()
        out = setup.finetune(part, slice(r0, r1), f"fine-tune[{part.name} {r0}:{r1}]")
        rows.setdefault(part.name, []).append(np.arange(r0, r1))
        probs.setdefault(part.name, []).append(out.numpy())
        seconds[part.name] = seconds.get(part.name, 0.0) + time.perf_counter() - t0
    result: dict[str, np.ndarray] = {}
    for name in rows:
        result[f"{name}/rows"] = np.concatenate(rows[name])
        result[f"{name}/probs"] = np.concatenate(probs[name])
        result[f"{name}/seconds"] = np.float64(seconds[name])
    return result


def attribute_flat_shard(cfg: Config, shard: int, n_shards: int, bundle: DatasetBundle | None = None,
                         setup: AttributeSetup | None = None) -> dict[str, np.ndarray]:
    """Phase-1 task: this shard's blocks of the flat and class parts."""
    setup = setup or attribute_setup(cfg, bundle)
    return _finetune_shard(cfg, shard, n_shards, setup, flat_parts(cfg))


def attribute_hier_shard(cfg: Config, shard: int, n_shards: int, bundle: DatasetBundle | None = None,
                         setup: AttributeSetup | None = None) -> dict[str, np.ndarray]:
    """Phase-2 task: this shard's blocks of the within-class leave-one-outs of the chosen classes."""
    setup = setup or attribute_setup(cfg, bundle)
    parts = hier_parts(_chosen(cfg, setup), setup.cluster_class)
    return _finetune_shard(cfg, shard, n_shards, setup, parts)


def gather(paths: list[Path], parts: list[Part]) -> dict[str, torch.Tensor]:
    """Per part, the probs of all its rows in order (checks each row is there exactly once)."""
    got: dict[str, tuple[list, list]] = {p.name: ([], []) for p in parts}
    for path in paths:
        with h5py.File(path, "r", locking=False) as f:
            for name in got:
                if name in f:
                    got[name][0].append(f[name]["rows"][()])
                    got[name][1].append(f[name]["probs"][()])
    out = {}
    for p in parts:
        rows, probs = got[p.name]
        rows_all = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        if not np.array_equal(rows_all, np.arange(len(p.perturbations))):
            raise StageError(f"attribute shards hold rows {rows_all.tolist()[:10]}... of part {p.name}, not each of "
                             f"0..{len(p.perturbations) - 1} once: rerun with --overwrite")
        out[p.name] = torch.from_numpy(np.concatenate(probs))
    return out


def _phase1_paths(cfg: Config) -> list[Path]:
    n = resolve_shards(cfg, len(blocks(cfg, flat_parts(cfg))), announce=False)  # run_sharded said it
    return shard_paths(cfg.runtime.out, "attribute-flat", n)


def _chosen(cfg: Config, setup: AttributeSetup) -> torch.Tensor:
    """The class each query's hierarchical search descends into, from the phase-1 class outputs."""
    parts = [p for p in flat_parts(cfg) if p.name == "class"]
    probs = gather(_phase1_paths(cfg), parts)["class"]
    return choose_classes(setup.scorer, parts[0].perturbations, probs, cfg.attribute.objective)


def merge_attribute(cfg: Config, paths: list[Path], bundle: DatasetBundle | None = None,
                    setup: AttributeSetup | None = None) -> Path:
    """Fit W from the phase-1 (and phase-2) shards and write ``attribution.h5``."""
    t0 = time.perf_counter()
    ctx = RunContext(cfg, bundle)
    setup = setup or attribute_setup(cfg, ctx.bundle)
    acfg, scorer = cfg.attribute, setup.scorer
    p1 = flat_parts(cfg)
    probs1 = gather(_phase1_paths(cfg), p1)
    result: dict[str, object] = {}
    for part in p1:
        if part.name == "flat":
            scores, intercepts = scorer.fit(part.perturbations, probs1["flat"])
            result.update(perturbations=part.perturbations, probs=probs1["flat"], scores=scores, intercepts=intercepts)
        else:
            chosen = choose_classes(scorer, part.perturbations, probs1["class"], acfg.objective)
            p2 = hier_parts(chosen, setup.cluster_class)
            probs2 = gather(paths, p2)
            within = {int(p.name.removeprefix("within")): probs2[p.name] for p in p2}
            result["hier"] = hierarchy_result(scorer, acfg.objective, part.perturbations, probs1["class"],
                                              setup.cluster_class, within)
    all_paths = _phase1_paths(cfg) + (paths if acfg.search != "flat" else [])
    timings = {"flat": _part_seconds(all_paths, lambda n: n == "flat"),
               "hierarchical": _part_seconds(all_paths, lambda n: n != "flat")}
    timings = {k: v for k, v in timings.items() if (k == "flat") == ("scores" in result) or k == "hierarchical"
               and "hier" in result}
    return write_attribution(cfg, ctx.bundle, setup, result, sum(timings.values()) + time.perf_counter() - t0, timings)


def _part_seconds(paths: list[Path], which: Callable[[str], bool]) -> float:
    """Fine-tuning seconds summed over the shards' parts whose name passes ``which``."""
    total = 0.0
    for path in paths:
        with h5py.File(path, "r", locking=False) as f:
            total += sum(float(f[n]["seconds"][()]) for n in f if which(n))
    return total


def write_attribution(cfg: Config, bundle: DatasetBundle, setup: AttributeSetup, result: dict[str, object],
                      seconds: float, timings: dict[str, float]) -> Path:
    """Write ``attribution.h5`` (schema in the README) from the fitted results."""
    acfg = cfg.attribute
    primary = acfg.objective
    q_pos, v_pos, cluster_class = setup.q_pos, setup.v_pos, setup.cluster_class
    base = setup.scorer.base
    k = len(cluster_class)
    path = artifact_path(cfg.runtime.out, "attribute")
    n_rows = 1 if acfg.query_mode == "batch" else len(q_pos)
    with atomic_h5(path) as f:
        if "scores" in result:
            primary_scores = result["scores"][primary].numpy()
            for name, s in result["scores"].items():
                g = f.create_group(f"objectives/{name}")
                create_dataset(g, "scores", data=s.numpy().astype(np.float32))
                create_dataset(g, "intercept", data=result["intercepts"][name].numpy().astype(np.float32))
            create_dataset(f, "perturbations", data=result["perturbations"].numpy())
            create_dataset(f, "beta", data=beta_weights(result["perturbations"], acfg.beta).numpy())
            create_dataset(f, "outputs", data=result["probs"][:, :len(q_pos)].numpy().astype(np.float32))
        else:  # hierarchical only: cluster scores of the chosen class, NaN elsewhere
            h = result["hier"]
            primary_scores = np.full((n_rows, k), np.nan, dtype=np.float32)
            for q in range(n_rows):
                ids = torch.nonzero(cluster_class == h["class"][q])[:, 0].numpy()
                primary_scores[q, ids] = h["cluster_scores"][q, :len(ids)].numpy()
        create_dataset(f, "scores", data=primary_scores.astype(np.float32))
        order = np.argsort(-np.nan_to_num(primary_scores, nan=-np.inf), axis=1)[:, :min(5, k)]
        create_dataset(f, "top_clusters", data=order.astype(np.int64))
        if "hier" in result:
            g = f.create_group("hierarchy")
            for name, v in result["hier"].items():
                create_dataset(g, name, data=v.numpy())
        create_dataset(f, "query_index", data=bundle.test_index[q_pos].numpy())
        create_dataset(f, "query_position", data=q_pos.numpy())
        create_dataset(f, "query_label", data=bundle.y_test[q_pos].numpy())
        create_dataset(f, "query_pred", data=base[:len(q_pos)].argmax(1).numpy())
        create_dataset(f, "base_probs", data=base[:len(q_pos)].numpy())
        create_dataset(f, "val_index", data=bundle.test_index[v_pos].numpy())
        c = f.create_group("clusters")
        create_dataset(c, "assignment", data=setup.assignment)
        create_dataset(c, "class", data=cluster_class.numpy())
        create_dataset(c, "size", data=setup.sizes)
        f.attrs["objective"] = primary
        f.attrs["query_mode"] = acfg.query_mode
        f.attrs["finetune_steps"] = setup.unlearner.steps
        f.attrs["finetune_lr"] = setup.unlearner.lr
        f.attrs["finetune_scale"] = cfg.finetune_weighting
        f.attrs["n_finetunes_flat"] = len(result["perturbations"]) if "perturbations" in result else 0
        f.attrs["n_finetunes_hierarchical"] = int(result["hier"]["n_finetunes"]) if "hier" in result else 0
        for name, sec in timings.items():
            f.attrs[f"seconds_{name}"] = sec  # fine-tuning seconds summed over shards
        write_provenance(f, cfg, "attribute", seconds)
    log.info("attribute: %s scores for %d queries over K=%d clusters -> %s", primary, len(q_pos), k, path)
    return path


def check(cfg: Config) -> None:
    """Before distill runs: ``--search`` hierarchical/both needs the class synsets ``--levels`` must distil, and
    displacement synsets (``--target displacement`` or ``influence``) are removed by one unweighted fine-tune step."""
    if cfg.attribute.search != "flat" and "class" not in cfg.distill.level_list():
        raise ConfigError(f"--search {cfg.attribute.search} needs class synsets but --levels is "
                          f"{cfg.distill.levels!r}: pass --levels cluster,class or --search flat")
    a = cfg.attribute
    if cfg.distill.fixed_target and (cfg.finetune_weighting != "uniform" or a.finetune_steps > 1):
        raise ConfigError(f"--target {cfg.distill.target} synsets reproduce a group's contribution in one unweighted "
                          f"fine-tune step, not --finetune-scale {a.finetune_scale} --finetune-steps "
                          f"{a.finetune_steps}: pass --finetune-scale auto --finetune-steps 0 (or uniform and 1)")


def run(cfg: Config, bundle: DatasetBundle | None = None) -> Path:
    """Run the stage and write ``attribution.h5``; returns its path.

    Fine-tunings run as ``--shards`` tasks on the configured executor (launch.py): phase 1 the
    flat and class perturbations, phase 2 (hierarchical search) the chosen classes' clusters.
    """
    acfg = cfg.attribute
    here = cfg.runtime.executor != "slurm"
    setup = attribute_setup(cfg, bundle) if here else None  # tasks in this process share it
    context = {"bundle": bundle, "setup": setup} if here else {}
    n1 = len(blocks(cfg, flat_parts(cfg)))
    if acfg.search == "flat":
        path = run_sharded("attribute-flat", cfg, attribute_flat_shard, n1, merge_attribute, stage="attribute",
                           context=context)
    else:
        run_sharded("attribute-flat", cfg, attribute_flat_shard, n1, stage="attribute", context=context)
        setup = setup or attribute_setup(cfg, bundle)
        chosen = _chosen(cfg, setup)
        n2 = len(blocks(cfg, hier_parts(chosen, setup.cluster_class)))
        path = run_sharded("attribute-hier", cfg, attribute_hier_shard, n2, merge_attribute, stage="attribute",
                           key_extra=",".join(map(str, chosen.tolist())), context=context)
        remove_shards(cfg.runtime.out, "attribute-flat")
    return Path(path)


def summary(run_dir: str | Path, n_show: int = 10) -> list[str]:
    """The ``ddm-hpc show`` lines of ``attribution.h5``: fine-tunings and the top clusters of each query."""
    path = artifact_path(run_dir, "attribute")
    a = read_attrs(path)
    if not a:
        return []
    lines = [f"  attribute  {a['seconds']:7.1f} s  {a['n_finetunes_flat']} flat + "
             f"{a['n_finetunes_hierarchical']} hierarchical fine-tunings of {a['finetune_steps']} steps"]
    with open_read(path) as f:
        scores = f["scores"][()]
        top = f["top_clusters"][()]
        qi, ql, qp = f["query_index"][()], f["query_label"][()], f["query_pred"][()]
        cls_of, size = f["clusters/class"][()], f["clusters/size"][()]
        hier = {k: f["hierarchy"][k][()] for k in f["hierarchy"]} if "hierarchy" in f else None
    lines.append(f"top clusters by {a['objective']} (score = effect of removing the cluster; larger = more "
                 "responsible):")
    for r in range(min(n_show, len(scores))):
        head = f"test[{qi[r]}] label {ql[r]} pred {qp[r]}" if len(scores) == len(qi) else "query batch"
        tops = "  ".join(f"#{k} (class {cls_of[k]}, {size[k]} imgs, {scores[r, k]:+.4f})" for k in top[r, :3])
        line = f"  {head}: {tops}"
        if hier is not None:
            line += f"  | hierarchical: class {hier['class'][r]} -> #{hier['cluster'][r]}"
        lines.append(line)
    return lines


__all__ = ["fit_wls", "beta_weights", "loo_perturbations", "random_perturbations", "Scorer", "run"]
