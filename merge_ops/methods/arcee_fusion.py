"""Arcee Fusion (mergekit ``arcee_fusion``, https://arcee.ai): keep only the model's important changes.

    importance_i = |θ_1 − θ_0|_i · KL(p ‖ q)_row,  p = softmax(θ_1) + 1e-8, q = softmax(θ_0) + 1e-8 over the
                   last dim, KL = Σ p·log(p/q) per row (1-D tensors: one row)
    threshold = Q2 + 1.5·(Q3 − Q1) of the importances, Q_j the order statistic at ⌊q_j·(n − 1)⌋ of the sorted
                importances (q = 0.25, 0.5, 0.75)
    θ = θ_0 + τ_1 ⊙ [importance ≥ threshold]

Exactly one model and a base. No parameters. Intended difference: above 10⁶ elements mergekit estimates the
quantiles from 10⁶ samples drawn with torch's global RNG (so its mask changes run to run); Alloy takes the exact
order statistics (``kthvalue``) of the whole tensor, deterministic, equal to mergekit's below that size.
Statistics are per tensor. float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from merge_ops.methods._points import count_models, model_weights, reference_weights
from merge_ops.params import ArceeFusionParams
from merge_ops.registry import TensorContext, register_method

_QUANTILES = (0.25, 0.5, 0.75)


def importance_scores(model: torch.Tensor, *, base: torch.Tensor) -> torch.Tensor:
    eps = 1e-8
    p = F.softmax(model, dim=-1) + eps
    q = F.softmax(base, dim=-1) + eps
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return (model - base).abs() * kl


def fusion_threshold(importance: torch.Tensor) -> torch.Tensor:
    flat = importance.reshape(-1)
    # mergekit's index rule, in float32 as it computes it: ⌊q·(n − 1)⌋
    positions = (torch.tensor(_QUANTILES) * (flat.numel() - 1)).long().tolist()
    q1, median, q3 = (torch.kthvalue(flat, int(i) + 1).values for i in positions)
    return median + 1.5 * (q3 - q1)


@register_method("arcee_fusion")
def merge_arcee_fusion(
    task_vectors: torch.Tensor, ctx: TensorContext, params: ArceeFusionParams
) -> torch.Tensor:
    count_models(task_vectors, "arcee_fusion", expected=1)
    base = reference_weights(ctx, "arcee_fusion")
    model = model_weights(task_vectors, ctx, "arcee_fusion")[0]
    tau = task_vectors[0].float()
    if tau.numel() == 0:
        return tau.clone()
    importance = importance_scores(model, base=base)
    mask = importance >= fusion_threshold(importance)
    ctx.report["kept_density"] = float(mask.float().mean())
    return torch.where(mask, tau, 0.0)
