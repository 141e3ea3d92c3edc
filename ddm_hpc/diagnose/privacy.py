"""Diagnostic ``privacy`` (paper Fig. 4, supplementary Fig. 5): how much do the synsets reveal?

The paper shows the reverse gradient matching (reverse GM, this run's ``synsets.h5``) synsets beside
forward gradient matching (forward GM, DDM-match, ``RUN/variants/ddm-match``) synsets and argues by eye
that reverse GM images show no recognisable training data. This section measures it:

1. Pictures: both synsets, one column per cluster (rows = the ``ipc`` images of a cluster), side by
   side (``privacy_synsets.png``); each synthetic image above its nearest real training image by L2
   (``privacy_nearest.png``).
2. Nearest real image: for every synthetic image, the nearest of ``n_real`` seeded training images by
   L2 (smallest) and by SSIM (largest), in [0, 1] pixel space; the reference is each of those real
   images against its nearest *other* one (``real_vs_real``). Histograms: ``privacy_nn_hist.png``.
3. Membership inference (Dong, Zhao & Lyu, ICML 2022, "Privacy for free"): a fresh target model is
   trained from theta_0 on each synset (full batch SGD, ``--mia-epochs`` steps); a loss-threshold
   attack (score = -cross-entropy) separates ``n`` training images (members) from ``n`` test images
   (non-members), ``n = min(n_real, test images)``. Reported: AUC and advantage = max over thresholds
   of TPR - FPR, next to each model's test accuracy; theta_tau (trained on the real data) is the
   reference that leaks most.

Synthetic images live in normalised input space; they are mapped back with ``denormalize`` and
clamped to [0, 1] (what a released image would show) before any image comparison.

Room: a task module of ``diagnose`` (imports ``config``, ``context``, ``data``, ``diagnose.base``,
``diagnose.images``, ``diagnose.removal``, ``models``, ``report``, ``storage``, ``synsets``, ``train``,
``variants``). PIL is imported where a title is drawn (deferred: only the pictures need it).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ddm_hpc.config import Config
from ddm_hpc.context import RunContext
from ddm_hpc.data import denormalize
from ddm_hpc.diagnose.base import Section, Task, diagnose_dir, register
from ddm_hpc.diagnose.images import image_grid, write_png
from ddm_hpc.errors import ConfigError, StageError
from ddm_hpc.models import build_target
from ddm_hpc.report import pyplot, save_figure
from ddm_hpc.storage import artifact_path, read_attrs
from ddm_hpc.synsets import read_synsets
from ddm_hpc.train import accuracy
from ddm_hpc.utils import generator, progress
from ddm_hpc.variants import Variant, forward_matching

log = logging.getLogger(__name__)

TITLE_PX = 18  # height of the title strip above each panel
PANEL_GAP = 12  # white columns between side-by-side panels
MIN_CELL = 28  # smallest displayed cell (pixels); smaller images are scaled up by an integer factor
MAX_COLUMNS = 100  # clusters drawn at most (evenly spaced when there are more)


# ----------------------------------------------------------------------------- SSIM and nearest neighbours
def gaussian_window(window: int, sigma: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """1-D Gaussian weights [window], summing to 1, centred on (window - 1) / 2.

    The 2-D SSIM window is the outer product of this vector with itself (separable filtering).
    """
    if window < 1 or sigma <= 0:
        raise ConfigError(f"SSIM window must be >= 1 and sigma > 0, got window={window}, sigma={sigma}")
    t = torch.arange(window, dtype=dtype) - (window - 1) / 2.0
    g = torch.exp(-t * t / (2.0 * sigma * sigma))
    return g / g.sum()


def _band(n: int, g: torch.Tensor) -> torch.Tensor:
    """The 'valid' 1-D filter as a matrix [n - k + 1, n]: row i holds ``g`` in columns i .. i + k - 1."""
    k = len(g)
    m = torch.zeros(n - k + 1, n, dtype=g.dtype, device=g.device)
    for i in range(n - k + 1):
        m[i, i:i + k] = g
    return m


def _filter(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Gaussian-weighted local means, 'valid' convolution: [..., H, W] -> [..., H - k + 1, W - k + 1].

    Separable: rows then columns, each as a product with a banded matrix (on CPU ~8x faster than conv2d
    for these small images; same result to rounding).
    """
    return _band(x.shape[-2], g) @ x @ _band(x.shape[-1], g).T


