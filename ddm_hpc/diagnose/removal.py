"""Remove the data a ranking marks, retrain exactly, measure: Tables 3, 6 and 7 of the paper.

Rankings (per training sample; clusters are removed whole, lowest-ranked first, and the cluster at
the cut is split in a seeded order so every method removes exactly the same number of rows):

  ddm     the DDM removal effect on an objective over the validation images of the attribute
          stage (``val_index``): each cluster's synset is unlearned alone (leave-one-out fine-tunes
          of theta_tau, as the attribute stage does) and the objective is re-measured.
          useless/noisy: Eq. 14, sum over the validation images of Dist2 (cross-entropy to the true
          label); a cluster whose removal *lowers* it most is removed first.
  ddm-soft the same with learned-label synsets (``--learned-labels``, default on; distilled in the
          run's ``variants/ddm-soft``, which ``ddm-hpc evaluate`` shares): the check of the hard-label
          sign failure (useless, noisy).
          transfer: sum over the validation images of KL(teacher || student), the distillation loss
          of Eq. 15 for a student trained from the full teacher; clusters whose removal lowers it
          most (the teacher moves toward what the student can follow) are removed first.
  loss    the simple alternative for data cleaning: samples with the highest cross-entropy under
          theta_tau first (useless, noisy).
  random  a new random subset per seed.
  random-clusters (useless) whole clusters in a random order, class-balanced: DDM's granularity
          without its ranking, so the table separates "which clusters" from "clusters at all".
  *-bal   the same ranking applied within each class (:func:`class_balanced`): every removal amount
          takes the same share of each class, lowest-ranked first.

Every removal is retrained exactly (:func:`ddm_hpc.retrain.retrain_keep`: same theta_0, schedule
and data order as the full run) with ``--removal-seeds`` seed offsets, through the job layer (one
shard per retraining: local processes or a SLURM array; results cached per job in
``RUN/diagnose/<name>-retrained.h5``), and scored by test accuracy (transfer: the
accuracy of a student distilled from the retrained teacher on the same kept data, Eq. 15).

Room: a task module of ``diagnose`` (imports ``attribute`` for its setup, ``config``, ``context``,
``data``, ``diagnose.base``, ``graph``, ``launch``, ``metrics``, ``models``, ``retrain``, ``storage``,
``train``, ``trajectory``, ``variants``).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ddm_hpc.attribute import attribute_setup, loo_perturbations
from ddm_hpc.config import Config
from ddm_hpc.context import RunContext, load_data
from ddm_hpc.data import DatasetBundle, denormalize, dense
from ddm_hpc.diagnose.base import Section, Task, diagnose_dir, register
from ddm_hpc.errors import ConfigError, StageError
from ddm_hpc.graph import RUN
from ddm_hpc.launch import run_sharded, shard_range
from ddm_hpc.metrics import spearman
from ddm_hpc.models import build_model, build_target
from ddm_hpc.retrain import retrain_keep
from ddm_hpc.storage import ParamTable, artifact_path, atomic_h5, create_dataset, intact, open_read
from ddm_hpc.train import accuracy, epoch_order
from ddm_hpc.trajectory import load_into
from ddm_hpc.utils import generator
from ddm_hpc.variants import Variant, learned_labels

log = logging.getLogger(__name__)
LABELS = {"random": "Random select", "loss": "Highest training loss first", "ddm": "DDM (Eq. 14 ranking)",
          "ddm-bal": "DDM, class-balanced", "random-clusters": "Random whole clusters, class-balanced", "ddm-soft": "DDM + learned labels", "ddm-soft-bal":
          "DDM + learned labels, class-balanced", "ddm-kl": "DDM (KL ranking)", "ddm-kl-bal": "DDM (KL), class-balanced"}


# ----------------------------------------------------------------------------- orders and masks
def cluster_order(cluster_scores: np.ndarray, assignment: np.ndarray, seed: int) -> np.ndarray:
    """Sample order for removal: clusters by ascending score (stable), members of each in a seeded order.

    Args:
        cluster_scores: float [K]; the lowest is removed first.
        assignment: int [N] cluster of each training row.
    Returns:
        int64 [N], a permutation of the training rows.
    """
    gen = generator(seed, 89)
    tie = torch.randperm(len(assignment), generator=gen).numpy()  # within-cluster order
    rank = np.empty(len(cluster_scores), dtype=np.int64)
    rank[np.argsort(cluster_scores, kind="stable")] = np.arange(len(cluster_scores))
    return np.lexsort((tie, rank[assignment])).astype(np.int64)


def class_balanced(order: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``order`` interleaved over classes: every prefix holds the same share of each class (up to rounding),
    and each class's rows keep their order in ``order``.

    Ranking whole clusters can empty a class (at 50 % of MNIST the lowest-ranked clusters took all of
    one digit); the balanced order removes the lowest-ranked part *of each class* instead, as random
    removal does in expectation.
    """
    frac = np.empty(len(order))
    for c in np.unique(labels):
        rows = order[labels[order] == c]
        frac[rows] = (np.arange(len(rows)) + 0.5) / len(rows)
    return np.lexsort((labels, frac)).astype(np.int64)


def sample_order(sample_scores: np.ndarray) -> np.ndarray:
    """Sample order for removal by a per-sample score, the highest first (stable)."""
    return np.argsort(-sample_scores, kind="stable").astype(np.int64)


