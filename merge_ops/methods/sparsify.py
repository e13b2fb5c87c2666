"""The sparsify stage: what each task vector τ_t keeps, per scope unit (see ``_scope``), as the selection
arguments of ``kernels.fused_sparse_merge`` (which selects, aggregates and counts in one op).

- ``magnitude``: keep exactly ⌊density·n⌋ (≥ 1) largest |τ|, ties by lowest flat index.
- ``dare``: counter-based Bernoulli(density) keep mask keyed by (seed, source index, tensor name), then rescale
  ``inverse`` (×1/density), ``l1`` (× ‖τ‖₁/‖kept‖₁ per scope unit, skipped when either is < 1e-7, as mergekit) or
  ``none``. density 1 keeps τ unchanged, exactly.
- ``breadcrumbs``: drop the ⌊top_removed·n⌋ largest, keep the next ⌊density·n⌋ (≥ 1, capped by what is left);
  ⌊top_removed·n⌋ = 0 removes nothing (mergekit ≤ 0.1.4 zeroes the tensor there: a bug not copied).
  0-dim tensors pass unchanged (under ``scope=global`` they still count in the ranking).
- ``compeft``: magnitude top-k, then every kept entry becomes ±α·σ, σ the unbiased std of the uncompressed τ in
  the scope unit. A unit with fewer than 2 elements (0-dim tensors, per-tensor scope) has no unbiased std and
  passes unchanged. Under ``scope=global`` σ and the top-k are the model's (``ctx.global_stats``).

DARE with ``rescale=l1`` in a local scope needs each unit's kept L1 norm before it can scale, so it is the one
case sparsified here (torch ops) and handed to the op as already sparse.
"""

from __future__ import annotations

from typing import Any

import torch

from kernels import dare_keep_mask
from kernels.reference import dare_key
from merge_ops.methods._scope import ScopeView, floor_count, kept_count, scope_view
from merge_ops.params import Scope, Sparsify
from merge_ops.registry import TensorContext

_L1_EPS = 1e-7  # mergekit rescaled_masked_tensor eps

Selection = dict[str, Any]


def _row_densities(view: ScopeView, ctx: TensorContext, params: Any) -> torch.Tensor:
    """float64 [R]: each row's density (per-model densities from the recipe, else params.density)."""
    return torch.tensor(_model_densities(ctx, params, view.shape[0]), dtype=torch.float64)[
        view.model_of_row.cpu()
    ]


def selection(task_vectors: torch.Tensor, ctx: TensorContext, params: Any) -> tuple[torch.Tensor, Selection]:
    """``x[K, R, m]`` (a float32 view of τ cut into scope rows) and the keyword arguments that make
    ``fused_sparse_merge`` apply ``params.sparsify`` in ``ctx.scope``."""
    kind = Sparsify(params.sparsify)
    tv = task_vectors.float()
    k = tv.shape[0]
    whole = tv.reshape(k, 1, -1)
    if kind == Sparsify.none:
        return whole, {}
    if kind == Sparsify.dare:
        return _dare(tv, ctx, params)
    if tv.dim() == 1 and (
        kind == Sparsify.breadcrumbs or (kind == Sparsify.compeft and ctx.scope != Scope.global_)
    ):
        return (
            whole,
            {},
        )  # 0-dim tensors (stacked as [K]): Breadcrumbs keeps them; ComPEFT has no std of one value
    view = scope_view(tv, ctx.scope)
    x = view.rows.reshape(k, -1, view.n)
    if ctx.scope == Scope.global_:
        args = _global_stats(ctx).boundaries(ctx.name, device=tv.device)
    else:
        keep, skip = _local_counts(view, ctx, params, kind)
        args = {"keep": keep, "skip": skip}
    if kind == Sparsify.compeft:
        scale = ternary_scale(view, ctx, float(params.alpha))
        args.update(scale=scale, ternary=True)
        # the report's per-tensor ComPEFT statistics: each model's α·σ (its mean over rows for per_row) and σ
        per_model = scale.reshape(k, -1).to(torch.float64).mean(dim=1).tolist()
        ctx.report["compeft_scale"] = [round(v, 9) for v in per_model]
        ctx.report["compeft_sigma"] = [round(v / float(params.alpha), 9) for v in per_model]
    return x, args