def _window_for(shape: torch.Size, window: int) -> int:
    """The window actually used: ``window``, shrunk to the image's smaller side if the image is smaller."""
    return max(1, min(window, int(shape[-1]), int(shape[-2])))


def _ssim_from_stats(mu_x: torch.Tensor, mu_y: torch.Tensor, var_x: torch.Tensor, var_y: torch.Tensor,
                     cov: torch.Tensor, c1: float, c2: float) -> torch.Tensor:
    """The SSIM map from local statistics (all broadcastable to [..., C, h, w]), averaged over (C, h, w)."""
    num = (2.0 * mu_x * mu_y + c1) * (2.0 * cov + c2)
    den = (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    return (num / den).mean(dim=(-3, -2, -1))


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, window: int = 11, sigma: float = 1.5
         ) -> torch.Tensor:
    """Mean SSIM (Wang et al. 2004) of paired images.

    Gaussian window (``window`` x ``window``, std ``sigma``, shrunk to the image's smaller side when the
    image is smaller), 'valid' convolution (no padding: only windows fully inside the image), local
    (co)variances with the window's weights (population form), C1 = (0.01 L)^2, C2 = (0.03 L)^2 with
    L = ``data_range``. The SSIM map is averaged over positions per channel, then over channels (the
    same as the mean over (C, h, w), every channel having h x w positions). Computed in float64.

    Args:
        x, y: float [N, C, H, W] images in [0, data_range], paired row by row.

    Returns:
        float64 [N]: SSIM of each pair, in [-1, 1], 1 for identical images.
    """
    if x.shape != y.shape or x.dim() != 4:
        raise ConfigError(f"ssim needs two [N, C, H, W] tensors of one shape, got {tuple(x.shape)} and "
                          f"{tuple(y.shape)}")
    x, y = x.detach().double(), y.detach().double()
    g, c1, c2, (mu_x, var_x), (mu_y, var_y) = _local_stats(x, y, data_range, window, sigma)
    cov = _filter(x * y, g) - mu_x * mu_y
    return _ssim_from_stats(mu_x, mu_y, var_x, var_y, cov, c1, c2)


def _local_stats(a: torch.Tensor, b: torch.Tensor, data_range: float, window: int, sigma: float):
    """(window, C1, C2, (mean, variance) of a, (mean, variance) of b) under the Gaussian window."""
    g = gaussian_window(_window_for(a.shape, window), sigma).to(a.device)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = _filter(a, g), _filter(b, g)
    return g, c1, c2, (mu_a, _filter(a * a, g) - mu_a * mu_a), (mu_b, _filter(b * b, g) - mu_b * mu_b)


