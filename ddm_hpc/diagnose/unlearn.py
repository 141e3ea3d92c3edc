"""Quick unlearning (paper Table 4) and single-cluster unlearning against exact retraining.

Table 4: test accuracy of theta_0, theta_tau, and theta_tau fine-tuned on *all* cluster synsets
(DDM: reverse-matched, by descent; DDM-match: forward-matched, by ascent), the attribute stage's
fine-tune (:func:`ddm_hpc.unlearn.unlearn_all_accuracy`). Exact retraining on nothing is theta_0.

Single clusters (``--unlearn-clusters``, a seeded choice): each cluster is unlearned alone by
  * DDM: theta_tau fine-tuned on the cluster's synset (the attribute stage's leave-one-out model);
  * gradient ascent on the cluster's real images (same steps and rate, ascent on their mean
    cross-entropy) and fine-tuning on a batch of the remaining data (same steps and rate, descent):
    the two simple alternatives;
and compared with exact retraining without it (the ground truth): accuracy on the removed
cluster's own training images (the forget set), test accuracy, and the mean L2 distance of the test
softmax to the exactly retrained model's (0 = indistinguishable from exact unlearning).

Room: a task module of ``diagnose`` (imports ``config``, ``context``, ``data``, ``diagnose.base``,
``diagnose.removal``, ``storage``, ``synsets``, ``unlearn``, ``variants``).
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from ddm_hpc.config import Config
from ddm_hpc.context import RunContext
from ddm_hpc.data import dense
from ddm_hpc.diagnose.base import Section, Task, register
from ddm_hpc.diagnose.removal import RetrainPlan, assignment_of, predict, retrain_plan
from ddm_hpc.storage import artifact_path, open_read
from ddm_hpc.synsets import read_synsets
from ddm_hpc.unlearn import FinetuneSpec, Unlearner, train_all_accuracy, unlearn_all_accuracy
from ddm_hpc.utils import generator
from ddm_hpc.variants import Variant, forward_matching

log = logging.getLogger(__name__)


def chosen_clusters(k: int, n: int, seed: int) -> np.ndarray:
    """A seeded choice of ``n`` cluster ids (sorted)."""
    return np.sort(torch.randperm(k, generator=generator(seed, 79))[:min(n, k)].numpy())


def ascent_spec(assignment: np.ndarray, clusters: np.ndarray) -> FinetuneSpec:
    """Per cluster, its real training rows with weight 1/n_k (the mean loss), zero-padded."""
    return _mean_spec([np.nonzero(assignment == c)[0] for c in clusters])


def remaining_spec(assignment: np.ndarray, clusters: np.ndarray, batch: int, seed: int) -> FinetuneSpec:
    """Per cluster, a seeded batch of ``batch`` rows of the *other* clusters (weight 1/batch): fine-tuning on
    the remaining data, the usual unlearning baseline, at the cost of one minibatch per step."""
    out = []
    for c in clusters:
        rest = np.nonzero(assignment != c)[0]
        pick = torch.randperm(len(rest), generator=generator(seed, 83, int(c)))[:batch].numpy()
        out.append(np.sort(rest[pick]))
    return _mean_spec(out)


def compact(spec: FinetuneSpec, x: torch.Tensor, y: torch.Tensor
            ) -> tuple[FinetuneSpec, torch.Tensor, torch.Tensor]:
    """Only the rows ``spec`` uses, re-indexed: fine-tuning then moves those to the device, not the training set."""
    used, inverse = torch.unique(spec.rows, return_inverse=True)
    return FinetuneSpec(inverse.reshape(spec.rows.shape), spec.weights), x[used], y[used]


def _mean_spec(members: list[np.ndarray]) -> FinetuneSpec:
    width = max(len(m) for m in members)
    rows = torch.zeros(len(members), width, dtype=torch.long)
    weights = torch.zeros(len(members), width)
    for i, m in enumerate(members):
        rows[i, :len(m)] = torch.from_numpy(m)
        weights[i, :len(m)] = 1.0 / len(m)
    return FinetuneSpec(rows, weights)


def forget_accuracy(pred: np.ndarray, labels: np.ndarray, assignment: np.ndarray, clusters: np.ndarray) -> np.ndarray:
    """[M]: accuracy of model i's training-set predictions ``pred[i]`` on cluster ``clusters[i]``'s rows."""
    return np.array([(pred[i][assignment == c] == labels[assignment == c]).mean() for i, c in enumerate(clusters)])


def unlearn_variants(cfg: Config) -> list[Variant]:
    """The forward-matched synsets (distilled only: Table 4 unlearns with them, nothing attributes)."""
    return [forward_matching(("distill",))]


def unlearn_section(dc: RunContext) -> Section:
    cfg, bundle, run_dir, device = dc.cfg, dc.bundle, dc.run_dir, dc.device
    with open_read(artifact_path(run_dir, "train")) as f:
        accs = f["trajectory/test_accuracy"][()]
    match = RunContext(unlearn_variants(cfg)[0].config(cfg), bundle, device)
    table4 = {"theta_0": float(accs[0]), "theta_tau": float(accs[-1]),
              "ddm": unlearn_all_accuracy(dc), "ddm-match": unlearn_all_accuracy(dc, match),
              "ddm-match/from theta_0": train_all_accuracy(dc, match)}  # evaluate's key (report.FROM_THETA_0)

    # single clusters
    assignment = assignment_of(run_dir)
    k = int(assignment.max()) + 1
    clusters = chosen_clusters(k, cfg.diagnose.unlearn_clusters, cfg.seed)
    plan = RetrainPlan(np.stack([assignment != c for c in clusters]), np.zeros(len(clusters), dtype=np.int64),
                       ["exact"] * len(clusters), np.zeros(len(clusters)), outputs=True)
    exact = retrain_plan(cfg, bundle, "unlearn", plan)

    unlearner = Unlearner.of_run(dc)
    steps, lr, n = unlearner.steps, unlearner.lr, len(clusters)
    model = dc.trained_model()
    level = read_synsets(run_dir, "cluster")
    pert = torch.ones(n, k, dtype=torch.uint8)
    pert[torch.arange(n), torch.from_numpy(clusters)] = 0
    eval_x = torch.cat([dense(bundle.x_test), dense(bundle.x_train)])
    m_test = len(bundle.y_test)
    ddm = unlearner.unlearn(level, pert, eval_x, desc="unlearn (DDM synsets)", chunk=n)
    spec, x, y = compact(ascent_spec(assignment, clusters), bundle.x_train, bundle.y_train)
    ga = unlearner.finetune(x, y, spec, -1.0, eval_x, "unlearn (ascent on real)", n)
    spec, x, y = compact(remaining_spec(assignment, clusters, cfg.train.batch_size, cfg.seed), bundle.x_train,
                         bundle.y_train)
    ft = unlearner.finetune(x, y, spec, 1.0, eval_x, "unlearn (fine-tune on the rest)", n)
    base_test = predict(model, bundle.x_test, device).softmax(-1)
    base_pred = predict(model, bundle.x_train, device).argmax(1).numpy()
    labels, y_test = bundle.y_train.numpy(), bundle.y_test.numpy()
    ex_test = torch.from_numpy(exact["test_probs"])  # [M, n_test, L]

    def row(test_probs: torch.Tensor, train_pred: np.ndarray) -> dict[str, np.ndarray]:
        return {"forget": forget_accuracy(train_pred, labels, assignment, clusters),
                "test": (test_probs.argmax(-1).numpy() == y_test[None]).mean(1),
                "to_exact": (test_probs - ex_test).norm(dim=-1).mean(1).numpy()}

    rows = {"theta_tau (nothing unlearned)": row(base_test[None].expand_as(ex_test), np.repeat(base_pred[None], len(clusters), 0)),
            "DDM: fine-tune on the cluster's synset": row(ddm[:, :m_test], ddm[:, m_test:].argmax(-1).numpy()),
            "gradient ascent on the cluster's real images": row(ga[:, :m_test], ga[:, m_test:].argmax(-1).numpy()),
            "fine-tune on a batch of the remaining data": row(ft[:, :m_test], ft[:, m_test:].argmax(-1).numpy()),
            "exact retraining without the cluster": row(ex_test, exact["train_pred"])}
    lines = ["| Model | test accuracy (%) |", "|---|---|",
             f"| theta_0 (retraining on nothing) | {table4['theta_0'] * 100:.1f} |",
             f"| theta_tau | {table4['theta_tau'] * 100:.1f} |",
             f"| theta_tau fine-tuned on all DDM synsets (reverse GM) | {table4['ddm'] * 100:.1f} |",
             f"| theta_tau fine-tuned on all DDM-match synsets (forward GM, by ascent) | {table4['ddm-match'] * 100:.1f} |",
             f"| theta_0 trained on all DDM-match synsets (the paper's protocol for DDM-match) | "
             f"{table4['ddm-match/from theta_0'] * 100:.1f} |",
             "", "Paper Table 4 (MNIST): unlearning everything with DDM reaches 0.6 % (theta_0: 12.5 %; theta_tau: "
             "95.7 %); theta_0 trained on the DDM-match synsets reaches 85.0 %. A quick unlearner should land near "
             "theta_0.", "",
             f"Single clusters ({len(clusters)}: ids {', '.join(map(str, clusters))}; {steps} steps of rate {lr:g}); "
             "mean over the clusters. Forget set: the cluster's own training images (exact retraining still "
             "classifies most of them correctly: they resemble the rest of their class). Distance to exact: mean "
             "over test images of the L2 distance between softmax outputs (lower = closer to the ground truth).", "",
             "| Unlearning | forget-set accuracy (%) | test accuracy (%) | distance to exact |", "|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['forget'].mean() * 100:.1f} | {r['test'].mean() * 100:.2f} | {r['to_exact'].mean():.4f} |")
    d_tau = rows["theta_tau (nothing unlearned)"]["to_exact"].mean()
    d_ddm = rows["DDM: fine-tune on the cluster's synset"]["to_exact"].mean()
    d_ga = rows["gradient ascent on the cluster's real images"]["to_exact"].mean()
    d_ft = rows["fine-tune on a batch of the remaining data"]["to_exact"].mean()
    verdict = ("closer to exact retraining than doing nothing" if d_ddm < d_tau else
               "farther from exact retraining than doing nothing (theta_tau itself)")
    lines += ["", f"- DDM's single-cluster unlearning ends {verdict}: {d_ddm:.4f} vs {d_tau:.4f}; gradient ascent "
              f"on the real images: {d_ga:.4f}; fine-tuning on the remaining data: {d_ft:.4f}."]
    arrays = {"clusters": clusters, **{f"single/{i}/{key}": v for i, r in enumerate(rows.values()) for key, v in r.items()}}
    arrays["single/rows"] = np.asarray(list(rows), dtype="S")
    return Section("unlearn", "Quick unlearning (paper Table 4) and single clusters against exact retraining", lines,
                   [], arrays, {f"table4/{k}": v for k, v in table4.items()})


register(Task("unlearn", unlearn_section, unlearn_variants))
