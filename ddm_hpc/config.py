"""Configuration: one dataclass per stage, each field documented in its metadata.

The CLI is generated from these fields (``--field-name``), so ``ddm-hpc run --help`` and this
file never disagree. Defaults form the *embedded default run*: MNIST from ``../shared/data``,
a CPU-sized demonstration that finishes in minutes on 2 cores. Where a default departs from
the paper (Ye et al., CVPR 2024, Table 5 / section 4.1), the help text says so and
:func:`paper_preset` restores the paper's value.

Each stage's artifact stores a hash of the config sections it depends on (``stage_key``; the
sections come from the stage graph, ``ddm_hpc.graph``); a run directory whose artifact was made
with a different upstream config is refused. A field added to a section that runs already hash
declares ``_help(..., added=True)``: at the value runs had before it existed (its default, or ``legacy=``
where the default changed later) it stays out of the hash, so those runs remain valid, and a saved
``config.json`` that predates it reads as that value (:func:`complete_saved`). A key never depends on
the current defaults: changing a default changes the keys of new runs only.

Options whose value ``0`` (or ``auto``) means "the default" keep that value in the config, and so in
the stage keys; each is resolved in exactly one place, a property or method of its section named
for what it gives (``DataConfig.train_size``, ``DistillConfig.block``, ``Config.finetune_step_count(tau)``,
``Config.finetune_rate``, ``RuntimeConfig.worker_count`` ...). Defaults that need an artifact (the
trajectory length tau, the cluster count K) take it as an argument.

Room: imports ``graph`` (and ``errors``, ``utils``) only; every other module may import it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from ddm_hpc import graph
from ddm_hpc.errors import ConfigError
from ddm_hpc.utils import resolve_device


_DEFAULT = object()


def _help(text: str, added: bool = False, registry: str = "", legacy: Any = _DEFAULT) -> dict[str, object]:
    """Field metadata. ``added``: an option added after runs existed; it is left out of the stage key
    while it has its legacy value, so artifacts made before it existed stay valid. ``legacy``: the value runs
    made before the option existed ran with (default: the field's default; given where the default changed
    later). ``registry``: the option names entries of a registry above this module, whose entries the CLI
    appends to the help."""
    meta: dict[str, object] = {"help": text, "added": added, "registry": registry}
    if legacy is not _DEFAULT:
        meta["legacy"] = legacy
    return meta


def _legacy(f: dataclasses.Field) -> Any:
    """The value a run made before added option ``f`` existed ran with."""
    return f.metadata.get("legacy", f.default)


def _key_dict(section: Any) -> dict[str, Any]:
    """A config section as it enters a stage key: added options at their legacy value are left out, so a key
    never depends on the current defaults."""
    d = dataclasses.asdict(section)
    for f in dataclasses.fields(section):
        if f.metadata.get("added") and d[f.name] == _legacy(f):
            del d[f.name]
    return d


def complete_saved(saved: dict[str, Any]) -> dict[str, Any]:
    """A run's saved ``config.json`` with the added options it predates set to the value it ran with
    (:func:`_help`'s ``legacy``), so merging it over today's defaults gives the run's own config."""
    out = json.loads(json.dumps(saved))
    for name, section in out.items():
        if name in SECTIONS and isinstance(section, dict):
            for f in dataclasses.fields(SECTIONS[name]):
                if f.metadata.get("added") and f.name not in section:
                    section[f.name] = _legacy(f)
    return out


@dataclass
class DataConfig:
    dataset: str = field(default="mnist", metadata=_help(
        "mnist, fashionmnist, cifar10, cifar100, or a path to an .npz/.h5 array file, a folder of .npz chunks or an "
        "image folder"))
    data_root: str = field(default="../shared/data", metadata=_help(
        "folder holding the torchvision dataset folders (MNIST/raw, cifar-10-batches-py, ...)"))
    n_train: int | None = field(default=2000, metadata=_help(
        "class-stratified training subset size; 0 = the whole training set (paper: all)"))
    n_test: int | None = field(default=1000, metadata=_help(
        "class-stratified test subset size (queries are drawn from it); 0 = all"))
    image_size: int = field(default=0, metadata=_help(
        "image folders only: resize each image's shorter side to this many pixels and crop the centre square, "
        "as ImageNet's variable-size JPEGs need (e.g. 64); 0 = as stored, all images must then share one size",
        added=True))

    def __post_init__(self) -> None:
        if self.image_size < 0:
            raise ConfigError(f"--image-size must be >= 0 (0 = as stored), got {self.image_size}")
        for name in ("n_train", "n_test"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0 (0 = all), got {v}")

    @property
    def train_size(self) -> int | None:
        """Training rows to keep, None = all (``--n-train 0``)."""
        return self.n_train or None

    @property
    def test_size(self) -> int | None:
        """Test rows to keep, None = all (``--n-test 0``)."""
        return self.n_test or None


@dataclass
class ModelConfig:
    model: str = field(default="convnet", metadata=_help(
        "registered model: convnet, alexnet, resnet18, simplevit, mlp, one added with register_model, or any factory "
        "f(in_channels, num_classes, image_size, **options) -> nn.Module as package.module:function or "
        "path/to/file.py:function"))
    width: int | None = field(default=32, metadata=_help(
        "channel width passed to the model factory (convnet/alexnet/resnet18); 0 = the model's own "
        "default (convnet: 128 as in the paper). 32 keeps the default run CPU-sized"))
    depth: int | None = field(default=None, metadata=_help(
        "depth passed to the model factory (convnet, mlp); unset = the model's default (convnet: 3)"))
    model_args: str = field(default="", metadata=_help(
        "extra factory keyword arguments as JSON, e.g. '{\"patch_size\": 7}'"))

    def __post_init__(self) -> None:
        self.factory_kwargs()  # validates the JSON early

    def factory_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``build_model`` (width/depth only when set)."""
        try:
            extra = json.loads(self.model_args) if self.model_args else {}
        except json.JSONDecodeError as e:
            raise ConfigError(f"--model-args is not valid JSON ({e.msg}): pass e.g. '{{\"width\": 64}}'") from None
        if not isinstance(extra, dict):
            raise ConfigError("--model-args must be a JSON object, e.g. '{\"width\": 64}'")
        kw: dict[str, Any] = {}
        if self.width:
            kw["width"] = self.width
        if self.depth is not None:
            kw["depth"] = self.depth
        kw.update(extra)
        return kw


@dataclass
class TrainConfig:
    epochs: int = field(default=30, metadata=_help("training epochs tau (paper Table 5: 30)"))
    batch_size: int = field(default=256, metadata=_help("SGD minibatch size"))
    lr: float = field(default=0.01, metadata=_help(
        "lr_net: SGD learning rate of training, also the unlearning fine-tune rate eta (paper sec. 4.1: 0.01; "
        "Table 5 says 0.001 for MNIST)"))
    momentum: float = field(default=0.9, metadata=_help("SGD momentum of training"))
    weight_decay: float = field(default=5e-4, metadata=_help("SGD weight decay of training"))
    save_every: int = field(default=1, metadata=_help("record theta every this many epochs (theta_0 and theta_tau always)"))

    def __post_init__(self) -> None:
        _positive(self, "epochs", "batch_size", "save_every")
        _positive(self, "lr", strict=True)


@dataclass
class ClusterConfig:
    clusters_per_class: int = field(default=10, metadata=_help("C: k-means clusters per class, K = L x C (paper: 10)"))
    cluster_method: str = field(default="kmeans", metadata=_help(
        "kmeans (FAISS, per class), global (one FAISS k-means over all classes, K = L x C clusters that may mix "
        "classes, each filed under its majority class; empty ones dropped), or sequential (split each class by "
        "index order: 'DDM w/o cluster')"))
    features: str = field(default="penultimate", metadata=_help(
        "feature extractor: penultimate (trained target's input to its last Linear), pixels, or "
        "module:function returning an nn.Module"))
    kmeans_iters: int = field(default=25, metadata=_help("k-means iterations"))
    small_class: str = field(default="error", metadata=_help(
        "a class with fewer than C images: error, or reduce (use as many clusters as images, logged)"))

    def __post_init__(self) -> None:
        _positive(self, "clusters_per_class", "kmeans_iters")
        _choice(self, "cluster_method", ("kmeans", "global", "sequential"))
        _choice(self, "small_class", ("error", "reduce"))


GROUP_BLOCK = 32  # groups per distillation block when --group-chunk is 0
FINETUNE_BLOCK = 64  # perturbations per attribute block when --batch-models is 0
# --augment: the parts of a DSA strategy (ddm_hpc.augment applies them) and what "dsa" stands for: DSA's strategy
# for digits (MNIST, SVHN), without flip; its CIFAR/FashionMNIST strategy adds flip
AUGMENT_PARTS = ("color", "crop", "cutout", "flip", "scale", "rotate")
DSA_STRATEGY = "color_crop_cutout_scale_rotate"


@dataclass
class DistillConfig:
    method: str = field(default="ddm", metadata=_help(
        "ddm: reverse gradient matching (syn grad at theta_{tau-t} vs -real grad at theta_t, Eq. 6); "
        "ddm-match: forward gradient matching at the same theta_t (the paper's DDM-match ablation)"))
    pairing: str = field(default="auto", metadata=_help(
        "trajectory pairing: reverse (tau-t, Eq. 6), alg1 (real at t, syn at t+s, Algorithm 1), same (t, t); "
        "auto = reverse for ddm, same for ddm-match"))
    step_length: int = field(default=4, metadata=_help("s of the alg1 pairing (paper Table 5: 4)"))
    ipc: int = field(default=10, metadata=_help(
        "synthetic images per cluster (paper: 1; 10 lets one fine-tune step carry an influence target)"))
    distill_steps: int = field(default=50, metadata=_help(
        "synset updates (--target pairs: each at a freshly sampled t; paper Table 5 'step for synset': 50)"))
    lr_img: float = field(default=0.03, metadata=_help(
        "rate of the synthetic images (with --optimizer adam: 0.03; SGD: Table 5 0.1, sec. 4.1 says 10, 0.005 for "
        "ViT)"))
    img_momentum: float = field(default=0.5, metadata=_help("momentum of the synthetic-image optimizer (DC: 0.5)"))
    syn_labels: str = field(default="learn", metadata=_help(
        "labels of the synthetic images: learn (soft labels distilled with the images; needed for reverse matching "
        "to reach the classifier layer, whose gradient on a correctly labelled image can never point against the "
        "real data's when features are >= 0) or hard (the cluster's class, fixed: the paper)"))
    lr_label: float = field(default=0.3, metadata=_help(
        "rate of the label logits (with --syn-labels learn; 0.3 with --optimizer adam, 1.0 with SGD)"))
    batch_real: int = field(default=64, metadata=_help("real images per cluster per step (whole cluster if smaller)"))
    distance: str = field(default="cos", metadata=_help("matching distance: cos (layer-wise, DC) or mse (paper: ViT)"))
    include_1d: bool = field(default=False, metadata=_help(
        "count 1-D parameters (biases, norm affines) in the distance (DC skips them)"))
    init: str = field(default="real", metadata=_help("synset init: real (random images of the cluster) or noise"))
    levels: str = field(default="cluster,class", metadata=_help(
        "which synsets to learn: cluster (K groups), class (L groups, for the hierarchical search), or both"))
    group_grads: str = field(default="auto", metadata=_help(
        "how per-cluster real gradients are batched: vmap, loop, or auto (vmap on CUDA, loop on CPU, "
        "where vmap measured 2x slower)"))
    group_chunk: int = field(default=0, metadata=_help(
        "groups computed together (one vmap call per step; bounds memory) and the unit of --shards; 0 = 32"))

    target: str = field(default="influence", metadata=_help(
        "what a synset matches: influence (the default: each group's damped Newton step of removal at theta_tau, "
        "(F + lambda I)^-1 times its summed gradient over N, F the empirical Fisher of the training rows, lambda "
        "--damping; matched by relative L2 over every parameter and removed by one fine-tune step of rate lr), "
        "pairs (a trajectory pair sampled per step, --pairing: the paper), or displacement "
        "(the group's whole contribution to training, sum over the recorded epochs of its real gradient, computed "
        "once over all its rows and matched at theta_tau by relative L2 over every parameter, so one fine-tune "
        "step of rate lr reproduces it)", added=True, legacy="pairs"))
    optimizer: str = field(default="adam", metadata=_help(
        "synset optimizer: adam (rates --lr-img and --lr-label) or sgd (momentum --img-momentum; DC, the paper)",
        added=True, legacy="sgd"))
    layer_rates: bool = field(default=True, metadata=_help(
        "--target displacement or influence only: after matching, give each synset one fine-tune rate per parameter "
        "tensor, fitted in closed form to its target (the synset's steps are too short on the classifier layer); "
        "stored in synsets.h5, used by the one-step fine-tune; the reported losses are those left at these rates; "
        "--no-layer-rates with --target pairs", added=True, legacy=False))
    contraction: int = field(default=0, metadata=_help(
        "--layer-rates only: scale every synset's rate on each parameter tensor by one factor shared by all "
        "groups, fitted by least squares so that the summed steps of the removed clusters reproduce the change of "
        "theta_tau in this many retrainings without a random half of the clusters (drop; later training shrinks "
        "each layer's share of a removal differently); stored in synsets.h5, counted in distill's seconds; 0 = off",
        added=True))
    damping: float = field(default=0.0, metadata=_help(
        "--target influence only: the ridge added to the Fisher besides the weight decay; 0 = (1 - momentum) / (lr x "
        "the training's optimizer steps), the L2 penalty early stopping amounts to", added=True))
    fisher_rows: int = field(default=0, metadata=_help(
        "--target influence only: estimate the Fisher on this many random training rows (bounds the n x n or "
        "P x P system solved); 0 = all", added=True))
    fisher_rank: int = field(default=0, metadata=_help(
        "--target influence only: use the Fisher's top this many eigenpairs (a randomized range finder streamed "
        "over the per-row gradients: P x rank memory, no n x P matrix), the rest at the ridge alone; 0 = the exact "
        "Fisher where its n x P rows and system fit 8 GiB of float64, else 256 (logged)", added=True))
    rated_matching: bool = field(default=False, metadata=_help(
        "--layer-rates only: match each parameter tensor's direction and leave its length to its fitted rate, i.e. "
        "minimise sum_l |T_l|^2 (1 - c_l |c_l|) / |T|^2 (c_l: the cosine of the synset's step on tensor l with its "
        "target), which where every c_l >= 0 is the residual left at the per-tensor rates the synsets are used at "
        "(the reported loss); off: the relative L2 at rate 1", added=True))
    tensor_weights: str = field(default="fisher-sqrt", metadata=_help(
        "--target influence only: how the training steps of the matching weigh each parameter tensor's residual: "
        "none (relative L2 over every parameter; pass it with --target pairs or displacement), fisher (by the "
        "tensor's mean Fisher diagonal tr(F_ll) / n_l at theta_tau, one more pass of per-row gradients: an error in "
        "a tensor the outputs are more sensitive to counts more), or fisher-sqrt (the default: by its square root, "
        "halfway between the two on a log scale). The reported losses stay unweighted", added=True, legacy="none"))
    lr_schedule: str = field(default="constant", metadata=_help(
        "rates of the synset optimizer over --distill-steps: constant, or cosine (decayed from --lr-img and "
        "--lr-label to 0 along a half cosine)", added=True))
    augment: str = field(default="", metadata=_help(
        "differentiable siamese augmentation (DSA) during matching: each step, one draw per group applied to its "
        "real minibatch and its synthetic images alike (paper sec. 4.1). dsa = DSA's digit strategy "
        f"{DSA_STRATEGY}, or a strategy of parts joined by _ ({', '.join(AUGMENT_PARTS)}; e.g. "
        "color_crop_cutout_flip_scale_rotate, DSA's for CIFAR); empty = off. Reported losses and gradient norms "
        "are unaugmented", added=True))

    def __post_init__(self) -> None:
        _choice(self, "method", ("ddm", "ddm-match"))
        _choice(self, "target", ("pairs", "displacement", "influence"))
        _choice(self, "optimizer", ("sgd", "adam"))
        if self.fixed_target and self.method != "ddm":
            raise ConfigError(f"--target {self.target} reverses a group's contribution (--method ddm), not with "
                              f"--method {self.method}: pass --method ddm, or {self._to_pairs()}")
        if self.layer_rates and not self.fixed_target:
            raise ConfigError("--layer-rates fits each synset's fine-tune rates to its displacement target: pass "
                              f"--target displacement or influence, or --no-layer-rates{self._unweighted()}")
        if self.damping < 0:
            raise ConfigError(f"--damping is a ridge added to the Fisher (0 = from the training's steps); got "
                              f"{self.damping}")
        if self.fisher_rows < 0:
            raise ConfigError(f"--fisher-rows is a number of training rows (0 = all); got {self.fisher_rows}")
        if self.fisher_rank < 0:
            raise ConfigError(f"--fisher-rank is a number of eigenpairs (0 = the exact Fisher); got {self.fisher_rank}")
        if (self.damping or self.fisher_rows or self.fisher_rank) and self.target != "influence":
            raise ConfigError("--damping, --fisher-rows and --fisher-rank shape --target influence's Fisher: pass "
                              "--target influence, or leave them at 0")
        if self.rated_matching and not self.layer_rates:
            raise ConfigError("--rated-matching matches each tensor up to its fitted fine-tune rate: pass --layer-rates "
                              "(with --target displacement or influence), or --no-rated-matching")
        _choice(self, "lr_schedule", ("constant", "cosine"))
        _choice(self, "tensor_weights", ("none", "fisher", "fisher-sqrt"))
        if self.contraction < 0:
            raise ConfigError(f"--contraction is a number of retrainings (0 = off); got {self.contraction}")
        if self.contraction and not self.layer_rates:
            raise ConfigError("--contraction scales the per-tensor fine-tune rates: pass --layer-rates (with --target "
                              "displacement or influence), or --contraction 0")
        if self.contraction and "cluster" not in self.level_list():
            raise ConfigError("--contraction is fitted on the cluster synsets: add cluster to --levels, or "
                              "--contraction 0")
        _ = self.augment_parts  # refuses unknown parts
        if self.augment and self.fixed_target:
            raise ConfigError(f"--augment augments the real minibatch of each step, and --target {self.target} has "
                              f"none: pass {self._to_pairs()}, or --augment ''")
        if self.tensor_weights != "none" and self.target != "influence":
            default = " (the default)" if self.tensor_weights == DistillConfig.tensor_weights else ""
            raise ConfigError(f"--tensor-weights {self.tensor_weights}{default} reads the Fisher that --target "
                              f"influence computes: pass --target influence, or --tensor-weights none")
        _choice(self, "pairing", ("auto", "reverse", "alg1", "same"))
        _choice(self, "distance", ("cos", "mse"))
        _choice(self, "init", ("real", "noise"))
        _choice(self, "syn_labels", ("hard", "learn"))
        _positive(self, "lr_label")
        _choice(self, "group_grads", ("auto", "vmap", "loop"))
        _positive(self, "step_length", "ipc", "distill_steps", "batch_real")
        _positive(self, "lr_img", strict=True)
        if self.group_chunk < 0:
            raise ConfigError(f"--group-chunk must be >= 0 (0 = 32), got {self.group_chunk}")
        bad = set(self.level_list()) - {"cluster", "class"}
        if bad or not self.level_list():
            raise ConfigError(f"--levels must name cluster and/or class (comma-separated), got {self.levels!r}")

    def _to_pairs(self) -> str:
        """The flags that switch these options to trajectory-pair matching (for refusals)."""
        extra = " --no-layer-rates" if self.layer_rates else ""
        return (f"--target pairs{extra}{self._unweighted()}{' --contraction 0' if self.contraction else ''} "
                f"(or --preset paper)")

    def _unweighted(self) -> str:
        """`` --tensor-weights none`` where these options weigh tensors (for refusals that leave --target influence)."""
        return " --tensor-weights none" if self.tensor_weights != "none" else ""

    def level_list(self) -> list[str]:
        return [s.strip() for s in self.levels.split(",") if s.strip()]

    def resolved_pairing(self) -> str:
        if self.pairing != "auto":
            return self.pairing
        return "reverse" if self.method == "ddm" else "same"

    @property
    def augment_parts(self) -> tuple[str, ...]:
        """The DSA parts ``--augment`` names (``dsa`` = :data:`DSA_STRATEGY`); () = no augmentation."""
        text = DSA_STRATEGY if self.augment == "dsa" else self.augment
        parts = tuple(p for p in text.split("_") if p)
        bad = [p for p in parts if p not in AUGMENT_PARTS]
        if bad or len(set(parts)) != len(parts) or (text and not parts):
            raise ConfigError(f"--augment must be dsa or parts joined by _ among {', '.join(AUGMENT_PARTS)}, each "
                              f"once (e.g. {DSA_STRATEGY}); got {self.augment!r}")
        return parts

    @property
    def fixed_target(self) -> bool:
        """One fixed target per group, matched at theta_tau (``--target displacement`` or ``influence``), not
        sampled trajectory pairs."""
        return self.target in ("displacement", "influence")

    @property
    def sign(self) -> float:
        """-1: compare syn with -real (reverse); +1: forward matching."""
        return -1.0 if self.method == "ddm" else 1.0

    @property
    def unlearn_direction(self) -> float:
        """How the attribute stage removes a group with these synsets: +1 descent (reverse-matched synsets point
        against the real gradient), -1 ascent (forward-matched synsets add it)."""
        return 1.0 if self.method == "ddm" else -1.0

    @property
    def block(self) -> int:
        """Groups computed together (one synthetic-side vmap call) and the unit of sharding (``--group-chunk``)."""
        return self.group_chunk or GROUP_BLOCK


@dataclass
class AttributeConfig:
    n_queries: int = field(default=10, metadata=_help("test images to explain (seeded random picks from the test subset)"))
    query_index: str = field(default="", metadata=_help(
        "explicit comma-separated test-subset positions to explain (overrides --n-queries)"))
    objective: str = field(default="dist1", metadata=_help(
        "objective stored as `scores`: dist1 (L2 change of softmax), dist2 (CE to the true label), "
        "dist3 (1/(1+dist1)), global (sum of dist2 over --n-val validation images, Eq. 14)"))
    query_mode: str = field(default="single", metadata=_help(
        "single: one objective per query image; batch: the queries form one batch query (objective averaged)"))
    n_val: int = field(default=200, metadata=_help("validation images for the global objective (disjoint from queries)"))
    perturbation: str = field(default="loo", metadata=_help(
        "loo: each p removes one cluster (W = direct removal effect); random: p ~ Bernoulli masks (the paper's "
        "random sampling; use --n-perturbations > K)"))
    n_perturbations: int = field(default=0, metadata=_help("|P| for random perturbations; 0 = K (the paper's minimum)"))
    removal_prob: float = field(default=0.5, metadata=_help("probability a cluster is removed in a random perturbation"))
    beta: str = field(default="inverse", metadata=_help(
        "WLS weights beta_p by the number of zeros z: inverse (1/z), uniform, or shap (Shapley kernel)"))
    finetune_steps: int = field(default=0, metadata=_help(
        "T: full-batch fine-tune steps on the removed synsets; 0 = 1 for --target influence or displacement synsets "
        "(one step reproduces their target), tau for --target pairs (the recorded trajectory length, Eq. 3)"))
    finetune_scale: str = field(default="auto", metadata=_help(
        "weight of each removed synset in the fine-tune loss: uniform (1 per removed synset, the paper's literal "
        "reading; --target influence and displacement synsets, whose one step of rate eta_f = lr reproduces the "
        "group's target), matched (so one step moves theta by what the cluster contributed per epoch: "
        "lr/(1-momentum) * n_k/batch * |grad D_k| / |grad S_k|, from Eq. 2-3), or auto (uniform for influence "
        "and displacement synsets, matched for --target pairs)"))
    finetune_lr: float = field(default=0.0, metadata=_help("fine-tune rate eta_f; 0 = the training lr (Eq. 3 sets eta_a = eta_f)"))
    search: str = field(default="both", metadata=_help(
        "flat (all K clusters), hierarchical (class synsets first, then the C clusters of the chosen class), or both"))
    batch_models: int = field(default=0, metadata=_help(
        "perturbed models fine-tuned together per vmap call, and the block unit of --shards; 0 = 64, fewer if "
        "memory is short"))

    def __post_init__(self) -> None:
        _choice(self, "objective", ("dist1", "dist2", "dist3", "global"))
        _choice(self, "perturbation", ("loo", "random"))
        _choice(self, "query_mode", ("single", "batch"))
        _choice(self, "beta", ("inverse", "uniform", "shap"))
        _choice(self, "finetune_scale", ("auto", "matched", "uniform"))
        _choice(self, "search", ("flat", "hierarchical", "both"))
        _positive(self, "n_queries")
        if not 0.0 < self.removal_prob < 1.0:
            raise ConfigError(f"--removal-prob must be in (0, 1), got {self.removal_prob}")
        for name in ("n_val", "n_perturbations", "finetune_steps", "batch_models"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.finetune_lr < 0:
            raise ConfigError(f"--finetune-lr must be >= 0 (0 = training lr), got {self.finetune_lr}")
        self.query_positions()

    @property
    def block(self) -> int:
        """Perturbations per work block, the unit of ``--shards`` (``--batch-models``, 0 = 64)."""
        return self.batch_models or FINETUNE_BLOCK

    def perturbation_count(self, k: int) -> int:
        """|P| of random perturbations (``--n-perturbations``; 0 = K, the paper's minimum)."""
        return self.n_perturbations or k

    def query_positions(self) -> list[int] | None:
        if not self.query_index.strip():
            return None
        try:
            return [int(s) for s in self.query_index.split(",") if s.strip()]
        except ValueError:
            raise ConfigError(f"--query-index must be comma-separated integers, got {self.query_index!r}") from None


# The default of --methods: every built-in method, in the registry's order (ddm_hpc.methods; a test checks they
# agree). Spelled out because it enters the evaluate stage key: a default that followed the registry would turn
# every evaluated run stale when a method is added.
DEFAULT_METHODS = "random,predict,clustering,ddm-seq,ddm-match,ddm,ddm-paper,ddm-soft,ddm-disp,tracin,trak"


@dataclass
class EvaluateConfig:
    """Ground truth by exact retraining and the methods compared against it (``ddm-hpc evaluate``)."""

    methods: str = field(default=DEFAULT_METHODS, metadata=_help(
        "comma-separated attribution methods to score (names are checked against the method registry, "
        "ddm_hpc.methods, when evaluate runs)", registry="methods"))
    n_removed: int = field(default=0, metadata=_help(
        "clusters retrained without, one at a time (a seeded random choice); 0 = all K"))
    gt_seeds: int = field(default=1, metadata=_help("seeds averaged per leave-out retraining"))
    noise_seeds: int = field(default=2, metadata=_help(
        "full-data reruns with other seeds: the noise floor of every metric"))
    n_masks: int = field(default=20, metadata=_help("random cluster subsets retrained for the LDS (0 = no LDS)"))
    alpha: float = field(default=0.5, metadata=_help("fraction of the clusters each LDS subset keeps"))
    lds_alphas: str = field(default="", metadata=_help(
        "further kept fractions, comma-separated, each an LDS of its own --n-masks random subsets (e.g. 0.9: a "
        "tenth of the clusters removed, where first-order methods are expected to be strongest)", added=True))
    gt_removal: str = field(default="drop", metadata=_help(
        "exact-retraining protocol(s), comma-separated, the first one heads the report: drop (leave the removed "
        "rows out of the full run's data order and re-batch the rest) or zero-weight (every minibatch keeps its "
        "slots, the removed rows' loss weight is 0: only their contribution changes)", added=True))
    peer_checkpoints: int = field(default=5, metadata=_help(
        "trajectory checkpoints (evenly spaced, theta_tau last) TracIn and TRAK use"))
    proj_dim: int = field(default=512, metadata=_help("TRAK random-projection dimension"))
    plots: bool = field(default=True, metadata=_help("write PNG plots beside report.md"))
    imported_recipe: str = field(default="", metadata=_help(
        "for a run made by import-trajectory: 'ddm-hpc' states that ddm-hpc's recipe made its checkpoints (theta_0 "
        "of --model with --seed, SGD with --lr/--momentum/--weight-decay/--batch-size, ddm-hpc's per-epoch order), "
        "so evaluate and diagnose may retrain it exactly; empty = they refuse an imported run", added=True))

    def __post_init__(self) -> None:
        if self.imported_recipe not in ("", "ddm-hpc"):
            raise ConfigError(f"--imported-recipe {self.imported_recipe!r}: the only recipe exact retraining "
                              "reproduces is 'ddm-hpc' (leave it empty otherwise)")
        if not self.method_list():
            raise ConfigError("--methods is empty: name at least one method, e.g. --methods random,ddm")
        _positive(self, "gt_seeds", "peer_checkpoints", "proj_dim")
        for name in ("n_removed", "noise_seeds", "n_masks"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not 0.0 < self.alpha < 1.0:
            raise ConfigError(f"--alpha must be in (0, 1), got {self.alpha}")
        alphas = self.alpha_list()
        if len(set(alphas)) != len(alphas):
            raise ConfigError(f"--lds-alphas {self.lds_alphas!r} repeats a kept fraction (--alpha is {self.alpha:g}): "
                              "list each fraction once")
        removals = self.removal_list()
        bad = [r for r in removals if r not in REMOVALS]
        if bad or not removals or len(set(removals)) != len(removals):
            raise ConfigError(f"--gt-removal {self.gt_removal!r}: list each of {', '.join(REMOVALS)} at most once, "
                              "e.g. --gt-removal drop,zero-weight")

    def method_list(self) -> list[str]:
        return _csv(self.methods)

    def alpha_list(self) -> list[float]:
        """The LDS kept fractions: ``--alpha`` first, then ``--lds-alphas``."""
        try:
            extra = [float(v) for v in _csv(self.lds_alphas)]
        except ValueError:
            raise ConfigError(f"--lds-alphas must be comma-separated fractions, e.g. 0.9; got {self.lds_alphas!r}"
                              ) from None
        for a in extra:
            if not 0.0 < a < 1.0:
                raise ConfigError(f"--lds-alphas: each kept fraction must be in (0, 1), got {a:g}")
        return [self.alpha, *extra]

    def removal_list(self) -> list[str]:
        """The ground-truth removal protocols (``--gt-removal``), the headline one first."""
        return _csv(self.gt_removal)

    def removed_count(self, k: int) -> int:
        """Clusters retrained without one at a time (``--n-removed``; 0, or K and more, = all K)."""
        return k if self.n_removed == 0 or self.n_removed >= k else self.n_removed


REMOVALS = ("drop", "zero-weight")  # --gt-removal: the ground-truth removal protocols (ddm_hpc.retrain)
DIAGNOSTICS = ("useless", "noisy", "unlearn", "privacy", "transfer", "pictures")


def _percent_list(text: str, flag: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--{flag} must be comma-separated percentages, e.g. '10,20', got {text!r}") from None
    if not vals or any(not 0.0 < v < 100.0 for v in vals):
        raise ConfigError(f"--{flag} must list percentages strictly between 0 and 100, got {text!r}")
    return vals


@dataclass
class DiagnoseConfig:
    """Model behaviours beyond one prediction (``ddm-hpc diagnose``; the paper's sec. 4 and supp. sec. 9)."""

    tasks: str = field(default=",".join(DIAGNOSTICS), metadata=_help(
        "comma-separated diagnostics: useless (Table 3), noisy (Table 6), unlearn (Table 4), privacy (Fig. 4/5), "
        "transfer (Table 7), pictures (Fig. 3 heat map, top-k cluster grids, scatter)"))
    fractions: str = field(default="1,10,20,50", metadata=_help(
        "useless: percentages of the training data removed, lowest-ranked first (paper Table 3: 1,10,20,50)"))
    removal_seeds: int = field(default=3, metadata=_help(
        "retraining seeds per removal (random removal: also a new random subset per seed); tables show mean +- std"))
    corruptions: str = field(default="noise,labels", metadata=_help(
        "noisy: how the corrupted copy is made, comma-separated: noise (additive Gaussian, --noise-level), labels "
        "(label flipped to another class)"))
    corrupt_fraction: float = field(default=0.2, metadata=_help(
        "noisy: fraction of the training images corrupted (paper supp. 9.2: 0.2)"))
    noise_level: float = field(default=0.1, metadata=_help(
        "noisy: per-pixel std of the additive noise, in [0, 1] pixel units before normalisation (the paper's "
        "'perturbation norm of 0.1'; clipped to [0, 1])"))
    noisy_fractions: str = field(default="10,20,30,40", metadata=_help(
        "noisy: percentages removed, worst-ranked first (paper Table 6: 10,20,30,40)"))
    learned_labels: bool = field(default=True, metadata=_help(
        "useless/noisy: also rank with learned-label synsets (--syn-labels learn), distilled in RUN/variants/ddm-soft "
        "(the corrupted run's own for noisy) if missing: the check of the hard-label sign failure"))
    unlearn_clusters: int = field(default=5, metadata=_help(
        "unlearn: clusters unlearned one at a time and compared with exact retraining without them"))
    transfer_fractions: str = field(default="10,20,30,40", metadata=_help(
        "transfer: percentages removed from the teacher's training data before distilling the student (Table 7)"))
    student_model: str = field(default="mlp", metadata=_help("transfer: the student architecture (registered model)"))
    student_width: int = field(default=64, metadata=_help("transfer: the student's width (mlp: hidden units)"))
    kd_alpha: float = field(default=0.5, metadata=_help(
        "transfer: weight of KL(student, teacher) in the student's loss, Eq. 15 (1 - alpha on CE)"))
    kd_temperature: float = field(default=4.0, metadata=_help("transfer: softmax temperature of the KL term"))
    top_k: int = field(default=5, metadata=_help("pictures: responsible clusters shown per query"))
    n_members: int = field(default=8, metadata=_help("pictures: member images shown per cluster"))
    n_pictures: int = field(default=4, metadata=_help("pictures: queries drawn as top-k grids"))
    n_real: int = field(default=500, metadata=_help(
        "privacy: real training images compared against the synsets and against each other"))
    mia_epochs: int = field(default=50, metadata=_help(
        "privacy: epochs of training a fresh model on a synset for the membership-inference test"))

    def __post_init__(self) -> None:
        bad = [t for t in self.task_list() if t not in DIAGNOSTICS]
        if bad or not self.task_list():
            raise ConfigError(f"--tasks {self.tasks!r}: unknown {bad or 'empty list'}; choose from {', '.join(DIAGNOSTICS)}")
        bad = [c for c in self.corruption_list() if c not in ("noise", "labels")]
        if bad or not self.corruption_list():
            raise ConfigError(f"--corruptions {self.corruptions!r}: choose noise and/or labels")
        for name in ("fractions", "noisy_fractions", "transfer_fractions"):
            _percent_list(getattr(self, name), name.replace("_", "-"))
        _positive(self, "removal_seeds", "student_width", "top_k", "n_members", "n_pictures", "n_real", "mia_epochs",
                  "kd_temperature")
        _positive(self, "unlearn_clusters", strict=False)
        if not 0.0 < self.corrupt_fraction < 1.0:
            raise ConfigError(f"--corrupt-fraction must be in (0, 1), got {self.corrupt_fraction}")
        if not 0.0 <= self.kd_alpha <= 1.0:
            raise ConfigError(f"--kd-alpha must be in [0, 1], got {self.kd_alpha}")
        if self.noise_level < 0:
            raise ConfigError(f"--noise-level must be >= 0, got {self.noise_level}")

    def task_list(self) -> list[str]:
        return _csv(self.tasks)

    def corruption_list(self) -> list[str]:
        return _csv(self.corruptions)

    def percents(self, name: str) -> list[float]:
        """``fractions``, ``noisy_fractions`` or ``transfer_fractions`` as floats (percent)."""
        return _percent_list(getattr(self, name), name.replace("_", "-"))


KERNELS = ("auto", "triton", "reference")  # --kernel choices (kernels.matching_loss's ``backend``)


@dataclass
class RuntimeConfig:
    """Where and how to run; not part of any stage key (results do not depend on it)."""

    out: str = field(default="runs/default", metadata=_help("run directory holding the stage artifacts"))
    device: str = field(default="auto", metadata=_help("auto (cuda if present), cpu, cuda, cuda:N"))
    executor: str = field(default="local", metadata=_help(
        "job executor: local (this machine: in-process, or --workers processes), debug (submitit's in-process "
        "debug executor: a failing task opens pdb post-mortem), slurm (submitit job arrays; options from --profile and --slurm-* flags)"))
    overwrite: bool = field(default=False, metadata=_help(
        "recompute the requested stages even where an artifact exists (required when it was made with another config)"))
    progress: bool = field(default=True, metadata=_help("show progress bars"))
    data_cache: str = field(default="memory", metadata=_help(
        "memory: every process loads the dataset into its own memory; mmap: the first load streams the source "
        "chunk by chunk into raw (uint8) arrays under RUN/.data/<key>/ and every load (stages, --workers processes, "
        "SLURM tasks) maps them and normalises the rows it reads, so no process holds the dataset and processes "
        "share the page cache (results are bit-identical)"))
    loader_workers: int = field(default=0, metadata=_help(
        "processes that read training minibatches when the training set is not copied to the device whole "
        "(--data-cache mmap on CPU, or a set larger than a quarter of free GPU memory); 0 = read them in the "
        "training process (same results either way)"))
    shards: int = field(default=1, metadata=_help(
        "tasks per sharded stage (distill: groups, attribute: perturbation blocks); each writes its own HDF5 shard "
        "under RUN/shards and the merged artifact is the same for any value"))
    workers: int = field(default=1, metadata=_help(
        "local executor: shards run at once in separate processes (1 = in this process; 0 = one per CPU core)"))
    threads: int = field(default=0, metadata=_help(
        "torch CPU threads of this process (0 = torch's default, one per physical core; --workers processes split "
        "the cores). "
        "On cores shared with other jobs, 1 avoids threads spinning against each other (a run took 6x longer "
        "beside one other job); the last bits of CPU results depend on the thread count", added=True))
    profile: str = field(default="", metadata=_help(
        "SLURM profile (YAML/TOML: partition, gpus_per_task, cpus_per_task, mem_gb, timeout_min, array_parallelism, "
        "account, qos, constraint, additional, setup), e.g. slurm/gpu-cluster.yaml; --slurm-* flags override it"))
    slurm_partition: str = field(default="", metadata=_help("SLURM partition (overrides the profile)"))
    slurm_gpus_per_task: int | None = field(default=None, metadata=_help("GPUs per task (overrides the profile)"))
    slurm_cpus_per_task: int | None = field(default=None, metadata=_help("CPUs per task (overrides the profile)"))
    slurm_mem_gb: float | None = field(default=None, metadata=_help("memory per task in GB (overrides the profile)"))
    slurm_time: int | None = field(default=None, metadata=_help("time limit per task in minutes (overrides the profile)"))
    slurm_array_parallelism: int | None = field(default=None, metadata=_help(
        "array tasks running at once (overrides the profile)"))
    slurm_account: str = field(default="", metadata=_help("SLURM account (overrides the profile)"))
    slurm_qos: str = field(default="", metadata=_help("SLURM QOS (overrides the profile)"))
    slurm_constraint: str = field(default="", metadata=_help("SLURM node constraint (overrides the profile)"))
    slurm_extra: str = field(default="", metadata=_help(
        "extra sbatch options, ';'-separated key=value, e.g. 'reservation=abc;exclusive'"))
    plugins: str = field(default="", metadata=_help(
        "comma-separated modules or .py files imported first, here and in every job, for what they register "
        "(attribution methods for --methods, models for --model), e.g. 'mylab.ddm_methods,./toy.py'"))
    kernel: str = field(default="auto", metadata=_help(
        "matching-loss implementation of the distill stage: triton (the fused Triton kernels; needs CUDA tensors, "
        "a C compiler and Python headers on the node), reference (pure torch, kernels/reference.py), or auto "
        "(triton on CUDA when Triton can compile there, else reference; the choice is logged once). Results agree "
        "to float rounding (~1e-6)", added=True))
    deterministic: bool = field(default=True, metadata=_help(
        "on CUDA: deterministic cuDNN/cuBLAS algorithms and torch.use_deterministic_algorithms (warn-only), so "
        "a rerun on the same GPU model and software reproduces every bit; --no-deterministic lets cuDNN benchmark "
        "for speed (reruns then differ in the last bits). No effect on CPU", added=True))

    def __post_init__(self) -> None:
        _choice(self, "executor", ("local", "debug", "slurm"))
        _choice(self, "kernel", KERNELS)
        _choice(self, "data_cache", ("memory", "mmap"))
        if self.shards < 1:
            raise ConfigError(f"--shards must be >= 1, got {self.shards}")
        if self.loader_workers < 0:
            raise ConfigError(f"--loader-workers must be >= 0 (0 = read minibatches in-process), got {self.loader_workers}")
        if self.workers < 0:
            raise ConfigError(f"--workers must be >= 0 (0 = one per core), got {self.workers}")
        if self.threads < 0:
            raise ConfigError(f"--threads must be >= 0 (0 = one per core), got {self.threads}")

    @property
    def worker_count(self) -> int:
        """Local worker processes (``--workers``; 0 = one per CPU core)."""
        return self.workers or os.cpu_count() or 1

    def torch_device(self) -> torch.device:
        """The device every stage computes on (``--device``; auto = cuda if usable), set up per ``--deterministic``."""
        return resolve_device(self.device, self.deterministic)


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "cluster": ClusterConfig,
    "distill": DistillConfig,
    "attribute": AttributeConfig,
    "evaluate": EvaluateConfig,
    "diagnose": DiagnoseConfig,
    "runtime": RuntimeConfig,
}


@dataclass
class Config:
    seed: int = field(default=0, metadata=_help("seed of every random choice (init, data order, k-means, synsets, queries)"))
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    attribute: AttributeConfig = field(default_factory=AttributeConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    diagnose: DiagnoseConfig = field(default_factory=DiagnoseConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def finetune_weighting(self) -> str:
        """How removed synsets are weighted in the fine-tune loss (``--finetune-scale``; auto = uniform for
        ``--target influence`` and ``displacement`` synsets, matched for trajectory pairs)."""
        scale = self.attribute.finetune_scale
        if scale == "auto":
            return "uniform" if self.distill.fixed_target else "matched"
        return scale

    def finetune_step_count(self, tau: int) -> int:
        """T, the fine-tune steps (``--finetune-steps``; 0 = one step for influence and displacement synsets, tau,
        the trajectory length, for trajectory pairs, Eq. 3)."""
        return self.attribute.finetune_steps or (1 if self.distill.fixed_target else tau)

    @property
    def finetune_rate(self) -> float:
        """eta_f, the unlearning fine-tune rate (``--finetune-lr``; 0 = the training lr: Eq. 3 sets eta_a = eta_f)."""
        return self.attribute.finetune_lr or self.train.lr

    def stage_dict(self, stage: str) -> dict[str, Any]:
        """The config a stage's result depends on: the seed and its sections (``graph.Stage.sections``)."""
        d = {"seed": self.seed}
        for sec in graph.stage(stage).sections:
            d[sec] = _key_dict(getattr(self, sec))
        return d

    def stage_key(self, stage: str) -> str:
        blob = json.dumps(self.stage_dict(stage), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        """Build from a (possibly partial) nested dict; unknown keys raise ConfigError."""
        kwargs: dict[str, Any] = {}
        for key, val in d.items():
            if key == "seed":
                if isinstance(val, bool) or not isinstance(val, int) and not (isinstance(val, float) and val.is_integer()):
                    raise ConfigError(f"--seed must be an integer, got {val!r}: fix it in the config file or flag")
                kwargs["seed"] = int(val)
            elif key in SECTIONS:
                known = {f.name for f in dataclasses.fields(SECTIONS[key])}
                bad = set(val) - known
                if bad:
                    raise ConfigError(f"unknown option(s) {sorted(bad)} in config section {key!r}; known: {sorted(known)}")
                kwargs[key] = SECTIONS[key](**{name: _typed(SECTIONS[key], name, v) for name, v in val.items()})
            else:
                raise ConfigError(f"unknown config section {key!r}; known: seed, {', '.join(SECTIONS)}")
        return cls(**kwargs)


def _typed(section: type, name: str, value: Any) -> Any:
    """``value`` as the field's declared type (int, float, str, bool), or a one-line ConfigError naming the option.

    Integral floats (``10.0`` from JSON) become ints; anything else of the wrong type (``"ten"``, ``2.5`` for an
    integer option, a list) is refused before any stage runs."""
    kind = {f.name: f.type for f in dataclasses.fields(section)}[name]
    flag = f"--{name.replace('_', '-')}"
    ok = True
    if kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "int":
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)  # kept as given: the stage keys hash it
    elif kind == "str":  # numbers (``query_index: 5`` in YAML) and paths read as their text
        if isinstance(value, (int, float, os.PathLike)) and not isinstance(value, bool):
            value = os.fspath(value) if isinstance(value, os.PathLike) else str(value)
        ok = isinstance(value, str)
    if not ok:
        want = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false"}.get(kind, kind)
        raise ConfigError(f"{flag} must be {want}, got {value!r}: fix it in the config file, preset or flag")
    return value


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Nested dict update (override wins) without mutating either input."""
    out = json.loads(json.dumps(base))
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Human-readable differences 'section.field: old -> new'."""
    lines = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            lines += diff(a, b, f"{prefix}{k}.")
        elif a != b:
            lines.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return lines


# The distill options whose defaults were the paper's trajectory-pair matching before influence matching became the
# default (issue 18): hard labels, one image per cluster, SGD on the images at 0.1, 100 steps, no per-tensor rates
# or tensor weights.
# --preset paper and the pair-matching variants (ddm-paper, ddm-match, ddm-soft) pin them.
PAIRS_DISTILL: dict[str, Any] = {"target": "pairs", "syn_labels": "hard", "ipc": 1, "optimizer": "sgd", "lr_img": 0.1,
                                 "lr_label": 1.0, "distill_steps": 100, "layer_rates": False, "tensor_weights": "none"}


def paper_preset() -> dict[str, Any]:
    """The paper's method at the paper's scale (Table 5, MNIST row; Alg. 1; sec. 4.1); GPU-sized, not CPU-sized.

    Algorithm 1's pairing (real gradient at theta_t, synthetic at theta_{t+4}) rather than Eq. 6's tau - t:
    Table 5 gives a step length of 4, which only Algorithm 1 uses. lr_net 0.001 is Table 5's MNIST value (pass
    ``--lr 0.01`` for CIFAR and TinyImageNet). Random perturbations with |P| = K and synsets weighted 1 (Eq. 9 as
    written). DSA augmentation during matching (sec. 4.1; ``--augment dsa``: DSA's strategy for digits, every part
    but flip; pass ``--augment color_crop_cutout_flip_scale_rotate`` for CIFAR). Not pinned: MSE for SimpleViT (pass
    ``--distance mse``).
    """
    return {
        "data": {"n_train": 0, "n_test": 0},
        "model": {"width": 0},
        "train": {"lr": 0.001, "epochs": 30},
        "distill": {**PAIRS_DISTILL, "pairing": "alg1", "step_length": 4, "distill_steps": 50, "lr_img": 0.1,
                    "batch_real": 256, "augment": "dsa"},
        "attribute": {"n_queries": 20, "perturbation": "random", "n_perturbations": 0, "finetune_scale": "uniform",
                      "finetune_steps": 0},
    }


def smoke_preset() -> dict[str, Any]:
    """A seconds-long run for tests and CI: tiny subset, narrow net, few epochs and steps."""
    return {
        "data": {"n_train": 300, "n_test": 100},
        "model": {"width": 8},
        "train": {"epochs": 3, "batch_size": 64},
        "cluster": {"clusters_per_class": 3},
        "distill": {"distill_steps": 5, "batch_real": 16},
        "attribute": {"n_queries": 3, "n_val": 20},
    }


def eval_preset() -> dict[str, Any]:
    """``ddm-hpc evaluate`` on CPU within the hour (issue 3): 2000 MNIST images, width 16, 15 epochs,
    K = 50 (5 clusters per class), 20 queries; 83 exact retrainings of ~10 s each."""
    return {
        "model": {"width": 16},
        "train": {"epochs": 15},
        "cluster": {"clusters_per_class": 5},
        "attribute": {"n_queries": 20},
        "evaluate": {"n_masks": 30, "noise_seeds": 2},
    }


PRESETS = {"default": dict, "paper": paper_preset, "smoke": smoke_preset, "eval": eval_preset}


def _csv(text: str) -> list[str]:
    """Comma-separated names, stripped, empty ones dropped."""
    return [v.strip() for v in text.split(",") if v.strip()]


def _positive(obj: Any, *names: str, strict: bool = True) -> None:
    for name in names:
        v = getattr(obj, name)
        if (v <= 0) if strict else (v < 0):
            raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {v}")


def _choice(obj: Any, name: str, choices: tuple[str, ...]) -> None:
    v = getattr(obj, name)
    if v not in choices:
        raise ConfigError(f"--{name.replace('_', '-')} must be one of {', '.join(choices)}; got {v!r}")