def keep_first(order: np.ndarray, n_remove: int) -> np.ndarray:
    """bool [N]: False for the first ``n_remove`` rows of ``order``."""
    keep = np.ones(len(order), dtype=bool)
    keep[order[:n_remove]] = False
    return keep


def n_removed(percent: float, n: int) -> int:
    return int(round(percent / 100.0 * n))


def precision_recall(keep: np.ndarray, corrupted: np.ndarray) -> tuple[float, float]:
    """Of the removed rows, the share corrupted (precision); of the corrupted rows, the share removed (recall)."""
    removed = ~keep
    hit = float((removed & corrupted).sum())
    return hit / max(int(removed.sum()), 1), hit / max(int(corrupted.sum()), 1)


# ----------------------------------------------------------------------------- DDM on a validation objective
@dataclass
class ValRemoval:
    """DDM's leave-one-cluster-out models on the attribute stage's validation images."""

    probs: torch.Tensor  # float32 [K, V, L] softmax of theta_tau with cluster k's synset unlearned
    base: torch.Tensor  # float32 [V, L] softmax of theta_tau
    labels: torch.Tensor  # int64 [V]
    x: torch.Tensor  # float32 [V, C, H, W]

    def eq14(self) -> np.ndarray:
        """float64 [K]: change of the summed validation cross-entropy (Eq. 14) when cluster k is unlearned."""
        return (ce_sum(self.probs, self.labels) - ce_sum(self.base, self.labels)).double().numpy()


def val_removal_probs(cfg: Config, bundle: DatasetBundle) -> ValRemoval:
    """Leave-one-cluster-out fine-tunes of theta_tau on the cluster synsets (the attribute stage's
    fine-tune: same steps, rate, scale, direction), evaluated on its validation images."""
    if cfg.attribute.n_val <= 0:
        raise ConfigError("the useless/transfer rankings need validation images: pass --n-val 200 (reruns attribute)")
    flat = dataclasses.replace(cfg, attribute=dataclasses.replace(cfg.attribute, search="flat"))  # cluster synsets only
    setup = attribute_setup(flat, bundle)
    sc, level = setup.scorer, setup.levels["cluster"]
    probs = setup.unlearner.unlearn(level, loo_perturbations(len(level.size)), sc.eval_x,
                                    desc="unlearn each cluster (validation)")
    return ValRemoval(probs[:, sc.n_q:], sc.base[sc.n_q:], sc.eval_y[sc.n_q:], sc.eval_x[sc.n_q:].cpu())


def eq14_scores(cfg: Config, bundle: DatasetBundle) -> np.ndarray:
    """float64 [K]: Eq. 14 per cluster. With leave-one-out perturbations the attribute stage's flat fit is
    exact, so its ``objectives/global/scores`` are read; otherwise the fine-tunes are run here."""
    path = artifact_path(cfg.runtime.out, "attribute")
    if cfg.attribute.perturbation == "loo" and cfg.attribute.n_val > 0:
        with open_read(path) as f:
            if "objectives/global/scores" in f:
                return f["objectives/global/scores"][0].astype(np.float64)
    return val_removal_probs(cfg, bundle).eq14()


def soft_variant(cfg: Config, parent: Variant | None = None) -> Variant | None:
    """The learned-label synsets the useless/noisy rankings also use: ``variants/ddm-soft`` of the run (or of the
    ``parent`` variant, e.g. a corrupted copy), the variant ``ddm-hpc evaluate`` makes too (this run's
    train.h5/clusters.h5, distilled with ``--syn-labels learn``). None when ``--no-learned-labels`` or the run's own
    synsets already have learned labels."""
    own = parent.config(cfg) if parent is not None else cfg
    if not cfg.diagnose.learned_labels or own.distill.syn_labels == "learn":
        return None
    return learned_labels(parent=parent)


def soft_label_scores(cfg: Config, bundle: DatasetBundle, parent: Variant | None = None) -> np.ndarray | None:
    """Eq. 14 per cluster with the learned-label synsets of :func:`soft_variant` (None if there are none)."""
    variant = soft_variant(cfg, parent)
    return None if variant is None else eq14_scores(variant.config(cfg), bundle)


