"""DDM and its variants as attribution methods: each reads the flat scores of a run's attribute stage.

  ddm         this run's ``attribution.h5`` (flat search), one score matrix per objective: with the defaults,
              influence matching with sqrt-Fisher tensor weights (as ddm-fws below); Dist1 located by its Dist1
              scores (Eq. 10), or by its Dist2 scores for ``--target displacement`` synsets.
  ddm-match   forward gradient matching of trajectory pairs (``config.PAIRS_DISTILL``, the defaults before
              influence matching, with ``--method ddm-match``), run in ``RUN/variants/ddm-match`` on this
              run's train.h5 and clusters.h5.
  ddm-paper   the paper's method (``--preset paper``'s distill and attribute options, every other distill
              option at its default) in ``RUN/variants/ddm-paper`` on this run's train.h5 and clusters.h5,
              whatever this run's own options: the paper-literal row, always in the table.
  ddm-soft    reverse matching of trajectory pairs with learned soft labels (``PAIRS_DISTILL`` with
              ``--syn-labels learn``; not in the paper), run in ``RUN/variants/ddm-soft``.
  ddm-seq     "DDM w/o cluster": clusters by sequence number (``RUN/variants/ddm-seq``, on this
              run's train.h5). Its scores live on other clusters, so they are spread evenly over
              each sequential cluster's members and summed per k-means cluster.
  ddm-disp    displacement matching (``--target displacement``, not in the paper), run in ``RUN/variants/ddm-disp``
              on this run's train.h5 and clusters.h5: each synset's gradient at theta_tau matched to its
              cluster's whole training contribution, removed by one fine-tune step at per-tensor rates
              fitted to it (``--layer-rates``); Dist1 located by its Dist2 (CE) scores.
  ddm-inf     influence matching (``--target influence``, not in the paper), run in ``RUN/variants/ddm-inf``: as
              ddm-disp, each synset matched to its cluster's damped influence displacement at theta_tau,
              (F + lambda I)^-1 times its summed gradient over N (F the empirical Fisher of the training rows,
              lambda the weight decay plus the ridge early stopping after the training's steps amounts to);
              Dist1 located by its Dist1 scores. Every tensor's residual weighs the same (``--tensor-weights
              none``): the default ``ddm`` before issue 18's held-out seeds 7-9 made ddm-fws the default.
  ddm-fw      ddm-inf with ``--tensor-weights fisher`` (not in the paper), run in ``RUN/variants/ddm-fw``: each
              parameter tensor's residual weighed in the matching loss by its mean Fisher diagonal at theta_tau.
  ddm-fws     the same with the square roots of those weights (``--tensor-weights fisher-sqrt``), in
              ``RUN/variants/ddm-fws``. The default ``ddm`` on its cluster level, so not in the default
              ``--methods``: it is the row for runs made with other distill options (``--preset paper``).
  ddm-hier    this run's class-first hierarchical search (Eq. 11): Dist1/2/3 locate the cluster it
              picks inside the class it picks; its LDS reads the class scores spread evenly over each
              class's clusters (the search has no score for clusters outside the chosen class).

DDM methods carry one score matrix per objective (``per_objective``): the Eq. 10 metric Dist_m
locates with the Dist_m scores, as the paper does, except Dist1 of displacement synsets (ddm-disp), which
the Dist2 scores locate (:func:`dist1_rule`; the report shows both rules for every DDM row).

Room: a method file (imports ``config``, ``context``, ``methods.base``, ``storage``, ``variants``).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ddm_hpc.config import Config
from ddm_hpc.context import RunContext
from ddm_hpc.errors import ConfigError
from ddm_hpc.methods.base import AttributionMethod, MethodResult
from ddm_hpc.storage import artifact_path, open_read, read_attrs
from ddm_hpc.variants import (ONE_STEP_VARIANTS, Variant, forward_matching, learned_labels, paper_method,
                              sequential_clusters)


LOCATED_BY = "Dist1 located by the {} scores"  # the note of a row whose Dist1 another objective locates (report.py)


def read_ddm_scores(run_dir: Path, note: str, dist1_by: str = "dist1") -> MethodResult:
    """A run's flat attribution scores (every objective) and its online/offline seconds.

    ``dist1_by``: the objective whose scores locate Dist1's cluster (Eq. 10 uses dist1's own; ``dist2`` locates
    it with the CE effect, which measured better for displacement synsets).
    """
    path = artifact_path(run_dir, "attribute")
    with open_read(path) as f:
        if str(f.attrs["query_mode"]) != "single":
            raise ConfigError(f"{path} was made with --query-mode batch: evaluate needs per-query scores, rerun "
                              "attribute with --query-mode single")
        if "objectives" not in f:
            raise ConfigError(f"{path} has no flat scores (it was run with --search hierarchical): rerun attribute "
                              "with --search flat or both before evaluate")
        per = {name: torch.from_numpy(f["objectives"][name]["scores"][()]) for name in f["objectives"]}
        objective = str(f.attrs["objective"])
        online = float(f.attrs.get("seconds_flat", f.attrs["seconds"]))
    offline = float(read_attrs(artifact_path(run_dir, "distill"))["seconds"])
    # the signed responsibility for LDS is the CE effect (dist2); the stored objective is reported too
    main = per.get("dist2", per[objective])
    located = {k: v for k, v in per.items() if k in ("dist1", "dist2", "dist3")}
    if dist1_by != "dist1" and dist1_by in per:
        note = f"{note}; {LOCATED_BY.format(dist1_by)}"
    else:
        dist1_by = "dist1"
    return MethodResult(main, online, offline, located, note=f"{note}; attribute objective {objective}",
                        dist1_by=dist1_by)


def dist1_rule(cfg: Config) -> str:
    """The objective whose scores locate Dist1 for synsets made with ``cfg``: dist2 for displacement synsets (measured
    better on three seeds), dist1 otherwise (Eq. 10), influence synsets included: on the two held-out seeds scored
    both ways their own Dist1 scores located better, 15.80 against 15.46 and 19.36 against 18.65 (drop;
    benchmarks/RESULTS.md)."""
    return "dist2" if cfg.distill.target == "displacement" else "dist1"


def spread_to_clusters(scores: torch.Tensor, src_assign: torch.Tensor, dst_assign: torch.Tensor, k: int
                       ) -> torch.Tensor:
    """Re-express [Q, K_src] cluster scores on other clusters: each source cluster's score is spread
    evenly over its members, and the members' shares are summed per destination cluster -> [Q, k]."""
    sizes = torch.bincount(src_assign, minlength=scores.shape[1]).clamp(min=1).to(scores.dtype)
    per_sample = (scores / sizes)[:, src_assign]  # [Q, N]
    return torch.zeros(scores.shape[0], k, dtype=scores.dtype).index_add_(1, dst_assign, per_sample)


