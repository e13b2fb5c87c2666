"""Linear merge / uniform model soup (Wortsman et al., ICML 2022, https://arxiv.org/abs/2203.05482).

    θ = Σ_t w_t·θ_t / Σ_t w_t      (normalize, default)      or      Σ_t w_t·θ_t      (normalize false)

The pipeline passes τ_t = θ_t − θ_ref relative to a reference model (the base, or the first model when there is
none), so the method returns Σ w τ / Σ w (or Σ w τ) and θ_ref + that is the soup. A |Σ w| below 1e-8 divides by
1 (mergekit). Weights default to 1 (the uniform soup). No statistics, no scope.
"""

from __future__ import annotations

import torch

from merge_ops.params import GreedySoupParams, SoupParams
from merge_ops.registry import TensorContext, register_method

_EPS = 1e-8


@register_method("linear", "model_soup")
def merge_soup(task_vectors: torch.Tensor, ctx: TensorContext, params: SoupParams) -> torch.Tensor:
    tv = task_vectors.float()
    weights = ctx.weights.to(device=tv.device, dtype=torch.float32)
    merged = (tv * weights.reshape(-1, *([1] * (tv.dim() - 1)))).sum(dim=0)
    if params.normalize:
        divisor = float(weights.sum())
        merged = merged / (divisor if abs(divisor) >= _EPS else 1.0)
    return merged


@register_method("greedy_soup")
def merge_greedy_soup(
    task_vectors: torch.Tensor, ctx: TensorContext, params: GreedySoupParams
) -> torch.Tensor:
    """Per tensor, a greedy soup is the (weighted) mean of the ingredients it kept; ``run_merge`` chooses them
    with the evaluator first (``merge_ops.greedy_soup``), whole models at a time."""
    return merge_soup(task_vectors, ctx, SoupParams())
