"""Variant runs: runs derived from a run, which attribution methods and diagnostics declare and the pipeline makes.

A :class:`Variant` is a declaration, not an action: a directory (relative to the run it derives
from), the options it changes, the stages whose artifacts it shares with that run (hard links, so
the same uids and no recomputation) and the stages it runs itself. Methods (``AttributionMethod.
variants``) and diagnose tasks (``Task.variants``) return the variants they read; the pipeline
(``ddm_hpc.pipeline.materialise``) links, runs and resumes them before the stage that needs them, so
nothing below the pipeline runs a stage. A consumer finds its variant's run with
:meth:`Variant.config` / :meth:`Variant.directory`, the same for the declarer and the pipeline.

The variants ``evaluate`` and ``diagnose`` share (:func:`forward_matching`, :func:`learned_labels`,
:func:`displacement_matching`, :func:`sequential_clusters`) live here, so either reuses what the other made.

Room: imports ``config`` only.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ddm_hpc.config import PAIRS_DISTILL, AttributeConfig, Config, DistillConfig, merge, paper_preset


@dataclass(frozen=True)
class Variant:
    """A run derived from another: its own directory, some options changed, some artifacts shared.

    Attributes:
        path: its run directory, relative to the run it derives from (e.g. ``variants/ddm-soft``).
        overrides: nested config changes on top of that run's config (``{"distill": {"syn_labels": "learn"}}``).
        shared: stages whose artifacts it takes from that run (or from ``sources``) as hard links.
        stages: stages it runs itself (after the shared ones); its own artifacts made with other options are
            recomputed, since a variant's directory belongs to whoever declares it.
        sources: stage -> another variant to share that stage's artifact from (e.g. synsets distilled once for
            several fine-tune settings).
        parent: the variant it derives from (default: the run itself), e.g. a variant of a corrupted copy.
        prepare: ``prepare(base, out)`` makes its inputs before its stages run (``base``: the run context of the
            run it derives from; ``out``: its directory), e.g. the corrupted dataset of ``diagnose noisy``.
    """

    path: str
    overrides: dict[str, Any] = field(default_factory=dict, hash=False)
    shared: tuple[str, ...] = ()
    stages: tuple[str, ...] = ()
    sources: dict[str, Variant] = field(default_factory=dict, hash=False)
    parent: Variant | None = None
    prepare: Callable[..., None] | None = field(default=None, compare=False)

    def base_directory(self, root: Config) -> Path:
        """The directory of the run it derives from."""
        return self.parent.directory(root) if self.parent is not None else Path(root.runtime.out)

    def directory(self, root: Config) -> Path:
        """Its run directory, for the root run ``root``."""
        return self.base_directory(root) / self.path

    def base_config(self, root: Config) -> Config:
        """The config of the run it derives from."""
        return self.parent.config(root) if self.parent is not None else root

    def config(self, root: Config) -> Config:
        """Its config: the base run's, with ``overrides``, in its own directory, never overwriting."""
        d = merge(self.base_config(root).to_dict(), self.overrides)
        d["runtime"]["out"] = str(self.directory(root))
        d["runtime"]["overwrite"] = False
        return Config.from_dict(d)

    def source_directory(self, root: Config, stage: str) -> Path:
        """Where its shared ``stage`` artifact comes from."""
        return self.sources[stage].directory(root) if stage in self.sources else self.base_directory(root)

    def with_stages(self, stages: tuple[str, ...]) -> Variant:
        """The same variant running other stages (same directory and options)."""
        return dataclasses.replace(self, stages=stages)


# Variants that replace only the synsets share the run's train.h5 and clusters.h5, and search flat over the
# cluster synsets (the scores evaluate compares).
FLAT_CLUSTERS = {"attribute": {"search": "flat"}, "distill": {"levels": "cluster"}}


def synset_variant(name: str, distill: dict[str, Any], stages: tuple[str, ...] = ("distill", "attribute"),
                   parent: Variant | None = None, attribute: dict[str, Any] | None = None,
                   sources: dict[str, Variant] | None = None) -> Variant:
    """``RUN/variants/<name>``: this run's trajectory and clusters (and, with ``sources``, other shared artifacts),
    synsets distilled with ``distill`` options, flat search over the cluster synsets."""
    over = merge(FLAT_CLUSTERS, {"distill": distill, **({"attribute": attribute} if attribute else {})})
    sources = dict(sources or {})
    shared = ("train", "cluster", "distill") if "distill" in sources else ("train", "cluster")
    return Variant(f"variants/{name}", over, shared, stages, sources, parent)