def ce_sum(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Eq. 14: sum over the images of Dist2 = -log p(true label); probs [..., V, L] -> [...]."""
    p = probs.gather(-1, labels.expand(*probs.shape[:-1]).unsqueeze(-1))[..., 0]
    return -p.clamp(min=1e-12).log().sum(-1)


def kl_sum(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """sum over the images of KL(teacher || student); teacher [..., V, L], student [V, L] -> [...]."""
    t = teacher.clamp(min=1e-12)
    return (t * (t.log() - student.clamp(min=1e-12).log())).sum((-1, -2))


def training_loss(cfg: Config, bundle: DatasetBundle, device: torch.device) -> np.ndarray:
    """float64 [N]: cross-entropy of every training sample under theta_tau (the ``loss`` ranking)."""
    logits = predict(RunContext(cfg, bundle, device).trained_model(), bundle.x_train, device)
    return F.cross_entropy(logits, bundle.y_train, reduction="none").double().numpy()


def assignment_of(run_dir: Path) -> np.ndarray:
    with open_read(artifact_path(run_dir, "cluster")) as f:
        return f["clusters/assignment"][()]


# ----------------------------------------------------------------------------- the student (Eq. 15)
def build_student(cfg: Config, bundle: DatasetBundle, seed: int) -> nn.Module:
    """The student of Eq. 15 (``--student-model``, ``--student-width``), initialised from ``seed``."""
    dc = cfg.diagnose
    kw = {"hidden": dc.student_width} if dc.student_model == "mlp" else {"width": dc.student_width}
    torch.manual_seed(seed)
    return build_model(dc.student_model, bundle.in_channels, bundle.num_classes, bundle.image_size, **kw)


def train_student(cfg: Config, bundle: DatasetBundle, teacher: nn.Module, keep: torch.Tensor, seed: int,
                  device: torch.device) -> nn.Module:
    """Knowledge distillation, Eq. 15: (1 - alpha) CE(student, y) + alpha T^2 KL(teacher_T || student_T).

    The student sees the same kept rows, schedule and per-epoch order as the teacher's training.
    """
    dc, tc = cfg.diagnose, cfg.train
    student = build_student(cfg, bundle, seed).to(device).train()
    teacher = teacher.to(device).eval()
    x, y = bundle.x_train.to(device), bundle.y_train.to(device)
    with torch.no_grad():
        t_logits = torch.cat([teacher(x[i:i + 1024]) for i in range(0, len(y), 1024)])
    opt = torch.optim.SGD(student.parameters(), lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay)
    temp, alpha = dc.kd_temperature, dc.kd_alpha
    keep = keep.bool().cpu()
    for epoch in range(1, tc.epochs + 1):
        order = epoch_order(len(y), seed, epoch)
        order = order[keep[order]]
        for i in range(0, len(order), tc.batch_size):
            idx = order[i:i + tc.batch_size].to(device)
            out = student(x[idx])
            kd = F.kl_div(F.log_softmax(out / temp, -1), F.log_softmax(t_logits[idx] / temp, -1), log_target=True,
                          reduction="batchmean") * temp * temp
            loss = (1 - alpha) * F.cross_entropy(out, y[idx]) + alpha * kd
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return student.eval()


# ----------------------------------------------------------------------------- retrainings via the job layer
RESULTS = ("accuracy", "student_accuracy", "seconds", "test_probs", "train_pred")


@dataclass
class RetrainPlan:
    """The retrainings of one diagnostic: job j keeps ``keep[j]`` and retrains with seed offset ``seed[j]``."""

    keep: np.ndarray  # bool [J, N]
    seed: np.ndarray  # int64 [J]
    method: list[str]  # [J]: 'full' (nothing removed) or a ranking name
    percent: np.ndarray  # float64 [J]
    student: bool = False  # also distil a student from each retrained model (Eq. 15)
    outputs: bool = False  # also return test softmax and training-set predictions of each model

    def job_keys(self, salt: str = "") -> list[bytes]:
        """Per job, a hash of what its result depends on: kept rows, seed, what is measured, and ``salt`` (the
        options of the retraining itself: :func:`retrain_salt`)."""
        flags = f"{self.student}{self.outputs}{salt}".encode()
        return [hashlib.sha256(np.packbits(k).tobytes() + int(s).to_bytes(8, "little", signed=True) + flags)
                .hexdigest()[:16].encode() for k, s in zip(self.keep, self.seed)]

    def subset(self, rows: list[int]) -> RetrainPlan:
        return RetrainPlan(self.keep[rows], self.seed[rows], [self.method[j] for j in rows], self.percent[rows], self.student,
                    self.outputs)


def retrain_plan_task(cfg: Config, shard: int, n_shards: int, plan: str = "", bundle: DatasetBundle | None = None
              ) -> dict[str, np.ndarray]:
    """Job-layer task: retrain the jobs ``shard_range(J, shard, n_shards)`` of the plan file ``plan``.

    Returns ``accuracy`` [n] (test), ``student_accuracy`` [n] (NaN unless a student plan), ``seconds`` [n],
    ``job`` [n], and for an outputs plan ``test_probs`` float32 [n, M, L] and ``train_pred`` int64 [n, N].
    """
    bundle = bundle or load_data(cfg)
    device = cfg.runtime.torch_device()
    with h5py.File(plan, "r", locking=False) as f:
        keep, seed, student, outputs = f["keep"][()], f["seed"][()], bool(f.attrs["student"]), bool(f.attrs["outputs"])
    i0, i1 = shard_range(len(seed), shard, n_shards)
    model = build_target(cfg, bundle)
    table = ParamTable.from_module(model)
    acc, s_acc, secs, probs, preds = [], [], [], [], []
    for j in range(i0, i1):
        t0 = time.perf_counter()
        keep_j = torch.from_numpy(keep[j])
        flat = retrain_keep(cfg, bundle, keep_j, int(seed[j]), device)
        teacher = load_into(model, table, flat).to(device).eval()
        acc.append(accuracy(teacher, bundle.x_test, bundle.y_test))
        if student:
            st = train_student(cfg, bundle, teacher, keep_j, cfg.seed + int(seed[j]), device)
            s_acc.append(accuracy(st, bundle.x_test, bundle.y_test))
        else:
            s_acc.append(float("nan"))
        if outputs:
            probs.append(predict(teacher, bundle.x_test, device).softmax(-1).numpy())
            preds.append(predict(teacher, bundle.x_train, device).argmax(1).numpy())
        secs.append(time.perf_counter() - t0)
    out = {"job": np.arange(i0, i1, dtype=np.int64), "accuracy": np.asarray(acc), "student_accuracy":
           np.asarray(s_acc), "seconds": np.asarray(secs)}
    if outputs:
        out.update(test_probs=np.stack(probs).astype(np.float32), train_pred=np.stack(preds).astype(np.int64))
    return out


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, device: torch.device, batch: int = 1024) -> torch.Tensor:
    """float32 [N, L] logits of ``model`` (eval mode) on ``x``, on CPU."""
    model = model.to(device).eval()
    return torch.cat([model(x[i:i + batch].to(device)).float().cpu() for i in range(0, len(x), batch)])


def merge_retrain_plan(cfg: Config, paths: list[Path], plan: str = "", bundle: DatasetBundle | None = None) -> Path:
    """Job-layer merge: the shards' results, in job order, into ``<plan>-results.h5`` beside the plan file."""
    out = Path(plan).with_name(Path(plan).stem + "-results.h5")
    arrays: dict[str, list[np.ndarray]] = {}
    for p in paths:
        with h5py.File(p, "r", locking=False) as f:
            for k in ("job", *RESULTS):
                if k in f:
                    arrays.setdefault(k, []).append(f[k][()])
    job = np.concatenate(arrays.pop("job"))
    if not np.array_equal(job, np.arange(len(job))):
        raise StageError(f"retraining shards of {plan} do not cover every job: delete its shards folder and rerun")
    with atomic_h5(out) as f:
        for k, v in arrays.items():
            create_dataset(f, k, data=np.concatenate(v))
    return out


def _read_cache(path: Path, key: str = "job_key") -> dict[str, np.ndarray]:
    """The datasets of ``path``; {} if it is missing or not a per-job cache (no ``key`` dataset)."""
    if not path.is_file() or not intact(path):  # a corrupt cache is recomputed
        return {}
    with h5py.File(path, "r", locking=False) as f:
        return {k: f[k][()] for k in f} if key in f else {}


def retrain_salt(cfg: Config, student: bool) -> str:
    """What every retraining of a plan depends on besides its rows and seed: the train stage's options (data,
    model, schedule, seed), and for a student plan the student's options."""
    dg = cfg.diagnose
    extra = [dg.student_model, dg.student_width, dg.kd_alpha, dg.kd_temperature] if student else []
    return json.dumps([cfg.stage_key("train"), extra])


def retrain_plan(cfg: Config, bundle: DatasetBundle, name: str, plan: RetrainPlan) -> dict[str, np.ndarray]:
    """Every job of ``plan`` retrained exactly; returns its results in plan order.

    Results are cached per job in ``RUN/diagnose/<name>-retrained.h5`` (keyed by kept rows, seed, what is
    measured and the retraining's options), so a rerun, or a plan with other percentages or rankings, retrains only new jobs. The
    new jobs run through the job layer, one shard each (local processes or a SLURM array, resumable).
    """
    d = diagnose_dir(cfg.runtime.out)
    cache_path = d / f"{name}-retrained.h5"
    cache = _read_cache(cache_path)
    have = {k: i for i, k in enumerate(cache.get("job_key", []))}
    keys = plan.job_keys(retrain_salt(cfg, plan.student))
    missing, seen = [], set(have)
    for j, k in enumerate(keys):  # each new job once, even if the plan lists it twice
        if k not in seen:
            missing.append(j)
            seen.add(k)
    if missing:
        todo = plan.subset(missing)
        pending = d / f"{name}-pending.h5"
        with atomic_h5(pending) as f:
            create_dataset(f, "keep", data=todo.keep)
            create_dataset(f, "seed", data=todo.seed)
            pending_key = hashlib.sha256(b"".join(keys[j] for j in missing)).hexdigest()[:16]
            f.attrs.update(key=pending_key, student=todo.student, outputs=todo.outputs)
        log.info("diagnose %s: %d exact retrainings (%d of %d cached)", name, len(missing), len(keys) - len(missing),
                 len(keys))
        one_each = dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, shards=len(missing)))
        plan_file = str(pending.resolve())
        res_path = run_sharded(f"diagnose-{name}", one_each, functools.partial(retrain_plan_task, plan=plan_file),
                               len(missing), functools.partial(merge_retrain_plan, plan=plan_file), stage="train",
                               key_extra=pending_key, context={"bundle": bundle})
        new = _read_cache(Path(res_path), "accuracy")
        new["job_key"] = np.asarray([keys[j] for j in missing], dtype="S16")
        new["keep_bits"] = np.packbits(todo.keep, axis=1)
        new["seed"] = todo.seed
        merged = {k: np.concatenate([cache[k], v]) if k in cache else v for k, v in new.items()}
        with atomic_h5(cache_path) as f:
            for k, v in merged.items():
                create_dataset(f, k, data=v)
        pending.unlink()
        Path(res_path).unlink()
        cache = merged
        have = {k: i for i, k in enumerate(cache["job_key"])}
    rows = [have[k] for k in keys]
    return {k: cache[k][rows] for k in RESULTS if k in cache}


