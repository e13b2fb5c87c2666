"""The composable task-vector pipeline: sparsify each τ_t -> optional sign consensus -> aggregate.

    τ̂_t = sparsify(τ_t)                            none | magnitude | dare | breadcrumbs | compeft
    consensus none:      sum:  Σ_t w_t·τ̂_t         mean: Σ_t w_t·τ̂_t / Σ_t w_t   (|Σ w| < 1e-8 -> ÷1)
    consensus ties_sign: γ = sgn(Σ_t w_t·τ̂_t), zero -> +1; A = {t : sgn(w_t·τ̂_t) = γ}
                         sum:  Σ_{t∈A} w_t·τ̂_t      mean: Σ_{t∈A} w_t·τ̂_t / Σ_{t∈A} w_t  (0 -> ÷1)

The result is the unscaled merged delta: the pipeline applies λ (and LiNeS) and adds it to θ_0. The ``stages``
method exposes the stages directly; the named presets (``task_arithmetic``, ``ties``, ``dare_*``,
``breadcrumbs*``, ``compeft``) register this same function from their own modules with their own defaults
(see ``merge_ops.params``). Top-k thresholds, σ and L1 norms are per scope unit: per tensor, per row, or
global (one per model, from the first streaming pass). Report stats: ``kept_density`` (non-zeros of τ̂ over
K·n) and, with consensus, ``sign_conflict_rate`` (entries where some non-zero τ̂ disagrees with γ).
"""

from __future__ import annotations

from typing import Any

import torch

from kernels import disjoint_merge
from merge_ops.methods.sparsify import sparsify
from merge_ops.params import Aggregate, Consensus
from merge_ops.registry import TensorContext, register_method

_MEAN_EPS = 1e-8


def merge_stages(task_vectors: torch.Tensor, ctx: TensorContext, params: Any) -> torch.Tensor:
    sparse = sparsify(task_vectors, ctx, params)
    weights = ctx.weights.to(device=sparse.device, dtype=torch.float32)
    mean = Aggregate(params.aggregate) == Aggregate.mean
    if Consensus(params.consensus) == Consensus.ties_sign:
        merged, contributors = disjoint_merge(sparse, weights, mean=mean)
        nonzero = _nonzero_per_entry(sparse)
        if sparse.numel():
            ctx.report["kept_density"] = float(nonzero.sum()) / sparse.numel()
        if merged.numel():
            ctx.report["sign_conflict_rate"] = float((nonzero > contributors).sum()) / merged.numel()
        return merged
    if sparse.numel():
        ctx.report["kept_density"] = float(torch.count_nonzero(sparse)) / sparse.numel()
    merged = torch.zeros(sparse.shape[1:], dtype=torch.float32, device=sparse.device)
    for t, weight in enumerate(weights.tolist()):  # t = 0..K-1 in order, no weighted [K, *S] copy
        merged.add_(sparse[t], alpha=weight)
    if mean:
        divisor = float(weights.sum())
        merged = merged / (divisor if abs(divisor) >= _MEAN_EPS else 1.0)
    return merged


def _nonzero_per_entry(sparse: torch.Tensor) -> torch.Tensor:
    """How many of the K task vectors are non-zero at each entry (a small-int accumulator over K: several times
    faster on CPU than ``count_nonzero(dim=0)``)."""
    counts = torch.zeros(
        sparse.shape[1:], dtype=torch.uint8 if sparse.shape[0] < 256 else torch.int32, device=sparse.device
    )
    for t in range(sparse.shape[0]):
        counts.add_(sparse[t] != 0)
    return counts


register_method("stages")(merge_stages)