def _local_counts(
    view: ScopeView, ctx: TensorContext, params: Any, kind: Sparsify
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per row: how many to keep, and (Breadcrumbs) how many of the largest to skip first."""
    density = _row_densities(view, ctx, params)
    keep = kept_count(density, view.n)
    if kind != Sparsify.breadcrumbs:
        return keep, None
    top_removed = ctx.per_model("top_removed", float(params.top_removed))  # per model: mergekit's gamma
    rows = torch.tensor(top_removed, dtype=torch.float64)[view.model_of_row.cpu()]
    skip = floor_count(rows, view.n)
    return torch.minimum(keep, view.n - skip), skip


def ternary_scale(view: ScopeView, ctx: TensorContext, alpha: float) -> torch.Tensor:
    """ComPEFT's α·σ per row (float32 [R]). A local unit of one element has no unbiased std and stays unchanged:
    its scale is |x| (ternarizing x to sgn(x)·|x| is the identity)."""
    if ctx.scope == Scope.global_:
        per_model = torch.tensor(_global_stats(ctx).sigma, dtype=torch.float32)
        return per_model[view.model_of_row.cpu()].to(view.rows.device) * alpha
    if view.n < 2:
        return view.rows.abs().reshape(-1)
    return view.rows.to(torch.float64).std(dim=1, correction=1).to(torch.float32) * alpha


def _model_densities(ctx: TensorContext, params: Any, k: int) -> tuple[float, ...]:
    return ctx.densities if ctx.densities is not None else (float(params.density),) * k


def _dare(tv: torch.Tensor, ctx: TensorContext, params: Any) -> tuple[torch.Tensor, Selection]:
    k = tv.shape[0]
    densities = _model_densities(ctx, params, k)
    whole = tv.reshape(k, 1, -1)
    if params.rescale == "l1" and ctx.scope != Scope.global_:
        return _dare_l1_local(tv, ctx, densities).reshape(k, 1, -1), {}
    if params.rescale == "l1":
        stats = _global_stats(ctx)
        if stats.dare_kept_l1 is None:
            raise ValueError("global DARE l1 rescale needs global stats computed with rescale='l1'")
        ratios = [
            before / after if before >= _L1_EPS and after >= _L1_EPS and d < 1.0 else 1.0
            for before, after, d in zip(stats.l1, stats.dare_kept_l1, densities, strict=True)
        ]
    elif params.rescale == "inverse":
        ratios = [1.0 / d for d in densities]  # density 1 gives 1.0: the identity, exactly
    else:
        ratios = [1.0] * k
    keys = [dare_key(seed=ctx.seed, source_index=ctx.source_indices[i], name=ctx.name) for i in range(k)]
    scale = torch.tensor(ratios, dtype=torch.float32, device=tv.device)
    return whole, {"dare": (keys, list(densities)), "scale": scale}


def _dare_l1_local(tv: torch.Tensor, ctx: TensorContext, densities: tuple[float, ...]) -> torch.Tensor:
    """DARE masks with mergekit's per-unit L1 rescale (``rescaled_masked_tensor``)."""
    out = torch.empty_like(tv)
    for i, density in enumerate(densities):
        if density >= 1.0:
            out[i] = tv[i]  # the identity, exactly (no l1 ratio)
            continue
        keep = dare_keep_mask(
            tv.shape[1:],
            density=density,
            seed=ctx.seed,
            source_index=ctx.source_indices[i],
            name=ctx.name,
            device=tv.device,
        )
        out[i] = _l1_rescale(tv[i], torch.where(keep, tv[i], 0.0), ctx.scope)
    return out


def _l1_rescale(original: torch.Tensor, kept: torch.Tensor, scope: Scope) -> torch.Tensor:
    """Match the L1 norm of each scope unit."""
    scope = scope if original.dim() >= 2 else Scope.per_tensor
    view_o = scope_view(original.unsqueeze(0), scope).rows.to(torch.float64)
    view_k = scope_view(kept.unsqueeze(0), scope).rows
    before = view_o.abs().sum(dim=1)
    after = view_k.to(torch.float64).abs().sum(dim=1)
    ok = (before >= _L1_EPS) & (after >= _L1_EPS)
    ratio = torch.where(ok, before / torch.where(ok, after, 1.0), 1.0).to(torch.float32)
    return (view_k * ratio.unsqueeze(1)).reshape(kept.shape)


def _global_stats(ctx: TensorContext) -> Any:
    if ctx.global_stats is None:
        raise ValueError(f"scope=global needs ctx.global_stats (merge_ops.global_stats) for {ctx.name!r}")
    return ctx.global_stats