def removal_plan(orders: dict[str, np.ndarray | list[np.ndarray]], percents: list[float], n: int, seeds: int,
               student: bool = False) -> RetrainPlan:
    """Full-data jobs per seed, then per ranking x percent x seed. ``orders[name]`` is one order, or one
    per seed (random)."""
    keep, seed, method, pct = [], [], [], []
    for s in range(seeds):
        keep.append(np.ones(n, dtype=bool))
        seed.append(s)
        method.append("full")
        pct.append(0.0)
    for name, order in orders.items():
        for p in percents:
            for s in range(seeds):
                o = order[s] if isinstance(order, list) else order
                keep.append(keep_first(o, n_removed(p, n)))
                seed.append(s)
                method.append(name)
                pct.append(p)
    return RetrainPlan(np.stack(keep), np.asarray(seed, dtype=np.int64), method, np.asarray(pct, dtype=np.float64), student)


def random_orders(n: int, seeds: int, seed: int) -> list[np.ndarray]:
    return [torch.randperm(n, generator=generator(seed, 91, s)).numpy().astype(np.int64) for s in range(seeds)]


# ----------------------------------------------------------------------------- tables
def _cell(v: np.ndarray) -> str:
    v = v[~np.isnan(v)] * 100
    if len(v) == 0:
        return "-"
    return f"{v.mean():.1f} ± {v.std(ddof=1):.1f}" if len(v) > 1 else f"{v.mean():.1f}"


