"""NearSwap (mergekit ``nearswap``; https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001).

    w = clamp(t / max(|θ_1 − θ_0|, 1e-6), 0, 1) per element;  θ = w·θ_1 + (1 − w)·θ_0 = θ_0 + w·τ_1

Where the model is within ``t`` of the base it is taken as is (w = 1); farther away the result moves toward the
base in proportion to t/|τ|. Exactly one model and a base (mergekit: base required, two inputs). ``t`` is
required (no default in mergekit) and unbounded (t ≤ 0 gives the base). float32.
"""

from __future__ import annotations

import torch

from merge_ops.methods._points import count_models, model_weights, reference_weights
from merge_ops.params import NearswapParams
from merge_ops.registry import TensorContext, register_method


@register_method("nearswap")
def merge_nearswap(task_vectors: torch.Tensor, ctx: TensorContext, params: NearswapParams) -> torch.Tensor:
    count_models(task_vectors, "nearswap", expected=1)
    base = reference_weights(ctx, "nearswap")
    model = model_weights(task_vectors, ctx, "nearswap")[0]
    weight = (float(params.t) / (base - model).abs().clamp(min=1e-6)).clamp(min=0, max=1)
    if weight.numel():
        ctx.report["nearswap_mean_weight"] = float(weight.mean())
    # mergekit's form on the weights (not base + w·τ): base + (this − base) then rounds back to it exactly
    # wherever the two are within a factor 2 (Sterbenz), so the output equals mergekit's bit for bit there
    return (weight * model + (1 - weight) * base) - base
