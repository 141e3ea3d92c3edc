"""Does reverse gradient matching point the synset's gradient against the real data's? Per parameter.

Distils 10 clusters (every K/10-th) of an existing run directory with hard or learned synset labels,
then reports, at theta_tau, the cosine between grad L(theta_tau; S_k) and -grad L(theta_tau; D_k) per
parameter tensor and over all parameters (mean over the 10 clusters). Positive = fine-tuning on S_k
by descent moves theta the way removing D_k would; that is what the attribute stage relies on.

    python benchmarks/label_cosine.py RUN_DIR hard 1
    python benchmarks/label_cosine.py RUN_DIR learn 1     # --syn-labels learn --lr-label 1
"""
import dataclasses
import sys
import time

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from ddm_hpc.config import Config
from ddm_hpc.context import load_data
from ddm_hpc.distill import distill_groups
from ddm_hpc.models import build_target
from ddm_hpc.pipeline import load_saved_config
from ddm_hpc.trajectory import TrajectoryReader

run, mode, lr_label = sys.argv[1], sys.argv[2], float(sys.argv[3])
cfg = Config.from_dict({**load_saved_config(run), "runtime": {"out": run}})
dc = dataclasses.replace(cfg.distill, syn_labels=mode, lr_label=lr_label, levels="cluster")
b = load_data(cfg)
r = TrajectoryReader(f"{run}/train.h5")
with h5py.File(f"{run}/clusters.h5", "r") as f:
    assign = torch.from_numpy(f["clusters/assignment"][()])
    cc = torch.from_numpy(f["clusters/class"][()])
ids = torch.arange(0, len(cc), len(cc) // 10)[:10]
model = build_target(cfg, b)
t0 = time.time()
outs = []
for g in ids:  # one group at a time, with the stage's per-group random streams
    outs.append(distill_groups(model, r, b.x_train, b.y_train, assign, cc, dc, cfg.seed, torch.device("cpu"),
                               show_progress=False, group_ids=g[None]))
print(f"{mode} lr_label {lr_label}: distilled {len(ids)} groups in {time.time()-t0:.0f} s; loss "
      f"{np.mean([o.init_loss.mean() for o in outs]):.2f} -> {np.mean([o.final_loss.mean() for o in outs]):.2f}")
names = [n for n, _ in model.named_parameters()]
m = r.load(build_target(cfg, b), r.tau).eval()
cos = {n: [] for n in names}; tot = []; dce = []
for o, g in zip(outs, ids):
    xr, yr = b.x_train[assign == g], b.y_train[assign == g]
    gr = torch.autograd.grad(F.cross_entropy(m(xr), yr), list(m.parameters()))
    tgt = o.targets[0] if o.targets.dtype.is_floating_point else o.labels[0]
    gs = torch.autograd.grad(F.cross_entropy(m(o.images[0]), tgt), list(m.parameters()))
    for n, a, c in zip(names, gr, gs):
        cos[n].append(float(F.cosine_similarity(-a.flatten(), c.flatten(), 0)))
    fa = torch.cat([a.flatten() for a in gr]); fs = torch.cat([c.flatten() for c in gs])
    tot.append(float(F.cosine_similarity(-fa, fs, 0)))
    if o.targets.dtype.is_floating_point:
        print(f"  group {int(g)} class {int(cc[g])}: q_c = {float(tgt[0, cc[g]]):.3f}, top other {float(tgt[0].clone().scatter_(0, cc[g][None], 0).max()):.3f}")
print("cos(grad syn, -grad real) at theta_tau, mean over groups:")
for n in names:
    print(f"  {n:24s} {np.mean(cos[n]):+.3f}")
print(f"  ALL PARAMETERS            {np.mean(tot):+.3f}")
