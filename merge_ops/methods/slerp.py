"""SLERP: spherical linear interpolation of two models (Shoemake 1985; mergekit ``slerp``).

    a = θ_0 / ‖θ_0‖, b = θ_1 / ‖θ_1‖ (a norm ≤ eps = 1e-8 counts as 1),  d = clamp(a·b, −1, 1)
    |d| > 0.9995:  θ = (1 − t)·θ_0 + t·θ_1                        (near-colinear or antipodal: lerp)
    else:          Ω = acos d,  θ = sin((1 − t)Ω)/sin Ω · θ_0 + sin(tΩ)/sin Ω · θ_1

The two inputs are the base (t = 0) and the one model, or, without a base, the first model (t = 0) and the
second; mergekit requires the base (its configs list it in ``models`` too). The angle is over the whole tensor
(one vector per tensor), the interpolation is of the raw weights, not of task vectors. ``t`` has no default
(mergekit requires it) and no bounds (outside [0, 1] it extrapolates); a list is a gradient over the layers,
per-tensor values come from filters, as every param. Returns θ − θ_ref; float32 throughout (mergekit uses
float64 only for float64 inputs). Report stat: ``slerp_lerp`` (1 where the colinear fallback was taken).
"""

from __future__ import annotations

import torch

from merge_ops.methods._points import count_models, model_weights, reference_weights
from merge_ops.params import SlerpParams
from merge_ops.registry import TensorContext, register_method

DOT_THRESHOLD = 0.9995
EPS = 1e-8


def slerp(v0: torch.Tensor, v1: torch.Tensor, *, t: float) -> tuple[torch.Tensor, bool]:
    """SLERP of two same-shape float32 tensors, each taken as one vector; also whether it fell back to lerp."""
    a, b = v0.reshape(-1), v1.reshape(-1)
    tt = torch.tensor(t, dtype=torch.float32, device=v0.device)
    if a.numel() == 0:
        return (1 - tt) * v0 + tt * v1, True
    norm_a, norm_b = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    norm_a = torch.where(norm_a > EPS, norm_a, 1.0)
    norm_b = torch.where(norm_b > EPS, norm_b, 1.0)
    # normalise before multiplying, so the raw dot product cannot overflow
    unit_a = a / norm_a
    dot = unit_a.mul_(b / norm_b).sum().clamp(-1, 1)  # in place: the same products, one temporary fewer
    del unit_a
    if bool(dot.abs() > DOT_THRESHOLD):
        return _weighted_pair(1 - tt, v0, tt, v1), True
    theta = torch.acos(dot)
    sin_theta = torch.sin(theta)
    return _weighted_pair(
        torch.sin((1 - tt) * theta) / sin_theta, v0, torch.sin(tt * theta) / sin_theta, v1
    ), False


def _weighted_pair(c0: torch.Tensor, v0: torch.Tensor, c1: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """c0·v0 + c1·v1, the sum in place (the same float32 operations as out of place, one tensor fewer)."""
    return (c0 * v0).add_(c1 * v1)


@register_method("slerp")
def merge_slerp(task_vectors: torch.Tensor, ctx: TensorContext, params: SlerpParams) -> torch.Tensor:
    base = reference_weights(ctx, "slerp")
    if ctx.reference_is_input:  # no base: model 0 (= the reference) to model 1
        count_models(task_vectors, "slerp", expected=2)
        v1 = model_weights(task_vectors[1:], ctx, "slerp")[0]
    else:
        count_models(task_vectors, "slerp", expected=1)
        v1 = model_weights(task_vectors, ctx, "slerp")[0]
    merged, lerp = slerp(base, v1, t=float(params.t))
    ctx.report["slerp_lerp"] = float(lerp)
    return merged.sub_(base)  # merged is slerp's own fresh tensor