def accuracy_table(plan: RetrainPlan, values: np.ndarray, percents: list[float], rows: list[str]) -> list[str]:
    """Markdown: rankings x removed percentage, test accuracy (%) mean ± std over seeds; 0 % = nothing removed."""
    method = np.asarray(plan.method)
    full = values[method == "full"]
    lines = ["| Removed | 0% | " + " | ".join(f"{p:g}%" for p in percents) + " |",
             "|---|" + "---|" * (len(percents) + 1)]
    for name in rows:
        cells = [_cell(values[(method == name) & (plan.percent == p)]) for p in percents]
        lines.append(f"| {LABELS.get(name, name)} | {_cell(full)} | " + " | ".join(cells) + " |")
    return lines


def compare_lines(plan: RetrainPlan, values: np.ndarray, percents: list[float], name: str, what: str) -> list[str]:
    """Generated statement: at how many removal amounts ``name`` beats random by more than the seeds' spread."""
    method = np.asarray(plan.method)
    wins, losses, ties = [], [], []
    for p in percents:
        a = values[(method == name) & (plan.percent == p)]
        r = values[(method == "random") & (plan.percent == p)]
        diff = a.mean() - r.mean()
        spread = np.sqrt(a.var(ddof=1) / len(a) + r.var(ddof=1) / len(r)) if len(a) > 1 and len(r) > 1 else 0.0
        (wins if diff > 2 * spread else losses if diff < -2 * spread else ties).append(f"{p:g}% ({diff * 100:+.1f})")
    out = [f"- {LABELS.get(name, name)} vs random removal ({what}, difference in points; 'beats' = more than twice the "
           f"standard error over seeds): beats at {', '.join(wins) or 'none'}; loses at {', '.join(losses) or 'none'}; "
           f"no clear difference at {', '.join(ties) or 'none'}."]
    return out


def plan_arrays(plan: RetrainPlan, res: dict[str, np.ndarray], prefix: str = "") -> dict[str, np.ndarray]:
    return {f"{prefix}method": np.asarray(plan.method, dtype="S"), f"{prefix}percent": plan.percent,
            f"{prefix}keep_bits": np.packbits(plan.keep, axis=1),
            f"{prefix}seed": plan.seed, f"{prefix}removed": (~plan.keep).sum(1),
            f"{prefix}accuracy": res["accuracy"], f"{prefix}student_accuracy": res["student_accuracy"],
            f"{prefix}seconds": res["seconds"]}