class _VariantDDM(AttributionMethod):
    """DDM on a variant run of this one (:meth:`variant`), its scores read from the variant's attribution.h5."""

    note: str = ""

    def variant(self) -> Variant:
        raise NotImplementedError

    def variants(self, cfg: Config) -> list[Variant]:
        return [self.variant()]

    def synset_run(self, cfg: Config) -> Config:
        return self.variant().config(cfg)

    def score(self, ctx: RunContext) -> MethodResult:
        return read_ddm_scores(self.variant().directory(ctx.cfg), self.note)


class DDMSeq(_VariantDDM, name="ddm-seq", label="DDM w/o cluster", help="DDM with clusters by sequence number"):
    note = "clusters by sequence number, mapped to k-means clusters by membership"

    def variant(self) -> Variant:
        return sequential_clusters()

    def score(self, ctx: RunContext) -> MethodResult:
        out = self.variant().directory(ctx.cfg)
        res = read_ddm_scores(out, self.note)
        with open_read(artifact_path(out, "cluster")) as f:
            seq_assign = torch.from_numpy(f["clusters/assignment"][()]).long()
        mapped = {k: spread_to_clusters(v, seq_assign, ctx.assignment, ctx.k) for k, v in res.per_objective.items()}
        return MethodResult(spread_to_clusters(res.scores, seq_assign, ctx.assignment, ctx.k), res.seconds,
                            res.offline_seconds, mapped, res.note, res.dist1_by)


class DDMMatch(_VariantDDM, name="ddm-match", label="DDM-match", help="forward gradient matching",
               table4="DDM-match"):
    note = "forward gradient matching, same clusters"

    def variant(self) -> Variant:
        return forward_matching()


class DDM(AttributionMethod, name="ddm", label="DDM (this run's synsets)", help="this run", scatter=True,
          heatmap=True, table4="DDM"):
    def score(self, ctx: RunContext) -> MethodResult:
        d = ctx.cfg.distill
        return read_ddm_scores(ctx.run_dir, f"this run (--target {d.target})",
                               dist1_by=dist1_rule(ctx.cfg))


class DDMPaper(_VariantDDM, name="ddm-paper", label="DDM-full, the paper's settings",
               help="the paper's DDM (--preset paper's distill and attribute options) on this run's trajectory"):
    note = ("the paper's method on this run's trajectory and clusters: reverse matching, hard labels, ipc 1, "
            "Alg. 1 pairing (step 4), random perturbations |P| = K, uniform weights")

    def variant(self) -> Variant:
        return paper_method()


