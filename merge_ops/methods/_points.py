"""Shared helpers of the methods that work on the models' weights rather than only on task vectors.

The pipeline always passes task vectors ``τ_t = θ_t − θ_ref`` against a reference: the recipe's base, or the
first model when there is none (then ``τ_0 = 0`` and ``ctx.reference_is_input``). Methods whose catalog entry
sets ``needs_base_weights`` also get ``ctx.base = θ_ref`` (float32) and rebuild θ_t = θ_ref + τ_t from it.
"""

from __future__ import annotations

from typing import Any

import torch

from merge_ops.registry import TensorContext


def reference_weights(ctx: TensorContext, method: str) -> torch.Tensor:
    """θ_ref of this tensor (float32); the pipeline passes it when the catalog entry asks for it."""
    if ctx.base is None:
        raise ValueError(f"{method} needs the base weights (TensorContext.base) for {ctx.name!r}")
    return ctx.base.float()


def model_weights(task_vectors: torch.Tensor, ctx: TensorContext, method: str) -> torch.Tensor:
    """θ_t = θ_ref + τ_t, float32 [K, *S] (model 0 is θ_ref itself when the recipe has no base)."""
    return task_vectors.float() + reference_weights(ctx, method)


def count_models(task_vectors: torch.Tensor, method: str, *, expected: int) -> None:
    """Recipe validation enforces the counts (``MethodInfo``); this guards direct calls."""
    if task_vectors.shape[0] != expected:
        raise ValueError(f"{method} merges exactly {expected} model(s) here, got {task_vectors.shape[0]}")


def per_model_values(ctx: TensorContext, key: str, fallback: list[float]) -> list[float]:
    """``key`` per model: the model's own parameter (``ctx.model_params``), else ``fallback[t]``."""
    if not ctx.model_params:
        return list(fallback)
    return [float(p.get(key, f)) for p, f in zip(ctx.model_params, fallback, strict=True)]


def per_model_densities(ctx: TensorContext, params: Any, k: int) -> list[float]:
    """Per-model densities: the model's ``density`` parameter, else ``ctx.densities`` (the pipeline fills in the
    tensor's method-level density for models without their own), else ``params.density``."""
    fallback = list(ctx.densities) if ctx.densities is not None else [float(params.density)] * k
    return per_model_values(ctx, "density", fallback)