# ----------------------------------------------------------------------------- Table 3: useless data
def useless_section(dc: RunContext) -> Section:
    cfg, bundle, run_dir = dc.cfg, dc.bundle, dc.run_dir
    dg = cfg.diagnose
    percents = dg.percents("fractions")
    n = len(bundle.y_train)
    assignment = assignment_of(run_dir)
    eq14 = eq14_scores(cfg, bundle)
    with open_read(artifact_path(run_dir, "attribute")) as f:
        n_val = len(f["val_index"])
    loss = training_loss(cfg, bundle, dc.device)
    y = bundle.y_train.numpy()
    orders = {"random": random_orders(n, dg.removal_seeds, cfg.seed), "loss": sample_order(loss),
              "ddm": cluster_order(eq14, assignment, cfg.seed)}
    orders["ddm-bal"] = class_balanced(orders["ddm"], y)
    # the same granularity without DDM: whole clusters at random, class-balanced (a new draw per seed)
    k = len(eq14)
    orders["random-clusters"] = [class_balanced(cluster_order(torch.rand(k, generator=generator(cfg.seed, 93, s))
                                                              .numpy(), assignment, cfg.seed + s), y)
                                 for s in range(dg.removal_seeds)]
    arrays: dict[str, np.ndarray] = {"ddm_cluster_scores": eq14, "training_loss": loss}
    soft = soft_label_scores(cfg, bundle)
    if soft is not None:
        arrays["ddm-soft_cluster_scores"] = soft
        orders["ddm-soft"] = cluster_order(soft, assignment, cfg.seed)
        orders["ddm-soft-bal"] = class_balanced(orders["ddm-soft"], y)
    plan = removal_plan(orders, percents, n, dg.removal_seeds)
    res = retrain_plan(cfg, bundle, "useless", plan)
    rows = list(orders)
    lines = [f"Clusters ranked by DDM's Eq. 14 objective (the change of the summed validation cross-entropy, "
             f"{n_val} validation images, when the cluster's synset is unlearned); the lowest-ranked (whose "
             f"removal lowers the validation loss most) are removed first, then the model is retrained exactly. "
             f"Test accuracy (%) on {len(bundle.y_test)} test images, mean ± std over {dg.removal_seeds} retraining "
             f"seeds (random removal: a new subset per seed). Paper Table 3 (MNIST): DDM 96.2/95.9/85.4/79.3 vs "
             f"random 95.8/92.8/74.6/65.9 at 1/10/20/50 %.", "",
             *accuracy_table(plan, res["accuracy"], percents, rows), "",
             *[line for r in rows[1:] for line in compare_lines(plan, res["accuracy"], percents, r, "useless data")],
             f"- DDM's predicted change of the validation loss per cluster: min {eq14.min():+.3f}, max {eq14.max():+.3f} "
             f"(negative = removing it should help); {int((eq14 < 0).sum())} of {len(eq14)} clusters predicted harmful.",
             f"- {len(plan.seed)} retrainings, {res['seconds'].mean():.1f} s each."]
    arrays.update(plan_arrays(plan, res))
    return Section("useless", "Useless / harmful data (paper Table 3)", lines, [], arrays,
                   {"n_val": n_val, "seeds": dg.removal_seeds})


# ----------------------------------------------------------------------------- Table 6: noisy data
def sign_check(name: str, scores: np.ndarray, share: np.ndarray, assignment: np.ndarray, corrupted: np.ndarray,
               percents: list[float], seed: int) -> str:
    """One generated line: does the ranking put corrupted clusters first (no retraining needed)?"""
    k = len(scores)
    rho = float(spearman(torch.from_numpy(scores)[:, None], torch.from_numpy(share)[:, None])[0])
    top = np.argsort(scores)[:max(1, int(np.ceil(k * 0.1)))]
    flipped = cluster_order(-scores, assignment, seed)
    n = len(assignment)
    pr = [precision_recall(keep_first(flipped, n_removed(p, n)), corrupted) for p in percents]
    return (f"- Sign check, {LABELS[name]} (no retraining): Spearman between a cluster's score and its corrupted "
            f"share {rho:+.2f} (negative = corrupted clusters ranked harmful, as they should be); the 10 % of clusters "
            f"ranked most harmful hold {share[top].mean():.0%} corrupted rows; the reversed ranking would remove "
            "corrupted rows with precision/recall "
            + ", ".join(f"{pp * 100:.1f}/{rr * 100:.1f} % at {p:g}%" for (pp, rr), p in zip(pr, percents)) + ".")