class DDMSoft(_VariantDDM, name="ddm-soft", label="DDM-full + learned labels",
              help="this run's reverse matching with --syn-labels learn", scatter=True, heatmap=True,
              table4="DDM + learned labels"):
    note = "reverse gradient matching with learned soft labels, same clusters"

    def variant(self) -> Variant:
        return learned_labels()


class DDMDisp(_VariantDDM, name="ddm-disp", label="DDM, displacement matching",
              help="synsets matched at theta_tau to each cluster's whole training contribution, one fine-tune step",
              scatter=True, table4="DDM, displacement matching"):
    note = ("--target displacement --layer-rates: learned labels, ipc 10, matched at theta_tau by relative L2 to the "
            "summed trajectory gradient, removed by one fine-tune step at per-tensor rates fitted to that target")

    def variant(self) -> Variant:  # the one-step rows below share this: their variant is registered by their name
        return ONE_STEP_VARIANTS[self.name][1]()

    def score(self, ctx: RunContext) -> MethodResult:
        run = self.synset_run(ctx.cfg)
        return read_ddm_scores(self.variant().directory(ctx.cfg), self.note, dist1_by=dist1_rule(run))


class DDMInf(DDMDisp, name="ddm-inf", label="DDM, influence matching",
             help="synsets matched at theta_tau to each cluster's damped influence displacement, one fine-tune step",
             scatter=True, table4="DDM, influence matching"):
    note = ("--target influence --layer-rates: ddm-disp's synsets matched at theta_tau to (F + lambda I)^-1 times the "
            "cluster's summed gradient (F the empirical Fisher, lambda from the training's steps), one fine-tune step")


class DDMFisherWeighted(DDMDisp, name="ddm-fw", label="DDM, influence matching, Fisher-weighted tensors",
                        help="ddm-inf with each tensor's residual weighed by its mean Fisher diagonal "
                             "(--tensor-weights fisher)"):
    note = ("--target influence --layer-rates --tensor-weights fisher: ddm-inf's synsets, each parameter tensor's "
            "residual weighed in the matching loss by its mean Fisher diagonal at theta_tau")


class DDMFisherSqrt(DDMDisp, name="ddm-fws", label="DDM, influence matching, sqrt-Fisher-weighted tensors",
                    help="ddm-inf with each tensor's residual weighed by the square root of its mean Fisher diagonal "
                         "(--tensor-weights fisher-sqrt)"):
    note = ("--target influence --layer-rates --tensor-weights fisher-sqrt: ddm-inf's synsets, each parameter "
            "tensor's residual weighed in the matching loss by the square root of its mean Fisher diagonal")


def hierarchical_scores(run_dir: Path, cluster_class: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, str]:
    """A run's hierarchical search as [Q, K] matrices: (located, spread, objective).

    ``located``: the within-class cluster scores of the chosen class, ``-inf`` elsewhere (its argmax is the
    search's pick); ``spread``: each class score divided evenly over that class's clusters.
    """
    path = artifact_path(run_dir, "attribute")
    with open_read(path) as f:
        if "hierarchy" not in f:
            raise ConfigError(f"{path} has no hierarchical search (it was run with --search flat): rerun attribute "
                              "with --search hierarchical or both")
        h = f["hierarchy"]
        cls_scores = torch.from_numpy(h["class_scores"][()]).double()
        chosen = torch.from_numpy(h["class"][()]).long()
        inside = torch.from_numpy(h["cluster_scores"][()]).double()
        objective = str(f.attrs["objective"])
    k = len(cluster_class)
    sizes = torch.bincount(cluster_class, minlength=cls_scores.shape[1]).clamp(min=1).double()
    spread = cls_scores[:, cluster_class] / sizes[cluster_class]
    located = torch.full((len(chosen), k), float("-inf"), dtype=torch.float64)
    for q, c in enumerate(chosen.tolist()):
        ids = torch.nonzero(cluster_class == c)[:, 0]
        located[q, ids] = inside[q, :len(ids)]
    return located.float(), spread.float(), objective


class DDMHier(AttributionMethod, name="ddm-hier", label="DDM-full, class-first search (Eq. 11)",
              help="this run's hierarchical search: the class first, then its clusters"):
    def score(self, ctx: RunContext) -> MethodResult:
        located, spread, objective = hierarchical_scores(ctx.run_dir, ctx.cluster_class)
        with open_read(artifact_path(ctx.run_dir, "attribute")) as f:
            online = float(f.attrs.get("seconds_hierarchical", 0.0))
        offline = float(read_attrs(artifact_path(ctx.run_dir, "distill"))["seconds"])
        dist3 = torch.where(torch.isinf(located), located, -located)  # the least influential inside the class
        return MethodResult(spread, online, offline, {"dist1": located, "dist2": located, "dist3": dist3},
                            note=f"hierarchical search on the {objective} objective: every Dist_m locates its pick "
                                 "inside the chosen class; LDS from the class scores spread over their clusters")