# How trajectory-pair synsets are removed online, as before influence matching became the default: tau steps with
# each synset weighted by its cluster's share of an epoch. The pair-matching variants pin it with PAIRS_DISTILL, so
# they are the same rows (and the same stage keys) whatever this run's own target.
PAIRS_ATTRIBUTE = {"finetune_scale": "matched", "finetune_steps": 0}


def pair_matching(name: str, distill: dict[str, Any], stages: tuple[str, ...], parent: Variant | None) -> Variant:
    """``RUN/variants/<name>``: trajectory-pair synsets (``config.PAIRS_DISTILL``, the former defaults, with
    ``distill`` on top) on this run's clusters, removed by :data:`PAIRS_ATTRIBUTE`'s fine-tune."""
    return synset_variant(name, {**PAIRS_DISTILL, **distill}, stages, parent, attribute=PAIRS_ATTRIBUTE)


def forward_matching(stages: tuple[str, ...] = ("distill", "attribute"), parent: Variant | None = None) -> Variant:
    """``RUN/variants/ddm-match``: forward gradient matching of trajectory pairs (the paper's DDM-match) on this
    run's clusters."""
    return pair_matching("ddm-match", {"method": "ddm-match"}, stages, parent)


def learned_labels(stages: tuple[str, ...] = ("distill", "attribute"), parent: Variant | None = None) -> Variant:
    """``RUN/variants/ddm-soft``: reverse matching of trajectory pairs with learned soft labels (``--syn-labels
    learn``)."""
    return pair_matching("ddm-soft", {"syn_labels": "learn"}, stages, parent)


# --target displacement's settings (benchmarks/RESULTS.md, "Displacement matching"): learned labels and 10 images
# per cluster make the synset's gradient expressive enough; Adam converges where SGD at these rates stalls; per-tensor
# fine-tune rates fitted after matching (--layer-rates) lengthen the classifier-layer step the images cannot make
# long enough; with them 50 steps attribute as well as 100 (three seeds). One retraining without a random half of
# the clusters fits how much of each tensor's step survives later training (--contraction 1): LDS at alpha 0.5
# 0.67 -> 0.78 (three seeds; RESULTS, "Contraction factors").
DISPLACEMENT = {"target": "displacement", "syn_labels": "learn", "ipc": 10, "optimizer": "adam", "lr_img": 0.03,
                "lr_label": 0.3, "distill_steps": 50, "layer_rates": True, "contraction": 1, "tensor_weights": "none"}


# How --target displacement and influence synsets are removed online: one unweighted fine-tune step per cluster.
ONE_STEP = {"finetune_scale": "uniform", "finetune_steps": 1}


def displacement_matching(stages: tuple[str, ...] = ("distill", "attribute"), parent: Variant | None = None
                          ) -> Variant:
    """``RUN/variants/ddm-disp``: synsets matched at theta_tau to each cluster's whole training contribution
    (``--target displacement``) with per-tensor rates (``--layer-rates``), removed by one fine-tune step."""
    return synset_variant("ddm-disp", DISPLACEMENT, stages, parent, attribute=ONE_STEP)


# --target influence's settings: ddm-disp's synsets (learned labels, 10 images, Adam, 50 steps, per-tensor rates)
# matched to the damped influence displacement at theta_tau instead of the summed trajectory gradient. Its scale is
# the training's own (the ridge comes from the number of steps), so nothing is retrained: no --contraction. Every
# tensor's residual weighs the same (--tensor-weights none): the default ddm before fisher-sqrt became the default.
INFLUENCE = {**DISPLACEMENT, "target": "influence", "contraction": 0}


def influence_matching(stages: tuple[str, ...] = ("distill", "attribute"), parent: Variant | None = None
                       ) -> Variant:
    """``RUN/variants/ddm-inf``: synsets matched at theta_tau to each cluster's damped influence displacement
    (``--target influence``) with per-tensor rates, removed by one fine-tune step."""
    return synset_variant("ddm-inf", INFLUENCE, stages, parent, attribute=ONE_STEP)


# --tensor-weights fisher on top of --target influence: each parameter tensor's residual weighed in the training loss
# by its mean Fisher diagonal at theta_tau, so the tensors that move the outputs most are fitted best (RESULTS,
# "where the synsets lose Dist1": the middle convolution's fit was most of the gap to a perfect synset).
FISHER_WEIGHTED = {**INFLUENCE, "tensor_weights": "fisher"}


