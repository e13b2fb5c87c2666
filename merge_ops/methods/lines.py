"""LiNeS as a method (Wang, Dimitriadis et al., ICLR 2025, https://arxiv.org/abs/2410.17146).

    τ_merged = Σ_t w_t·τ_t;  θ = θ_0 + λ·λ(ℓ)·τ_merged,  λ(ℓ) = α + β·ℓ/(L − 1)

The method itself is the plain task-arithmetic sum; the pipeline applies λ and the per-block LiNeS scale
(``merge_ops.lines``: block index from the name, α auto = (‖Σ_t τ_t‖₁/‖τ_merged‖₁)/T = 1/T here, β 0.5).
"""

from __future__ import annotations

import torch

from merge_ops.params import LinesMethodParams
from merge_ops.registry import TensorContext, register_method


@register_method("lines")
def merge_lines(task_vectors: torch.Tensor, ctx: TensorContext, params: LinesMethodParams) -> torch.Tensor:
    tv = task_vectors.float()
    weights = ctx.weights.to(device=tv.device, dtype=torch.float32)
    return (tv * weights.reshape(-1, *([1] * (tv.dim() - 1)))).sum(dim=0)
