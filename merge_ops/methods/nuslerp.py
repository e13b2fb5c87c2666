"""NuSLERP (mergekit ``nuslerp``): SLERP of two models with the factor from their weights.

    t = w_2 / (w_1 + w_2)   (|w_1 + w_2| < 1e-6: t = 0.5)
    with a base:     θ = θ_0 + slerp_t(τ_1, τ_2)        (interpolates the task vectors)
    without a base:  θ = slerp_t(θ_1, θ_2)
    slerp_t(v_0, v_1): u_i = v_i / max(‖v_i‖, 1e-7), c = clamp(u_0·u_1, −1, 1), Ω = acos c
                       (sin((1 − t)Ω)·v_0 + sin(tΩ)·v_1) / sin Ω;  lerp where 1 − c² ≤ eps² (eps = 1e-8)

The vectors are the whole tensor (``nuslerp_flatten``, default), else the rows (last dim), or the columns
(``nuslerp_row_wise``: dim 0). Unlike ``slerp`` the unnormalised vectors are interpolated, and the colinear
test is (almost) exact colinearity. Exactly two models; the base is optional. 0-dim tensors are one-element
vectors. float32 throughout.
"""

from __future__ import annotations

import torch

from merge_ops.methods._points import count_models, model_weights
from merge_ops.params import NuslerpParams
from merge_ops.registry import TensorContext, register_method

EPS = 1e-8
NORM_EPS = 1e-7


def nuslerp(v0: torch.Tensor, v1: torch.Tensor, *, t: float, row_wise: bool, flatten: bool) -> torch.Tensor:
    out_shape = v0.shape
    if flatten or v0.dim() == 0:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=NORM_EPS)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=NORM_EPS)
    cos = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= EPS**2
    theta = torch.acos(torch.where(colinear, 0, cos))  # keeps the unused branch finite
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if row_wise and not flatten and len(out_shape) > 0:
        result = result.transpose(0, -1)
    return result.reshape(out_shape)


@register_method("nuslerp")
def merge_nuslerp(task_vectors: torch.Tensor, ctx: TensorContext, params: NuslerpParams) -> torch.Tensor:
    count_models(task_vectors, "nuslerp", expected=2)
    w0, w1 = (float(w) for w in ctx.weights.tolist())
    total = w0 + w1
    t = 0.5 if abs(total) < 1e-6 else w1 / total
    options = {"row_wise": params.nuslerp_row_wise, "flatten": params.nuslerp_flatten}
    if not ctx.reference_is_input:  # a base: interpolate the task vectors
        tv = task_vectors.float()
        return nuslerp(tv[0], tv[1], t=t, **options)
    models = model_weights(task_vectors, ctx, "nuslerp")
    return nuslerp(models[0], models[1], t=t, **options) - models[0]
