"""Multi-SLERP (mergekit ``multislerp``; https://goddard.blog/posts/multislerp-wow-what-a-cool-idea).

Barycentric interpolation of N ≥ 1 models on the hypersphere, each tensor one vector:

    x_t = τ_t with a base (the result is added to θ_0), else θ_t;  w ← w / Σw (``normalize_weights``)
    u_t = x_t / (‖x_t‖ + eps);  m = Σ_t w_t·u_t;  m̂ = m / ‖m‖
    v_t = u_t − (u_t·m̂)·m̂ (tangent at m̂);  v = Σ_t w_t·v_t;  s = ‖v‖ + eps
    x = (m̂·cos s + v·sin(s)/s) · Σ_t w_t‖x_t‖

One model returns that model. ‖m‖ < eps (antipodal inputs whose weights cancel) falls back to the weighted sum
Σ w_t x_t for two models and is an error for more, as in mergekit; except when every input is zero (a tensor no
fine-tune changed): the result is zero, where mergekit raises that error (a failure, not copied). Defaults: normalize_weights, eps 1e-8.
Weights come from the models (default 1). float32.
"""

from __future__ import annotations

import torch

from merge_ops.errors import IncompatibleModelsError
from merge_ops.methods._points import model_weights
from merge_ops.params import MultislerpParams
from merge_ops.registry import TensorContext, register_method


@register_method("multislerp")
def merge_multislerp(
    task_vectors: torch.Tensor, ctx: TensorContext, params: MultislerpParams
) -> torch.Tensor:
    if task_vectors.shape[0] == 1:
        return task_vectors[0].float().clone()  # the model itself (τ_0 = 0 without a base)
    with_base = not ctx.reference_is_input
    points = task_vectors.float() if with_base else model_weights(task_vectors, ctx, "multislerp")
    merged = multislerp(points, ctx.weights, normalize_weights=params.normalize_weights, eps=params.eps)
    if merged is None:
        raise IncompatibleModelsError(
            f"multislerp of {ctx.name}: the weighted sum of the inputs' directions is zero (antipodal tensors "
            "with weights that cancel); use different weights",
            tensor=ctx.name,
        )
    return merged if with_base else merged - points[0]


def multislerp(
    points: torch.Tensor, weights: torch.Tensor, *, normalize_weights: bool, eps: float
) -> torch.Tensor | None:
    """The interpolation of ``points[N, *S]``; None where it is undefined (see the module docstring)."""
    n = points.shape[0]
    flat = points.reshape(n, -1)
    w = weights.to(device=points.device, dtype=torch.float32)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if bool((norms <= eps).all()):
        # every input is (numerically) zero, e.g. a tensor no fine-tune changed: the result is zero too
        # (mergekit raises its antipodal error here for three or more models: a failure, not copied)
        return torch.zeros(points.shape[1:], device=points.device)
    if bool(mean_norm < eps):
        if n == 2:
            return (points[0] * w[0] + points[1] * w[1]).reshape(points.shape[1:])
        return None
    mean = mean / mean_norm
    dots = (units * mean).sum(-1, keepdim=True)
    tangent = ((units - dots * mean) * w.view(-1, 1)).sum(0)
    tangent_norm = torch.norm(tangent) + eps
    result = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    return (result * (norms.squeeze(-1) * w).sum()).reshape(points.shape[1:])