def corrupt(bundle: DatasetBundle, kind: str, fraction: float, level: float, seed: int
            ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """A corrupted copy of the training set in [0, 1] pixel space.

    Args:
        kind: 'noise' (add N(0, level^2) per pixel, clip to [0, 1]) or 'labels' (replace the label by
            another class, uniformly).
        fraction: share of the rows corrupted (a seeded choice).
    Returns:
        (x float32 [N, C, H, W] in [0, 1], y int64 [N], corrupted bool [N]).
    """
    n = len(bundle.y_train)
    gen = generator(seed, 97, {"noise": 1, "labels": 2}[kind])
    rows = torch.randperm(n, generator=gen)[:int(round(fraction * n))]
    x = denormalize(dense(bundle.x_train), bundle.mean, bundle.std).clamp(0, 1)
    y = bundle.y_train.clone()
    if kind == "noise":
        x[rows] = (x[rows] + level * torch.randn(x[rows].shape, generator=gen)).clamp(0, 1)
    else:
        y[rows] = (y[rows] + torch.randint(1, bundle.num_classes, (len(rows),), generator=gen)) % bundle.num_classes
    corrupted = np.zeros(n, dtype=bool)
    corrupted[rows.numpy()] = True
    return x, y, corrupted


def _channels_last(x: torch.Tensor) -> np.ndarray:
    a = x.numpy().astype(np.float32)
    return a[:, 0] if a.shape[1] == 1 else a.transpose(0, 2, 3, 1)


def noisy_variant(cfg: Config, kind: str) -> Variant:
    """The whole pipeline on a copy of the training set corrupted by ``kind``, in ``RUN/diagnose/noisy-<kind>-<hash>``.

    The folder name hashes the corruption settings and the pipeline's options, so other settings never
    meet a stale run (they get their own folder). Its ``prepare`` writes the copy as ``data.npz`` (once).
    """
    dg = cfg.diagnose
    settings = {"kind": kind, "fraction": dg.corrupt_fraction, "level": dg.noise_level if kind == "noise" else 0,
                "pipeline": cfg.stage_key("attribute")}  # every option of the pipeline (data and seed included)
    tag = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    path = f"diagnose/noisy-{kind}-{tag}"
    data = Path(cfg.runtime.out) / path / "data.npz"
    over = {"data": {"dataset": str(data.resolve()), "n_train": 0, "n_test": 0, "image_size": 0}}
    return Variant(path, over, (), RUN, prepare=functools.partial(_write_noisy_copy, kind=kind))


def _write_noisy_copy(base: RunContext, out: Path, kind: str) -> None:
    """``out/data.npz``: the corrupted training set (``corrupt``), the clean test set and the corrupted mask."""
    data = out / "data.npz"
    if data.is_file():  # made by an earlier run with these settings (the folder name hashes them)
        return
    out.mkdir(parents=True, exist_ok=True)
    dg, bundle = base.cfg.diagnose, base.bundle
    x, y, corrupted = corrupt(bundle, kind, dg.corrupt_fraction, dg.noise_level, base.cfg.seed)
    tmp = out / ".data.tmp.npz"
    x_test = denormalize(dense(bundle.x_test), bundle.mean, bundle.std).clamp(0, 1)
    np.savez(tmp, x=_channels_last(x), y=y.numpy(), x_test=_channels_last(x_test), y_test=bundle.y_test.numpy(),
             corrupted=corrupted)
    tmp.replace(data)


def noisy_variants(cfg: Config) -> list[Variant]:
    """Per corruption, the corrupted copy's pipeline and its learned-label synsets."""
    out = []
    for kind in cfg.diagnose.corruption_list():
        noisy = noisy_variant(cfg, kind)
        out += [noisy, *filter(None, [soft_variant(cfg, noisy)])]
    return out


def noisy_run(dc: RunContext, kind: str) -> tuple[Config, DatasetBundle, np.ndarray, Variant]:
    """The corrupted copy's pipeline run (made by the pipeline: :func:`noisy_variants`): (its config, its bundle,
    corrupted bool [N], its variant)."""
    variant = noisy_variant(dc.cfg, kind)
    vcfg = variant.config(dc.cfg)
    with np.load(Path(vcfg.runtime.out) / "data.npz") as f:
        corrupted = f["corrupted"]
    return vcfg, load_data(vcfg), corrupted, variant


def noisy_section(dc: RunContext) -> Section:
    dg = dc.cfg.diagnose
    percents = dg.percents("noisy_fractions")
    lines = [f"A copy of the training set with {dg.corrupt_fraction:.0%} of the rows corrupted goes through the whole "
             "pipeline (train, cluster, distill, attribute); each ranking removes its worst-ranked share, the target "
             "is retrained exactly on the rest, and test accuracy (%, clean test images) is mean ± std over "
             f"{dg.removal_seeds} seeds. Precision: share of the removed rows that were corrupted; recall: share of "
             "the corrupted rows removed (random removal: precision ≈ the corrupted fraction). Paper Table 6 (noise, "
             "norm 0.1): DDM 82.0/79.3/73.6/70.1 vs random 70.5/68.8/61.3/55.7 at 10-40 %.", ""]
    arrays: dict[str, np.ndarray] = {}
    with open_read(artifact_path(dc.run_dir, "train")) as f:
        clean = float(f.attrs["test_accuracy"])
    for kind in dg.corruption_list():
        vcfg, vb, corrupted, variant = noisy_run(dc, kind)
        vdir = Path(vcfg.runtime.out)
        n = len(vb.y_train)
        assignment = assignment_of(vdir)
        eq14 = eq14_scores(vcfg, vb)
        loss = training_loss(vcfg, vb, dc.device)
        orders = {"random": random_orders(n, dg.removal_seeds, vcfg.seed), "loss": sample_order(loss),
                  "ddm": cluster_order(eq14, assignment, vcfg.seed)}
        orders["ddm-bal"] = class_balanced(orders["ddm"], vb.y_train.numpy())
        rankings = {"ddm": eq14}
        soft = soft_label_scores(dc.cfg, vb, variant)
        if soft is not None:
            rankings["ddm-soft"] = soft
            orders["ddm-soft"] = cluster_order(soft, assignment, vcfg.seed)
            orders["ddm-soft-bal"] = class_balanced(orders["ddm-soft"], vb.y_train.numpy())
            arrays[f"{kind}/ddm-soft_cluster_scores"] = soft
        plan = removal_plan(orders, percents, n, dg.removal_seeds)
        res = retrain_plan(vcfg, vb, "noisy", plan)
        pr = np.array([precision_recall(k, corrupted) for k in plan.keep])  # [J, 2]
        method = np.asarray(plan.method)
        what = ("additive Gaussian noise, per-pixel std " f"{dg.noise_level:g}" if kind == "noise"
                else "labels flipped to another class")
        # share of corrupted rows per cluster: does k-means isolate them?
        k = int(assignment.max()) + 1
        share = np.bincount(assignment, weights=corrupted, minlength=k) / np.maximum(np.bincount(assignment, minlength=k), 1)
        lines += [f"### Corruption: {what}", "",
                  f"Clean-data target: {clean * 100:.1f} %. Run: `{vdir.relative_to(dc.run_dir)}`.", "",
                  *accuracy_table(plan, res["accuracy"], percents, list(orders)), "",
                  "| Precision / recall (%) | " + " | ".join(f"{p:g}%" for p in percents) + " |",
                  "|---|" + "---|" * len(percents)]
        for name in orders:
            cells = []
            for p in percents:
                sel = (method == name) & (plan.percent == p)
                cells.append(f"{pr[sel, 0].mean() * 100:.1f} / {pr[sel, 1].mean() * 100:.1f}")
            lines.append(f"| {LABELS[name]} | " + " | ".join(cells) + " |")
        lines += ["", *[line for r in list(orders)[1:] for line in compare_lines(plan, res["accuracy"], percents, r, kind)],
                  f"- Corrupted share per cluster: max {share.max():.0%}, mean {share.mean():.0%}."]
        for name, sc in rankings.items():
            lines.append(sign_check(name, sc, share, assignment, corrupted, percents, vcfg.seed))
            flipped = cluster_order(-sc, assignment, vcfg.seed)  # diagnostic only: no retraining needed
            arrays[f"{kind}/{name}_reversed_precision_recall"] = np.asarray(
                [precision_recall(keep_first(flipped, n_removed(p, n)), corrupted) for p in percents])
        lines.append("")
        arrays.update(plan_arrays(plan, res, f"{kind}/"))
        arrays.update({f"{kind}/precision": pr[:, 0], f"{kind}/recall": pr[:, 1], f"{kind}/corrupted": corrupted,
                       f"{kind}/ddm_cluster_scores": eq14, f"{kind}/training_loss": loss,
                       f"{kind}/cluster_corrupted_share": share})
    return Section("noisy", "Noisy data (paper Table 6)", lines, [], arrays,
                   {"corrupt_fraction": dg.corrupt_fraction, "noise_level": dg.noise_level, "clean_accuracy": clean})


# ----------------------------------------------------------------------------- Table 7: transferability
def transfer_section(dc: RunContext) -> Section:
    cfg, bundle, run_dir = dc.cfg, dc.bundle, dc.run_dir
    dg = cfg.diagnose
    percents = dg.percents("transfer_fractions")
    n = len(bundle.y_train)
    teacher = dc.trained_model()
    full = torch.ones(n, dtype=torch.bool)
    student = train_student(cfg, bundle, teacher, full, cfg.seed, dc.device)
    val = val_removal_probs(cfg, bundle)
    with torch.no_grad():
        s_probs = torch.cat([student(val.x[i:i + 1024].to(dc.device)).softmax(-1).float().cpu()
                             for i in range(0, len(val.x), 1024)])
    kl = (kl_sum(val.probs, s_probs) - kl_sum(val.base, s_probs)).double().numpy()  # [K]
    assignment = assignment_of(run_dir)
    orders = {"random": random_orders(n, dg.removal_seeds, cfg.seed), "ddm-kl": cluster_order(kl, assignment, cfg.seed)}
    orders["ddm-kl-bal"] = class_balanced(orders["ddm-kl"], bundle.y_train.numpy())
    plan = removal_plan(orders, percents, n, dg.removal_seeds, student=True)
    res = retrain_plan(cfg, bundle, "transfer", plan)
    kw = f"{dg.student_model} (width {dg.student_width})"
    lines = [f"Student {kw} distilled from the target with Eq. 15 (alpha {dg.kd_alpha:g}, temperature "
             f"{dg.kd_temperature:g}) on the same data and schedule. DDM's objective: the summed KL(teacher || student) "
             f"over {len(val.labels)} validation images, with the student fixed (distilled from the full teacher) and each "
             "cluster's synset unlearned from the teacher; the clusters whose removal lowers it most are removed "
             "first. Then the teacher is retrained exactly without them and a new student distilled from it on the "
             f"kept data. Student test accuracy (%), mean ± std over {dg.removal_seeds} seeds. The paper's teacher "
             "was trained to resist distillation ('nasty teacher'); ours is the ordinary target, so removing data "
             "need not help. Paper Table 7 (CIFAR-10, ResNet-18): DDM 94.2/94.2/92.9/87.3 vs random "
             "88.7-93.5/85.8 at 10-40 %.", "",
             *accuracy_table(plan, res["student_accuracy"], percents, list(orders)), "",
             "Teacher test accuracy (%) after the same removals:", "",
             *accuracy_table(plan, res["accuracy"], percents, list(orders)), "",
             *[line for r in list(orders)[1:] for line in compare_lines(plan, res["student_accuracy"], percents, r,
                                                                         "student accuracy")],
             f"- The full-data student distilled once in-process: {accuracy(student, bundle.x_test, bundle.y_test) * 100:.1f} %; "
             f"the target: {accuracy(teacher, bundle.x_test, bundle.y_test) * 100:.1f} %."]
    arrays = {**plan_arrays(plan, res), "ddm_cluster_scores": kl}
    return Section("transfer", "Transferability to a distilled student (paper Table 7)", lines, [], arrays,
                   {"student": kw, "kd_alpha": dg.kd_alpha, "kd_temperature": dg.kd_temperature})


def useless_variants(cfg: Config) -> list[Variant]:
    """The learned-label synsets (unless ``--no-learned-labels``)."""
    return list(filter(None, [soft_variant(cfg)]))


register(Task("useless", useless_section, useless_variants))
register(Task("noisy", noisy_section, noisy_variants))
register(Task("transfer", transfer_section))
