"""Passthrough (mergekit ``passthrough``): copy the one input, optionally scaled.

    θ = scale·θ_1     (scale unset: θ = θ_1)

A single input, as mergekit (``max_inputs = 1``): one model and no base. ``scale`` is a per-model parameter (or
a recipe-wide one; filters and gradients give it per tensor, e.g. ``scale: 0`` on ``o_proj`` to zero a layer's
output); unset copies the tensor. Layer stacking (the method's usual use, with ``slices``) is the recipe's job,
not the method's. float32.
"""

from __future__ import annotations

from typing import Any

import torch

from merge_ops.methods._points import count_models, model_weights, reference_weights
from merge_ops.params import PassthroughParams
from merge_ops.registry import TensorContext, register_method


@register_method("passthrough")
def merge_passthrough(
    task_vectors: torch.Tensor, ctx: TensorContext, params: PassthroughParams
) -> torch.Tensor:
    count_models(task_vectors, "passthrough", expected=1)
    own: dict[str, Any] = dict(ctx.model_params[0]) if ctx.model_params else {}
    scale = own.get("scale", params.scale)
    if scale is None:
        return task_vectors[0].float().clone()
    model = model_weights(task_vectors, ctx, "passthrough")[0]
    return model * float(scale) - reference_weights(ctx, "passthrough")
