"""Karcher mean (mergekit ``karcher``; https://arxiv.org/abs/2603.04972): the Riemannian mean of the inputs'
directions on the unit sphere, scaled by their mean norm, each tensor one vector.

    inputs x_i: the models' weights θ_t, plus θ_0 when the recipe has a base (mergekit merges the base as one
                more input); α_i = 1/N (per-model weights are not used, as in mergekit)
    u_i = x_i/‖x_i‖ for the inputs with ‖x_i‖ > tol (all zero: the result is 0); α renormalised over them
    m = normalise(Σ α_i u_i)  (‖·‖ < tol: m = the first u)
    repeat max_iter times: θ_i = acos(clamp(m·u_i, −1, 1));  T = Σ_{θ_i ≥ tol} α_i·θ_i/sin θ_i·(u_i − (m·u_i)·m)
                           stop if ‖T‖ < tol;  m = normalise(cos‖T‖·m + sin‖T‖·T/‖T‖)
    x = (Σ_i α_i‖x_i‖)·m       (the original α, zero-norm inputs included)

Defaults: max_iter 10, tol 1e-5. One input returns it. float32.
"""

from __future__ import annotations

import torch

from merge_ops.methods._points import model_weights, reference_weights
from merge_ops.params import KarcherParams
from merge_ops.registry import TensorContext, register_method


@register_method("karcher")
def merge_karcher(task_vectors: torch.Tensor, ctx: TensorContext, params: KarcherParams) -> torch.Tensor:
    base = reference_weights(ctx, "karcher")
    inputs = list(model_weights(task_vectors, ctx, "karcher"))
    if not ctx.reference_is_input:
        inputs.append(base)
    merged = karcher_mean(inputs, max_iter=params.max_iter, tol=params.tol)
    return merged - base


def karcher_mean(tensors: list[torch.Tensor], *, max_iter: int, tol: float) -> torch.Tensor:
    if len(tensors) == 1:
        return tensors[0].clone()
    alphas = [1.0 / len(tensors)] * len(tensors)
    norms = [torch.linalg.vector_norm(x) for x in tensors]
    units = [torch.zeros_like(x) if float(n) == 0.0 else x / n for x, n in zip(tensors, norms, strict=True)]
    valid = [i for i, n in enumerate(norms) if float(n) > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    alpha_sum = sum(alphas[i] for i in valid)
    valid_alphas = [alphas[i] / alpha_sum for i in valid]
    valid_units = [units[i] for i in valid]

    mean = torch.zeros_like(valid_units[0])
    for alpha, unit in zip(valid_alphas, valid_units, strict=True):
        mean += alpha * unit
    mean_norm = torch.linalg.vector_norm(mean)
    mean = valid_units[0].clone() if float(mean_norm) < tol else mean / mean_norm

    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for alpha, unit in zip(valid_alphas, valid_units, strict=True):
            dot = torch.clamp(torch.dot(mean.flatten(), unit.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if float(theta) < tol:
                continue  # this input sits at the mean: no pull (and θ/sin θ would be 0/0)
            tangent += alpha * (theta / torch.sin(theta)) * (unit - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent)
        if float(tangent_norm) < tol:
            break
        mean = torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)
        unit_norm = torch.linalg.vector_norm(mean)
        if float(unit_norm) > tol:
            mean = mean / unit_norm

    scale = sum(alpha * norm for alpha, norm in zip(alphas, norms, strict=True))
    return scale * mean
