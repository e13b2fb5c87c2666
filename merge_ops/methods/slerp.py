"""SLERP: spherical linear interpolation of two models (Shoemake 1985; mergekit ``slerp``).

    a = θ_0 / ‖θ_0‖, b = θ_1 / ‖θ_1‖ (a norm ≤ eps = 1e-8 counts as 1),  d = clamp(a·b, −1, 1)
    |d| > 0.9995:  θ = (1 − t)·θ_0 + t·θ_1                        (near-colinear or antipodal: lerp)
    else:          Ω = acos d,  θ = sin((1 − t)Ω)/sin Ω · θ_0 + sin(tΩ)/sin Ω · θ_1

The two inputs are the base (t = 0) and the one model, or, without a base, the first model (t = 0) and the
second; mergekit requires the base (its configs list it in ``models`` too). The angle is over the whole tensor
(one vector per tensor), the interpolation is of the raw weights, not of task vectors. ``t`` has no default
(mergekit requires it) and no bounds (outside [0, 1] it extrapolates); a list is a gradient over the layers,
per-tensor values come from filters, as every param. Returns θ − θ_ref in float32; d is v0·v1/(‖v0‖‖v1‖) from
float64 sums (one compiled pass; mergekit sums float32 products of the normalised vectors, so d agrees up to
rounding), the coefficients and the interpolation are float32. Report stat: ``slerp_lerp`` (1 where the colinear
fallback was taken).
"""

from __future__ import annotations

import math

import torch

import kernels
from merge_ops.methods._points import count_models, reference_weights
from merge_ops.params import SlerpParams
from merge_ops.registry import TensorContext, register_method

DOT_THRESHOLD = 0.9995
EPS = 1e-8


def slerp_delta(v0: torch.Tensor, tau: torch.Tensor, *, t: float) -> tuple[torch.Tensor, bool]:
    """SLERP of v0 and v1 = τ + v0 (same-shape float32 tensors, each taken as one vector) as its delta from v0,
    and whether it fell back to lerp. The angle comes from float64 sums over the tensors (``kernels.slerp_moments``:
    ‖v0‖, ‖v1‖ and v0·v1 in one pass, so d = v0·v1/(‖v0‖‖v1‖) where mergekit sums the float32 products of the
    normalised vectors: the same d up to rounding, the branch the same but within ~1e-7 of the threshold); the
    coefficients are then float32 as before, and the delta is (c0·v0 + c1·v1) − v0, elementwise
    (``kernels.slerp_delta``), without v1 or the interpolation ever stored."""
    if v0.numel() == 0:
        return torch.zeros_like(v0), True
    s00, s11, s01 = kernels.slerp_moments(v0, tau).tolist()
    norm_a, norm_b = math.sqrt(s00), math.sqrt(s11)
    norm_a = norm_a if norm_a > EPS else 1.0
    norm_b = norm_b if norm_b > EPS else 1.0
    dot = min(1.0, max(-1.0, s01 / norm_a / norm_b))
    tt = torch.tensor(t, dtype=torch.float32)
    if abs(dot) > DOT_THRESHOLD:
        return kernels.slerp_delta(v0, tau, float(1 - tt), float(tt)), True
    theta = torch.acos(torch.tensor(dot, dtype=torch.float32))
    sin_theta = torch.sin(theta)
    c0, c1 = torch.sin((1 - tt) * theta) / sin_theta, torch.sin(tt * theta) / sin_theta
    return kernels.slerp_delta(v0, tau, float(c0), float(c1)), False


@register_method("slerp")
def merge_slerp(task_vectors: torch.Tensor, ctx: TensorContext, params: SlerpParams) -> torch.Tensor:
    base = reference_weights(ctx, "slerp")
    if ctx.reference_is_input:  # no base: model 0 (= the reference) to model 1
        count_models(task_vectors, "slerp", expected=2)
        tau = task_vectors[1]
    else:
        count_models(task_vectors, "slerp", expected=1)
        tau = task_vectors[0]
    delta, lerp = slerp_delta(base, tau.float(), t=float(params.t))
    ctx.report["slerp_lerp"] = float(lerp)
    return delta
