"""aTLAS per tensor (Zhang et al., "Knowledge Composition using Task Vectors with Learned Anisotropic Scaling",
NeurIPS 2024, https://arxiv.org/abs/2407.02880).

    θ_b = θ_0,b + Σ_t λ_{t,b}·w_t·τ_{t,b}        one coefficient per task vector t and parameter block b (a tensor)

``params.coefficients[name]`` holds the K coefficients of this tensor (``merge_ops.atlas`` learns them and writes
them there); a tensor without an entry uses λ for every model. The pipeline scales the returned delta by λ, so
the method returns task arithmetic's aggregate with weights w_t·λ_{t,b}/λ: with every coefficient equal to λ the
ratio is exactly 1 and the merge is ``task_arithmetic`` with that λ (the same aggregate as its generic path;
on full checkpoints task_arithmetic takes a fused one-pass kernel, equal up to float32 rounding).
"""

from __future__ import annotations

import dataclasses

import torch

from merge_ops.errors import RecipeError
from merge_ops.methods.stages import merge_stages
from merge_ops.params import AtlasParams, TaskArithmeticParams
from merge_ops.registry import TensorContext, register_method


@register_method("atlas")
def merge_atlas(task_vectors: torch.Tensor, ctx: TensorContext, params: AtlasParams) -> torch.Tensor:
    coefficients = (params.coefficients or {}).get(ctx.name)
    weights = ctx.weights
    if coefficients is not None:
        k = int(task_vectors.shape[0])
        if len(coefficients) != k:
            raise RecipeError(
                f"params.coefficients[{ctx.name!r}] has {len(coefficients)} values for {k} models",
                tensor=ctx.name,
            )
        lam = float(params.lambda_)
        ratio = torch.tensor([c / lam for c in coefficients], dtype=torch.float32, device=weights.device)
        weights = weights * ratio
    return merge_stages(task_vectors, dataclasses.replace(ctx, weights=weights), TaskArithmeticParams())
