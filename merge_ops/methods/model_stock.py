"""Model Stock (Jang et al., ECCV 2024, https://arxiv.org/abs/2403.19522).

    cos = mean over pairs i<j of cos(δ_i, δ_j)  (per tensor, or per row with ``filter_wise``)
    t = N·cos / (1 + (N − 1)·cos);   θ = θ_0 + t·(1/N)·Σ_i δ_i      (method returns t·mean δ)

As mergekit: each cosine is dot/max(‖δ_i‖‖δ_j‖, 1e-6); weights are ignored (the paper averages uniformly);
``filter_wise`` rows are the first dimension of the tensor viewed as [rows, -1] (1-D/0-D: the whole tensor).
Documented deviation: cos is clamped to [0, 1] (mergekit clamps each pairwise cos to [−1, 1]), so t ∈ [0, 1] and
the merge never extrapolates away from the fine-tunes nor divides by 1 + (N−1)·cos = 0; ``cosine_clamp: mergekit``
(what mergekit configs translate to) follows mergekit instead, t = 0 where |1 + (N−1)·cos| < 1e-6. Zero deltas give cos 0 -> t 0 -> θ_0.
One model (N = 1) returns its δ (t = 1). Report stat: mean ``model_stock_t``.
"""

from __future__ import annotations

import torch

from merge_ops.params import ModelStockParams
from merge_ops.registry import TensorContext, register_method


@register_method("model_stock")
def merge_model_stock(
    task_vectors: torch.Tensor, ctx: TensorContext, params: ModelStockParams
) -> torch.Tensor:
    tv = task_vectors.float()
    n_models = tv.shape[0]
    mean_delta = tv.mean(dim=0)
    if n_models < 2:
        return mean_delta
    rows = (
        tv.reshape(n_models, tv.shape[1], -1)
        if params.filter_wise and tv.dim() >= 3
        else tv.reshape(n_models, 1, -1)
    )
    norms = rows.norm(dim=-1)  # [N, R]
    cosines = []
    for i in range(n_models):
        for j in range(i + 1, n_models):
            dot = (rows[i] * rows[j]).sum(dim=-1)
            cosines.append(dot / (norms[i] * norms[j]).clamp(min=1e-6))
    if params.cosine_clamp == "mergekit":
        # mergekit: clamp each pairwise cosine to [-1, 1]; at the singularity keep the base (t = 0)
        cos = torch.stack([c.clamp(-1.0, 1.0) for c in cosines]).mean(dim=0)
        denominator = 1 + (n_models - 1) * cos
        singular = denominator.abs() < 1e-6
        t = torch.where(singular, 0.0, n_models * cos / torch.where(singular, 1.0, denominator))
    else:
        cos = torch.stack(cosines).mean(dim=0).clamp(0.0, 1.0)  # [R]
        t = n_models * cos / (1 + (n_models - 1) * cos)
    ctx.report["model_stock_t"] = float(t.mean())
    return (mean_delta.reshape(rows.shape[1], -1) * t.unsqueeze(1)).reshape(mean_delta.shape)
