"""The composable task-vector pipeline: sparsify each τ_t -> optional sign consensus -> aggregate.

    τ̂_t = sparsify(τ_t)                            none | magnitude | dare | breadcrumbs | compeft
    consensus none:      sum:  Σ_t w_t·τ̂_t         mean: Σ_t w_t·τ̂_t / Σ_t w_t   (|Σ w| < 1e-8 -> ÷1)
    consensus ties_sign: γ = sgn(Σ_t w_t·τ̂_t), zero -> +1; A = {t : sgn(w_t·τ̂_t) = γ}
                         sum:  Σ_{t∈A} w_t·τ̂_t      mean: Σ_{t∈A} w_t·τ̂_t / Σ_{t∈A} w_t  (0 -> ÷1)

The result is the unscaled merged delta: the pipeline applies λ (and LiNeS) and adds it to θ_0. The ``stages``
method exposes the stages directly; the named presets (``task_arithmetic``, ``ties``, ``dare_*``,
``breadcrumbs*``, ``compeft``) register this same function from their own modules with their own defaults
(see ``merge_ops.params``). Top-k thresholds, σ and L1 norms are per scope unit: per tensor, per row, or
global (one per model, from the first streaming pass). All three stages run as one ``kernels.fused_sparse_merge``
(on a GPU one Triton pass after the radix-select passes). Report stats: ``kept_density`` (non-zeros of τ̂ over
K·n) and, with consensus, ``sign_conflict_rate`` (entries where some non-zero τ̂ disagrees with γ).
"""

from __future__ import annotations

from typing import Any

import torch

from kernels import fused_sparse_merge
from merge_ops.methods.sparsify import selection
from merge_ops.params import Aggregate, Consensus
from merge_ops.registry import TensorContext, register_method


def merge_stages(task_vectors: torch.Tensor, ctx: TensorContext, params: Any) -> torch.Tensor:
    x, chosen = selection(task_vectors, ctx, params)
    consensus = Consensus(params.consensus) == Consensus.ties_sign
    merged, kept, conflicts = fused_sparse_merge(
        x,
        ctx.weights,
        consensus=consensus,
        mean=Aggregate(params.aggregate) == Aggregate.mean,
        **chosen,
    )
    if x.numel():
        ctx.report["kept_density"] = float(kept) / x.numel()
    if consensus and merged.numel():
        ctx.report["sign_conflict_rate"] = float(conflicts) / merged.numel()
    return merged.reshape(task_vectors.shape[1:])


register_method("stages")(merge_stages)