def fisher_weighted_influence(stages: tuple[str, ...] = ("distill", "attribute"), parent: Variant | None = None
                              ) -> Variant:
    """``RUN/variants/ddm-fw``: ddm-inf's synsets with each tensor's residual weighed by its mean Fisher diagonal
    (``--tensor-weights fisher``), removed by one fine-tune step."""
    return synset_variant("ddm-fw", FISHER_WEIGHTED, stages, parent, attribute=ONE_STEP)


# --tensor-weights fisher-sqrt: the square roots of those weights, halfway between ddm-inf's equal weights and ddm-fw's
# on a log scale (ddm-fw measured Dist1 +0.31 and LDS at alpha 0.5 -0.014 on held-out seeds 5-8, drop; RESULTS).
# The default ddm's cluster level since issue 18 (held-out seeds 7-9), so on a default run this row equals it.
FISHER_SQRT_WEIGHTED = {**INFLUENCE, "tensor_weights": "fisher-sqrt"}


def fisher_sqrt_weighted_influence(stages: tuple[str, ...] = ("distill", "attribute"), parent: Variant | None = None
                                   ) -> Variant:
    """``RUN/variants/ddm-fws``: ddm-inf's synsets with each tensor's residual weighed by the square root of its mean
    Fisher diagonal (``--tensor-weights fisher-sqrt``), removed by one fine-tune step."""
    return synset_variant("ddm-fws", FISHER_SQRT_WEIGHTED, stages, parent, attribute=ONE_STEP)


# The one-step synset variants by method name: (distill settings, factory). benchmarks/disp_variants.py starts its
# variants from them (--base), and the tests shrink them.
ONE_STEP_VARIANTS: dict[str, tuple[dict[str, Any], Callable[..., Variant]]] = {
    "ddm-disp": (DISPLACEMENT, displacement_matching), "ddm-inf": (INFLUENCE, influence_matching),
    "ddm-fw": (FISHER_WEIGHTED, fisher_weighted_influence),
    "ddm-fws": (FISHER_SQRT_WEIGHTED, fisher_sqrt_weighted_influence)}


def paper_method(stages: tuple[str, ...] = ("distill", "attribute"), parent: Variant | None = None) -> Variant:
    """``RUN/variants/ddm-paper``: the paper's DDM on this run's trajectory and clusters, whatever this run's own
    distill and attribute options: ``--preset paper``'s distill and attribute options (reverse matching of
    trajectory pairs, hard labels, ipc 1, SGD on the images, Alg. 1 pairing with step length 4, 50 steps, DSA
    augmentation during matching, random perturbations with |P| = K, synsets weighted 1), every other distill option
    at its default (layer-wise cosine ...). Its training is this run's."""
    preset = paper_preset()
    distill = {**dataclasses.asdict(DistillConfig()), **preset["distill"]}
    for runtime_only in ("levels", "group_grads", "group_chunk"):  # flat search; this run's implementation
        distill.pop(runtime_only)
    method_options = ("perturbation", "n_perturbations", "removal_prob", "beta", "finetune_steps",
                      "finetune_scale", "finetune_lr")  # queries, objective, search: this run's
    defaults = dataclasses.asdict(AttributeConfig())
    attribute = {k: preset["attribute"].get(k, defaults[k]) for k in method_options}
    return synset_variant("ddm-paper", distill, stages, parent, attribute=attribute)


def sequential_clusters() -> Variant:
    """``RUN/variants/ddm-seq``: "DDM w/o cluster", clusters by sequence number (this run's trajectory only)."""
    over = merge(FLAT_CLUSTERS, {"cluster": {"cluster_method": "sequential"}})
    return Variant("variants/ddm-seq", over, ("train",), ("cluster", "distill", "attribute"))


__all__ = ["Variant", "FLAT_CLUSTERS", "DISPLACEMENT", "INFLUENCE", "FISHER_WEIGHTED", "FISHER_SQRT_WEIGHTED",
           "ONE_STEP", "ONE_STEP_VARIANTS", "PAIRS_ATTRIBUTE", "synset_variant",
           "pair_matching", "influence_matching", "fisher_weighted_influence",
           "fisher_sqrt_weighted_influence", "forward_matching", "learned_labels",
           "displacement_matching", "paper_method", "sequential_clusters"]
