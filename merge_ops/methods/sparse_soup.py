"""Sparse model soup (Zimmer et al., "Sparse Model Soups", ICLR 2024, https://arxiv.org/abs/2306.16788).

    θ = θ_1 + Σ_t w_t·(θ_t − θ_1) / Σ_t w_t      (= Σ_t w_t·θ_t / Σ_t w_t; weights default 1)

Models pruned to one sparsity pattern (the paper retrains each from one pruned model) average into a model with
that pattern. The catalog entry sets ``reads_weights``: the pipeline passes the weights θ_t themselves (a zero
reference, no base added), so zeros are exact zeros and not θ_0 + (0 − θ_0) rounded. Anchoring the mean at θ_1
makes a soup of identical models that model bit for bit and keeps shared zeros exactly zero.

``mask``: unset, the K zero patterns must be equal, and the first tensor where one differs raises
``IncompatibleModelsError`` naming the tensor and the model; ``intersection`` zeroes every entry that any model
zeroes (the output is at least as sparse as each input); ``union`` is the plain mean (zero only where all are).
Reports ``sparsity`` (fraction of exact zeros in the output) per tensor; the job totals weight it by size.
A |Σ w| below 1e-8 divides by 1, as the linear soup does.
"""

from __future__ import annotations

import torch

from merge_ops.errors import IncompatibleModelsError
from merge_ops.params import SparseSoupParams
from merge_ops.registry import TensorContext, register_method

_EPS = 1e-8


@register_method("sparse_soup")
def merge_sparse_soup(models: torch.Tensor, ctx: TensorContext, params: SparseSoupParams) -> torch.Tensor:
    theta = models.float()
    k = int(theta.shape[0])
    zeros = theta == 0
    if params.mask is None:
        for t in range(1, k):
            if not torch.equal(zeros[t], zeros[0]):
                count = int((zeros[t] != zeros[0]).sum())
                raise IncompatibleModelsError(
                    f"{ctx.name}: the zero pattern of models[{ctx.source_indices[t]}] differs from that of "
                    f"models[{ctx.source_indices[0]}] at {count} of {zeros[0].numel()} entries; set params.mask "
                    "to intersection or union to merge models with different sparsity patterns",
                    tensor=ctx.name,
                )
    weights = [float(w) for w in ctx.weights]
    total = sum(weights)
    anchor = theta[0]
    spread = torch.zeros_like(anchor)
    for t in range(1, k):  # one model at a time: no [K, *S] temporary
        spread.add_(theta[t] - anchor, alpha=weights[t])
    # Σ_t w_t θ_t = θ_1·Σw + Σ_{t>1} w_t (θ_t − θ_1); dividing by Σw leaves θ_1 untouched when the spread is 0.
    merged = anchor + spread / total if abs(total) >= _EPS else anchor * total + spread
    if params.mask == "intersection":
        merged = merged.masked_fill(zeros.any(dim=0), 0.0)
    ctx.report["sparsity"] = float((merged == 0).sum()) / max(1, merged.numel())
    return merged
