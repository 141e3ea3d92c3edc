"""Pure-torch reference of the layer-wise gradient-matching distance (dataset condensation).

This is the one reference every kernel, test and benchmark imports. Each parameter's gradient
[K, *shape] is viewed as rows: a weight of shape [out, *rest] becomes [K, out, prod(rest)]
(conv [out, in, kh, kw] -> [out, in*kh*kw]; linear [out, in] as is; [C, h, w] -> [C, h*w]).
1-D parameters (biases, norm affines) are skipped, as in Zhao et al.'s ``distance_wb``,
unless ``include_1d`` where each becomes one row [K, 1, n].

Distances, per cluster k (all reductions in float32, or float64 for float64 inputs):
  cos: sum over layers and rows of 1 - <r, s> / (|r| |s| + eps)
  mse: sum over layers of |s - r|^2 (summed, not averaged, as in the DC code)
where r = sign * real row (sign=-1: reverse matching, compare syn with -real) and s the syn row.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

EPS = 1e-6  # added to the product of the norms, as in DC's distance_wb
DISTANCES = ("cos", "mse")


def rows_view(g: torch.Tensor, include_1d: bool) -> torch.Tensor | None:
    """View a per-cluster gradient [K, *shape] as [K, rows, cols]; None if the layer is skipped."""
    if g.dim() < 2:
        raise ValueError(f"per-cluster gradient needs a leading K dimension, got shape {tuple(g.shape)}")
    k = g.shape[0]
    if g.dim() == 2:  # a 1-D parameter
        return g.reshape(k, 1, g.shape[1]) if include_1d else None
    return g.reshape(k, g.shape[1], -1)


def check_inputs(real_grads: Sequence[torch.Tensor], syn_grads: Sequence[torch.Tensor], distance: str) -> None:
    """Raise ValueError naming the first mismatch between the two gradient lists."""
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    if len(real_grads) != len(syn_grads):
        raise ValueError(f"real_grads has {len(real_grads)} tensors but syn_grads has {len(syn_grads)}")
    if len(real_grads) == 0:
        raise ValueError("matching_loss needs at least one parameter gradient")
    k = real_grads[0].shape[0]
    for i, (r, s) in enumerate(zip(real_grads, syn_grads)):
        if r.shape != s.shape:
            raise ValueError(f"parameter {i}: real shape {tuple(r.shape)} != syn shape {tuple(s.shape)}")
        if r.shape[0] != k:
            raise ValueError(f"parameter {i}: leading (cluster) dim {r.shape[0]} != {k} of parameter 0")


def matching_loss_reference(
    real_grads: Sequence[torch.Tensor],
    syn_grads: Sequence[torch.Tensor],
    *,
    sign: float = -1.0,
    include_1d: bool = False,
    distance: str = "cos",
    eps: float = EPS,
) -> torch.Tensor:
    """Per-cluster matching distance.

    Args:
        real_grads: per-parameter tensors [K, *param_shape] (treated as constants by callers).
        syn_grads: same shapes; differentiable (double backward reaches the synthetic images).
        sign: -1.0 for reverse matching (syn vs -real), +1.0 for forward gradient matching.
        include_1d: count 1-D parameters as one row each.
        distance: "cos" (layer-wise 1 - cosine) or "mse" (sum of squared differences).
        eps: added to the product of row norms.

    Returns:
        float32 (float64 for float64 inputs) tensor [K].
    """
    check_inputs(real_grads, syn_grads, distance)
    acc_dtype = torch.float64 if syn_grads[0].dtype == torch.float64 else torch.float32
    k = real_grads[0].shape[0]
    total = torch.zeros(k, dtype=acc_dtype, device=syn_grads[0].device)
    for r, s in zip(real_grads, syn_grads):
        rv = rows_view(r, include_1d)
        if rv is None:
            continue
        sv = rows_view(s, include_1d)
        rv = rv.to(acc_dtype) * sign
        sv = sv.to(acc_dtype)
        if distance == "cos":
            dot = (rv * sv).sum(-1)
            denom = rv.norm(dim=-1) * sv.norm(dim=-1) + eps
            total = total + (1.0 - dot / denom).sum(-1)
        else:
            total = total + (sv - rv).pow(2).sum((-1, -2))
    return total