def ssim_matrix(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, window: int = 11, sigma: float = 1.5,
                chunk: int = 0, show_progress: bool = False) -> torch.Tensor:
    """SSIM of every pair (a_i, b_j), as :func:`ssim` computes it.

    The local means and variances of each image are filtered once; only the cross term E[a_i b_j] is
    filtered per pair, ``chunk`` rows of ``a`` against all of ``b`` at a time.

    Args:
        a: float [A, C, H, W]; b: float [B, C, H, W], in [0, data_range].
        chunk: rows of ``a`` per block (0: as many as keep one block's product near 32 MB).

    Returns:
        float64 [A, B].
    """
    if a.dim() != 4 or b.dim() != 4 or a.shape[1:] != b.shape[1:]:
        raise ConfigError(f"ssim_matrix needs [A, C, H, W] and [B, C, H, W] images of one size, got "
                          f"{tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.detach().double(), b.detach().double()
    g, c1, c2, (mu_a, var_a), (mu_b, var_b) = _local_stats(a, b, data_range, window, sigma)
    per_row = max(1, len(b) * int(np.prod(a.shape[1:])))
    chunk = chunk or max(1, (4 << 20) // per_row)
    out = torch.empty(len(a), len(b), dtype=torch.float64, device=a.device)
    rows_h, cols_w = _band(a.shape[-2], g), _band(a.shape[-1], g).T
    sq_a, sq_b = mu_a * mu_a + c1, mu_b * mu_b  # per-image parts of the pair terms
    var_a, var_b = var_a + c2, var_b
    for i0 in progress(range(0, len(a), chunk), "ssim", show_progress, total=math.ceil(len(a) / chunk)):
        i1 = min(i0 + chunk, len(a))
        e_ab = rows_h @ (a[i0:i1, None] * b[None]) @ cols_w  # [c, B, C, h, w] local E[a b]
        mu_ab = mu_a[i0:i1, None] * mu_b[None]
        cs = e_ab.sub_(mu_ab).mul_(2.0).add_(c2)  # 2 cov + C2
        cs.mul_(mu_ab.mul_(2.0).add_(c1))  # * (2 mu_a mu_b + C1)
        den = (sq_a[i0:i1, None] + sq_b[None]).mul_(var_a[i0:i1, None] + var_b[None])
        out[i0:i1] = cs.div_(den).mean(dim=(-3, -2, -1))
    return out


def l2_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distance between flattened images: a [A, C, H, W], b [B, C, H, W] -> float64 [A, B]."""
    return torch.cdist(a.detach().double().flatten(1), b.detach().double().flatten(1),
                       compute_mode="donot_use_mm_for_euclid_dist")


def _nearest(l2: torch.Tensor, s: torch.Tensor) -> dict[str, np.ndarray]:
    i_l2 = l2.argmin(1)
    i_s = s.argmax(1)
    rows = torch.arange(len(l2))
    return {"l2_index": i_l2.numpy().astype(np.int64), "l2": l2[rows, i_l2].numpy(),
            "ssim_index": i_s.numpy().astype(np.int64), "ssim": s[rows, i_s].numpy()}


def nearest_real(syn: torch.Tensor, real: torch.Tensor, chunk: int = 0, show_progress: bool = False
                 ) -> dict[str, np.ndarray]:
    """Nearest real image of each synthetic image, by L2 and by SSIM.

    Args:
        syn: float [S, C, H, W] synthetic images in [0, 1] pixel space.
        real: float [N, C, H, W] real images in [0, 1] pixel space.
        chunk: rows per SSIM block (see :func:`ssim_matrix`).

    Returns:
        ``l2_index`` int64 [S] (row of ``real`` with the smallest L2), ``l2`` float64 [S] (that distance),
        ``ssim_index`` int64 [S] (row with the largest SSIM), ``ssim`` float64 [S] (that SSIM).
    """
    if len(real) == 0:
        raise ConfigError("nearest_real needs at least one real image")
    return _nearest(l2_matrix(syn, real), ssim_matrix(syn, real, chunk=chunk, show_progress=show_progress))


def real_vs_real(real: torch.Tensor, chunk: int = 0, show_progress: bool = False) -> dict[str, np.ndarray]:
    """Each real image's nearest *other* real image (itself excluded), by L2 and by SSIM.

    The reference distribution for :func:`nearest_real`: how close real images are to each other.

    Args:
        real: float [N, C, H, W] in [0, 1], N >= 2.

    Returns:
        The keys of :func:`nearest_real`, each [N]; indices never equal their own row.
    """
    if len(real) < 2:
        raise ConfigError(f"real_vs_real needs at least 2 real images, got {len(real)}: raise --n-real")
    l2 = l2_matrix(real, real)
    s = ssim_matrix(real, real, chunk=chunk, show_progress=show_progress)
    eye = torch.eye(len(real), dtype=torch.bool)
    return _nearest(l2.masked_fill(eye, math.inf), s.masked_fill(eye, -math.inf))


# ----------------------------------------------------------------------------- pictures
def cell_scale(height: int, width: int, min_cell: int = MIN_CELL) -> int:
    """Integer up-scaling that makes an image's smaller side at least ``min_cell`` pixels."""
    return max(1, math.ceil(min_cell / max(1, min(height, width))))


def with_title(grid: np.ndarray, title: str, height: int = TITLE_PX) -> np.ndarray:
    """A white strip of ``height`` rows with ``title`` (black) above ``grid`` uint8 [H, W, C].

    Returns uint8 [height + H, max(W, text width + 4), C]; ``grid`` sits at the top-left of the part below the
    strip, the rest is white.
    """
    from PIL import Image, ImageDraw, ImageFont  # deferred: see the module docstring

    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    text_w = int(math.ceil(probe.textlength(title, font=font))) + 4
    h, w, c = grid.shape
    out = np.full((height + h, max(w, text_w), c), 255, np.uint8)
    out[height:, :w] = grid
    strip = Image.new("L", (out.shape[1], height), 255)
    ImageDraw.Draw(strip).text((2, 2), title, fill=0, font=font)
    out[:height] = np.asarray(strip)[:, :, None]
    return out


def hstack_panels(panels: list[np.ndarray], gap: int = PANEL_GAP) -> np.ndarray:
    """Panels uint8 [H_i, W_i, C] side by side, top-aligned, ``gap`` white columns between; white below shorter ones.

    Returns uint8 [max H_i, sum W_i + gap * (len - 1), C].
    """
    c = max(p.shape[2] for p in panels)
    panels = [np.repeat(p, c, axis=2) if p.shape[2] != c else p for p in panels]
    height = max(p.shape[0] for p in panels)
    out = np.full((height, sum(p.shape[1] for p in panels) + gap * (len(panels) - 1), c), 255, np.uint8)
    x = 0
    for p in panels:
        out[:p.shape[0], x:x + p.shape[1]] = p
        x += p.shape[1] + gap
    return out


def shown_columns(n_groups: int, limit: int = MAX_COLUMNS) -> np.ndarray:
    """int64 [<= limit]: the groups drawn (all, or ``limit`` evenly spaced ones)."""
    if n_groups <= limit:
        return np.arange(n_groups, dtype=np.int64)
    return np.unique(np.linspace(0, n_groups - 1, limit).round().astype(np.int64))


def _wrapped(build, cols: np.ndarray, wrap: int) -> np.ndarray:
    """``build(cols)`` for runs of ``wrap`` columns, stacked top to bottom (white-filled to one width)."""
    if wrap <= 0 or len(cols) <= wrap:
        return build(cols)
    blocks = [build(cols[i:i + wrap]) for i in range(0, len(cols), wrap)]
    width = max(b.shape[1] for b in blocks)
    return np.concatenate([np.pad(b, ((0, 0), (0, width - b.shape[1]), (0, 0)), constant_values=255) for b in blocks])


def synset_grid(images: torch.Tensor, cols: np.ndarray, scale: int, wrap: int = 0) -> np.ndarray:
    """One column per group, rows = its images: ``images`` float [G, ipc, C, H, W] in [0, 1] -> uint8 grid.

    ``wrap`` > 0 starts a new band of rows every ``wrap`` groups (e.g. one band per class).
    """
    def build(c: np.ndarray) -> np.ndarray:
        sel = images[torch.from_numpy(c)]  # [g, ipc, C, H, W]
        return image_grid(sel.transpose(0, 1).reshape(-1, *sel.shape[2:]), ncol=len(c), scale=scale)

    return _wrapped(build, cols, wrap)


def nearest_grid(images: torch.Tensor, real: torch.Tensor, index: np.ndarray, cols: np.ndarray, scale: int,
                 wrap: int = 0) -> np.ndarray:
    """One column per group; rows alternate synthetic image j and its nearest real image (bands as in
    :func:`synset_grid`).

    Args:
        images: float [G, ipc, C, H, W] in [0, 1]; real: float [N, C, H, W] in [0, 1].
        index: int64 [G * ipc] row of ``real`` nearest to each synthetic image (group-major order).
    """
    g, ipc = images.shape[:2]
    near = real[torch.from_numpy(index)].reshape(g, ipc, *real.shape[1:])

    def build(c: np.ndarray) -> np.ndarray:
        pair = torch.stack([images, near], 2)[torch.from_numpy(c)]  # [g, ipc, 2, C, H, W]
        return image_grid(pair.permute(1, 2, 0, 3, 4, 5).reshape(-1, *images.shape[2:]), ncol=len(c), scale=scale)

    return _wrapped(build, cols, wrap)


def plot_nn_hist(dists: dict[str, dict[str, np.ndarray]], path: Path) -> Path:
    """Histograms of nearest-neighbour L2 (left) and SSIM (right), one curve per entry of ``dists``
    (label -> :func:`nearest_real` output)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, xlabel in ((axes[0], "l2", "L2 to the nearest real image (pixels in [0, 1])"),
                            (axes[1], "ssim", "SSIM with the most similar real image")):
        values = np.concatenate([d[key] for d in dists.values()])
        lo, hi = float(values.min()), float(values.max())
        bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 31)
        for label, d in dists.items():
            ax.hist(d[key], bins=bins, density=True, histtype="step", linewidth=1.6, label=f"{label} (n={len(d[key])})")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("density")
    axes[1].legend(fontsize=8, loc="upper left")
    fig.suptitle("Nearest real training image: synthetic vs real-to-real reference")
    fig.tight_layout()
    return save_figure(fig, path)


# ----------------------------------------------------------------------------- membership inference
def train_on_synset(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, epochs: int, lr: float, momentum: float,
                    device: torch.device, show_progress: bool = False) -> np.ndarray:
    """Full-batch SGD on a synset, in place: ``epochs`` steps of cross-entropy.

    Args:
        model: the initialised target architecture (theta_0).
        x: float [M, C, H, W] synthetic images in normalised input space.
        targets: int64 [M] hard labels or float [M, L] label distributions.

    Returns:
        float64 [epochs]: the training loss before each step.
    """
    model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    x, t = x.to(device), targets.to(device)
    losses = []
    for _ in progress(range(epochs), "privacy: train on synset", show_progress):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), t)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return np.asarray(losses, np.float64)


@torch.no_grad()
def per_sample_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1024) -> np.ndarray:
    """Cross-entropy of each sample in eval mode: x float [N, C, H, W], y int64 [N] -> float64 [N]."""
    dev = next(model.parameters()).device
    was = model.training
    model.eval()
    out = [F.cross_entropy(model(x[i:i + batch].to(dev)).double(), y[i:i + batch].to(dev), reduction="none").cpu()
           for i in range(0, len(y), batch)]
    model.train(was)
    return torch.cat(out).numpy() if out else np.zeros(0)


def _scores(member_loss: np.ndarray, nonmember_loss: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    m = -np.asarray(member_loss, np.float64).ravel()
    n = -np.asarray(nonmember_loss, np.float64).ravel()
    if len(m) == 0 or len(n) == 0:
        raise ConfigError("membership inference needs at least one member and one non-member")
    return m, n


def mia_roc(member_loss: np.ndarray, nonmember_loss: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC of the loss-threshold attack ("member" if -loss >= t).

    Args:
        member_loss: float [n_m]; nonmember_loss: float [n_n].

    Returns:
        (fpr, tpr) float64 [T + 1]: thresholds from +inf (0, 0) down through every distinct score (ending at (1, 1)).
    """
    m, n = _scores(member_loss, nonmember_loss)
    thr = np.unique(np.concatenate([m, n]))[::-1]
    sm, sn = np.sort(m), np.sort(n)
    tpr = 1.0 - np.searchsorted(sm, thr, side="left") / len(m)
    fpr = 1.0 - np.searchsorted(sn, thr, side="left") / len(n)
    return np.concatenate([[0.0], fpr]), np.concatenate([[0.0], tpr])


def mia_auc(member_loss: np.ndarray, nonmember_loss: np.ndarray) -> float:
    """AUC of the attack: P(-loss of a member > -loss of a non-member) + P(tie) / 2 (Mann-Whitney).

    member_loss float [n_m], nonmember_loss float [n_n] -> float in [0, 1]; 0.5 = chance.
    """
    m, n = _scores(member_loss, nonmember_loss)
    sn = np.sort(n)
    below = np.searchsorted(sn, m, side="left")
    ties = np.searchsorted(sn, m, side="right") - below
    return float((below.sum() + 0.5 * ties.sum()) / (len(m) * len(n)))


def mia_advantage(member_loss: np.ndarray, nonmember_loss: np.ndarray) -> float:
    """Membership advantage: max over thresholds of TPR - FPR (>= 0: the empty threshold gives 0).

    member_loss float [n_m], nonmember_loss float [n_n] -> float in [0, 1].
    """
    fpr, tpr = mia_roc(member_loss, nonmember_loss)
    return float(max(0.0, (tpr - fpr).max()))


def chance_advantage(n: int, level: float = 0.05) -> float:
    """Advantage a loss attack exceeds with probability ``level`` when members and non-members are alike
    (one-sided two-sample Kolmogorov-Smirnov bound for n vs n samples: sqrt(ln(1/level) / n))."""
    return math.sqrt(math.log(1.0 / level) / max(n, 1))


# ----------------------------------------------------------------------------- the section
def privacy_variants(cfg: Config) -> list[Variant]:
    """The forward-matched synsets shown beside this run's (distilled only), for a run made with ``--method ddm``."""
    return [forward_matching(("distill",))] if cfg.distill.method == "ddm" else []


def _check_inputs(dc: RunContext) -> None:
    for stage in ("train", "cluster", "distill"):
        if not artifact_path(dc.run_dir, stage).is_file():
            raise StageError(f"privacy needs {artifact_path(dc.run_dir, stage)}: run `ddm-hpc run` (train, cluster, "
                             f"distill) on {dc.run_dir} first")
    method = str((read_attrs(artifact_path(dc.run_dir, "distill")) or {}).get("method", "ddm"))
    if method != "ddm":
        raise ConfigError(f"privacy compares this run's reverse-GM synsets with forward GM, but {dc.run_dir} was "
                          f"distilled with --method {method}: use a run made with --method ddm")


def _pixels(x: torch.Tensor, dc: RunContext) -> torch.Tensor:
    """Normalised [..., C, H, W] -> [0, 1] pixel space, clamped."""
    return denormalize(x.float(), dc.bundle.mean, dc.bundle.std).clamp(0.0, 1.0)


def _summary(d: dict[str, np.ndarray]) -> list[float]:
    return [float(np.mean(d["l2"])), float(np.median(d["l2"])), float(np.mean(d["ssim"])), float(np.median(d["ssim"]))]


def privacy_section(dc: RunContext) -> Section:
    """Fig. 4/5 pictures, nearest-real-image distances and membership inference (see the module doc)."""
    _check_inputs(dc)
    cfg, bundle, show = dc.cfg, dc.bundle, dc.cfg.runtime.progress
    reverse = read_synsets(dc.run_dir, "cluster")
    fwd_dir = privacy_variants(cfg)[0].directory(cfg)
    forward = read_synsets(fwd_dir, "cluster")
    synsets = {"reverse": reverse, "forward": forward}
    labels = {"reverse": "reverse GM (DDM)", "forward": "forward GM (DDM-match)", "real": "real vs other real"}
    for key, s in synsets.items():
        if tuple(s.images.shape[2:]) != bundle.image_shape:
            raise ConfigError(f"{labels[key]} synset images are {tuple(s.images.shape[2:])}, the data "
                              f"{bundle.image_shape}: diagnose with the run's own --dataset and data options")

    # real images: one seeded draw; the first n are the MIA members
    n_train, n_test = len(bundle.y_train), len(bundle.y_test)
    n_real = min(cfg.diagnose.n_real, n_train)
    perm = torch.randperm(n_train, generator=generator(cfg.seed, 81))
    real_rows = perm[:n_real]
    n_mia = min(n_real, n_test)
    member_rows = perm[:n_mia]
    nonmember_rows = torch.randperm(n_test, generator=generator(cfg.seed, 82))[:n_mia]
    real = _pixels(bundle.x_train[real_rows], dc)

    # nearest real image
    pix = {k: _pixels(s.images, dc) for k, s in synsets.items()}  # [G, ipc, C, H, W]
    nn_res: dict[str, dict[str, np.ndarray]] = {}
    for key, im in pix.items():
        log.info("privacy: nearest real image of %d %s images among %d", im.shape[0] * im.shape[1], labels[key], n_real)
        nn_res[key] = nearest_real(im.flatten(0, 1), real, show_progress=show)
    log.info("privacy: real-vs-real nearest neighbours among %d images", n_real)
    nn_res["real"] = real_vs_real(real, show_progress=show)

    # pictures
    out = diagnose_dir(dc.run_dir)
    scale = cell_scale(*bundle.image_size)
    cols = shown_columns(reverse.images.shape[0])
    # one band of rows per class when every cluster is drawn (clusters are class-major), else bands of 10
    per_class = dc.cfg.cluster.clusters_per_class
    wrap = per_class if len(cols) == reverse.images.shape[0] and len(cols) % per_class == 0 else 10
    more = "" if len(cols) == reverse.images.shape[0] else f", {len(cols)} of {reverse.images.shape[0]} clusters"
    grid_png = write_png(hstack_panels([
        with_title(synset_grid(pix["reverse"], cols, scale, wrap), f"Reverse gradient matching (DDM){more}"),
        with_title(synset_grid(pix["forward"], cols, scale, wrap), f"Gradient matching (DDM-match){more}")]),
        out / "privacy_synsets.png")
    near_png = write_png(hstack_panels([
        with_title(nearest_grid(pix["reverse"], real, nn_res["reverse"]["l2_index"], cols, scale, wrap),
                   "Reverse GM: synthetic / nearest real (L2)"),
        with_title(nearest_grid(pix["forward"], real, nn_res["forward"]["l2_index"], cols, scale, wrap),
                   "Forward GM: synthetic / nearest real (L2)")]),
        out / "privacy_nearest.png")
    hist_png = plot_nn_hist({labels[k]: v for k, v in nn_res.items()}, out / "privacy_nn_hist.png")

    # membership inference
    x_mem, y_mem = bundle.x_train[member_rows], bundle.y_train[member_rows]
    x_non, y_non = bundle.x_test[nonmember_rows], bundle.y_test[nonmember_rows]
    models = ["theta_tau", "reverse", "forward"]
    model_labels = {"theta_tau": f"theta_tau (real training set, {n_train} images)",
                    "reverse": f"reverse-GM synset ({reverse.images.shape[0] * reverse.images.shape[1]} images)",
                    "forward": f"forward-GM synset ({forward.images.shape[0] * forward.images.shape[1]} images)"}
    mia: dict[str, dict[str, object]] = {}
    for name in models:
        if name == "theta_tau":
            model, train_loss = dc.trained_model(), np.zeros(0)
        else:
            s = synsets[name]
            model = build_target(cfg, bundle, seed=cfg.seed)
            log.info("privacy: training theta_0 on the %s synset for %d full-batch steps", labels[name],
                     cfg.diagnose.mia_epochs)
            train_loss = train_on_synset(model, s.images.flatten(0, 1), s.flat_targets(), cfg.diagnose.mia_epochs,
                                         cfg.train.lr, cfg.train.momentum, dc.device, show)
        lm, ln = per_sample_loss(model, x_mem, y_mem), per_sample_loss(model, x_non, y_non)
        mia[name] = {"accuracy": accuracy(model, bundle.x_test, bundle.y_test), "auc": mia_auc(lm, ln),
                     "advantage": mia_advantage(lm, ln), "member_loss": lm, "nonmember_loss": ln,
                     "train_loss": train_loss}
        log.info("privacy: %s: test accuracy %.3f, MIA AUC %.3f, advantage %.3f", name, mia[name]["accuracy"],
                 mia[name]["auc"], mia[name]["advantage"])

    # tables
    summary = np.array([_summary(nn_res[k]) for k in ("reverse", "forward", "real")])  # [3, 4]
    counts = {"reverse": len(nn_res["reverse"]["l2"]), "forward": len(nn_res["forward"]["l2"]), "real": n_real}
    lines = [
        f"Synthetic images (one column per cluster, rows = the {reverse.images.shape[1]} image(s) per cluster; a new "
        f"band of rows every {wrap} clusters) of "
        "reverse gradient matching (this run) beside forward gradient matching (`variants/ddm-match`, same clusters); "
        f"then each synthetic image above its nearest real image by L2 among {n_real} seeded training images. "
        "Images are compared in [0, 1] pixel space (synthetic images clamped); SSIM: Gaussian 11x11 window, "
        "sigma 1.5, valid convolution, mean over positions and channels. The reference row is each of those real "
        "images against its nearest *other* one.",
        "",
        "| images | n | nearest L2 mean | L2 median | best SSIM mean | SSIM median |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for i, k in enumerate(("reverse", "forward", "real")):
        s = summary[i]
        lines.append(f"| {labels[k]} | {counts[k]} | {s[0]:.3f} | {s[1]:.3f} | {s[2]:.3f} | {s[3]:.3f} |")
    bound = chance_advantage(n_mia)
    lines += [
        "",
        f"Loss-threshold membership inference (score = -cross-entropy): {n_mia} training images (members) against "
        f"{n_mia} test images (non-members). Synset models start from theta_0 and take {cfg.diagnose.mia_epochs} "
        f"full-batch SGD steps (lr {cfg.train.lr}, momentum {cfg.train.momentum}) on the synset; test accuracy on "
        f"{n_test} test images (chance {1.0 / bundle.num_classes:.3f}).",
        "",
        "| model | test accuracy | MIA AUC | MIA advantage |",
        "|---|---:|---:|---:|",
    ]
    for name in models:
        r = mia[name]
        lines.append(f"| {model_labels[name]} | {r['accuracy']:.3f} | {r['auc']:.3f} | {r['advantage']:.3f} |")
    init_note = f"--init {cfg.distill.init}, {cfg.distill.distill_steps} distillation steps"
    lines += ["", *_findings(summary, mia, bound, 1.0 / bundle.num_classes, init_note)]

    arrays: dict[str, np.ndarray] = {
        "real_rows": real_rows.numpy().astype(np.int64), "member_rows": member_rows.numpy().astype(np.int64),
        "nonmember_rows": nonmember_rows.numpy().astype(np.int64), "shown_clusters": cols,
        "nn/summary": summary,
        "mia/accuracy": np.array([mia[m]["accuracy"] for m in models], np.float64),
        "mia/auc": np.array([mia[m]["auc"] for m in models], np.float64),
        "mia/advantage": np.array([mia[m]["advantage"] for m in models], np.float64),
    }
    for k, d in nn_res.items():
        for field_name, v in d.items():
            arrays[f"nn/{k}/{field_name}"] = np.asarray(v)
    for k, s in synsets.items():
        arrays[f"nn/{k}/group_class"] = s.group_class.numpy().astype(np.int64)
    for m in models:
        arrays[f"mia/{m}/member_score"] = -np.asarray(mia[m]["member_loss"])
        arrays[f"mia/{m}/nonmember_score"] = -np.asarray(mia[m]["nonmember_loss"])
        arrays[f"mia/{m}/train_loss"] = np.asarray(mia[m]["train_loss"], np.float64)
    attrs: dict[str, object] = {
        "n_real": n_real, "n_mia": n_mia, "mia_epochs": cfg.diagnose.mia_epochs, "chance_advantage": bound,
        "nn_summary_rows": ["reverse", "forward", "real"], "nn_summary_cols": ["l2_mean", "l2_median", "ssim_mean",
                                                                                "ssim_median"],
        "mia_models": models, "forward_run": str(fwd_dir),
    }
    for i, k in enumerate(("reverse", "forward", "real")):
        attrs[f"{k}_l2_median"], attrs[f"{k}_ssim_median"] = float(summary[i, 1]), float(summary[i, 3])
    for m in models:
        for key in ("accuracy", "auc", "advantage"):
            attrs[f"{m}_{key}"] = float(mia[m][key])
    return Section("privacy", "Privacy of the synsets (Fig. 4/5, membership inference)", lines,
                   [grid_png, near_png, hist_png], arrays, attrs)


def _findings(summary: np.ndarray, mia: dict[str, dict[str, object]], bound: float, chance: float,
              init_note: str = "") -> list[str]:
    """Three or four sentences on what the numbers show. summary float [3, 4] rows reverse, forward, real
    (columns L2 mean, L2 median, SSIM mean, SSIM median); ``init_note`` names how the synsets were initialised."""
    rev, fwd, real = summary
    far = "farther from" if rev[1] > fwd[1] else "closer to"
    sim = "less" if rev[3] < fwd[3] else "more"
    ref = "farther from" if rev[1] > real[1] else "closer to"
    ref_s = "less" if rev[3] < real[3] else "more"
    out = [f"Reverse-GM images are {far} the real data than forward-GM images (median nearest L2 {rev[1]:.3f} vs "
           f"{fwd[1]:.3f}) and {sim} similar to their most similar real image (median SSIM {rev[3]:.3f} vs "
           f"{fwd[3]:.3f}); real images are at median L2 {real[1]:.3f} (SSIM {real[3]:.3f}) from their nearest "
           f"other real image, so reverse-GM images are {ref} a real image than real images are to each other by "
           f"L2, and {ref_s} similar to one by SSIM."]
    if max(rev[1], fwd[1]) < 0.5 * real[1] and min(rev[3], fwd[3]) > real[3]:
        why = ": they still resemble the real images they were initialised from" if "--init real" in init_note else ""
        out.append(f"Both synsets lie much closer to some real training image than real images lie to each other "
                   f"({init_note}){why}; here the pictures do not show the obfuscation of the paper's Fig. 4.")
    parts = []
    for name, label in (("theta_tau", "theta_tau"), ("reverse", "the reverse-GM model"),
                        ("forward", "the forward-GM model")):
        a = float(mia[name]["advantage"])  # type: ignore[arg-type]
        parts.append(f"{label} {a:.3f} ({'within' if a <= bound else 'above'} chance)")
    out.append("Membership advantage: " + ", ".join(parts) + f"; with these sample sizes an advantage up to "
               f"{bound:.3f} is reached by chance 5 % of the time when members and non-members are alike.")
    acc, acc_f, acc_t = (float(mia[m]["accuracy"]) for m in ("reverse", "forward", "theta_tau"))  # type: ignore
    if acc < 2.0 * chance:
        out.append(f"The model trained on the reverse-GM synset reaches only {acc:.3f} test accuracy (chance "
                   f"{chance:.3f}): reverse-GM synsets are made to unlearn (descent on them moves theta_tau toward "
                   "theta_0), so an advantage near 0 for it reflects a model that learned little, not only privacy.")
    else:
        weak = (": it learned less than the forward-GM model, so its advantage is not directly comparable"
                if acc < 0.75 * acc_f else "")
        out.append(f"The model trained on the reverse-GM synset reaches {acc:.3f} test accuracy (chance {chance:.3f}), "
                   f"against {acc_f:.3f} for forward GM and {acc_t:.3f} for theta_tau{weak}.")
    return out


register(Task("privacy", privacy_section, privacy_variants))
