"""The sparsify stage: each task vector τ_t -> τ̂_t, per scope unit (see ``_scope``). Pure float32 math.

- ``magnitude``: keep exactly ⌊density·n⌋ (≥ 1) largest |τ|, ties by lowest flat index (``kernels.topk_mask``).
- ``dare``: counter-based Bernoulli(density) keep mask keyed by (seed, source index, tensor name), then rescale
  ``inverse`` (÷density), ``l1`` (× ‖τ‖₁/‖kept‖₁ per scope unit, skipped when either is < 1e-7, as mergekit) or
  ``none``. density 1 returns τ unchanged, exactly.
- ``breadcrumbs``: drop the ⌊top_removed·n⌋ largest, keep the next ⌊density·n⌋ (≥ 1, capped by what is left);
  ⌊top_removed·n⌋ = 0 removes nothing (mergekit ≤ 0.1.4 zeroes the tensor there: a bug not copied).
  0-dim tensors pass unchanged (under ``scope=global`` they still count in the ranking).
- ``compeft``: magnitude top-k, then every kept entry becomes ±α·σ, σ the unbiased std of the uncompressed τ in
  the scope unit. A unit with fewer than 2 elements (0-dim tensors, per-tensor scope) has no unbiased std and
  passes unchanged. Under ``scope=global`` σ and the top-k are the model's (``ctx.global_stats``).
"""

from __future__ import annotations

from typing import Any

import torch

from kernels import dare_keep_mask, ternarize, topk_mask
from merge_ops.methods._scope import ScopeView, floor_count, kept_count, scope_view
from merge_ops.params import Scope, Sparsify
from merge_ops.registry import TensorContext

_L1_EPS = 1e-7  # mergekit rescaled_masked_tensor eps
_CHUNK_ELEMENTS = 1 << 22  # rows selected together: at least one row, about 4M elements


def row_densities(view: ScopeView, ctx: TensorContext, params: Any) -> torch.Tensor:
    """float64 [R]: each row's density (per-model densities from the recipe, else params.density)."""
    if ctx.densities is not None:
        per_model = torch.tensor(ctx.densities, dtype=torch.float64)
    else:
        per_model = torch.full((view.shape[0],), float(params.density), dtype=torch.float64)
    return per_model[view.model_of_row.cpu()]


def sparsify(task_vectors: torch.Tensor, ctx: TensorContext, params: Any) -> torch.Tensor:
    """τ̂ [K, *S] float32 for ``params.sparsify`` in ``ctx.scope``."""
    kind = Sparsify(params.sparsify)
    tv = task_vectors.float()
    if kind == Sparsify.none:
        return tv
    if kind == Sparsify.dare:
        return _dare(tv, ctx, params)
    if tv.dim() == 1 and (
        kind == Sparsify.breadcrumbs or (kind == Sparsify.compeft and ctx.scope != Scope.global_)
    ):
        return tv  # 0-dim tensors (stacked as [K]): Breadcrumbs keeps them; ComPEFT has no std of one value
    view = scope_view(tv, ctx.scope)
    if ctx.scope == Scope.global_:
        mask = _global_stats(ctx).selection_mask(ctx.name, view.rows)
        if kind == Sparsify.compeft:
            return view.restore(ternarize(view.rows, mask, _sigma(view, ctx) * float(params.alpha)))
        return view.restore(torch.where(mask, view.rows, 0.0))
    keep, skip = _local_counts(view, ctx, params, kind)
    scale = _sigma(view, ctx) * float(params.alpha) if kind == Sparsify.compeft else None
    out = torch.empty_like(view.rows)
    # Rows are independent units: select them a chunk at a time, so the selection's temporaries (magnitudes,
    # masks) are the size of one chunk, not of the whole [K, n] stack.
    step = max(1, _CHUNK_ELEMENTS // max(1, view.n))
    for start in range(0, view.rows.shape[0], step):
        rows = view.rows[start : start + step]
        mask = topk_mask(
            rows, keep=keep[start : start + step], skip=None if skip is None else skip[start : start + step]
        )
        if scale is not None:
            out[start : start + step] = ternarize(rows, mask, scale[start : start + step])
        else:
            out[start : start + step] = torch.where(mask, rows, 0.0)
    return view.restore(out)


def _local_counts(
    view: ScopeView, ctx: TensorContext, params: Any, kind: Sparsify
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per row: how many to keep, and (Breadcrumbs) how many of the largest to skip first."""
    density = row_densities(view, ctx, params)
    keep = kept_count(density, view.n)
    if kind != Sparsify.breadcrumbs:
        return keep, None
    skip = floor_count(torch.full_like(density, float(params.top_removed)), view.n)
    return torch.minimum(keep, view.n - skip), skip


def _sigma(view: ScopeView, ctx: TensorContext) -> torch.Tensor:
    if ctx.scope == Scope.global_:
        per_model = torch.tensor(_global_stats(ctx).sigma, dtype=torch.float32)
        return per_model[view.model_of_row.cpu()].to(view.rows.device)
    if view.n < 2:
        # only reachable per_row with one column: such rows stay unchanged (ternarize with σ = |x| keeps |x|)
        return view.rows.abs().reshape(-1)
    return view.rows.to(torch.float64).std(dim=1, correction=1).to(torch.float32)


def _dare(tv: torch.Tensor, ctx: TensorContext, params: Any) -> torch.Tensor:
    k = tv.shape[0]
    densities = ctx.densities if ctx.densities is not None else (float(params.density),) * k
    out = torch.empty_like(tv)
    for i in range(k):
        density = float(densities[i])
        if density >= 1.0:
            out[i] = tv[i]  # the identity, exactly (no ÷1.0, no l1 ratio)
            continue
        keep = dare_keep_mask(
            tv.shape[1:],
            density=density,
            seed=ctx.seed,
            source_index=ctx.source_indices[i],
            name=ctx.name,
            device=tv.device,
        )
        out[i] = torch.where(keep, tv[i], 0.0)
        if params.rescale == "inverse":
            out[i] /= density
        elif params.rescale == "l1":
            out[i] = _l1_rescale(tv[i], out[i], ctx, i)
    return out


def _l1_rescale(original: torch.Tensor, kept: torch.Tensor, ctx: TensorContext, model: int) -> torch.Tensor:
    """Match the L1 norm of the scope unit (mergekit's per-tensor ``rescale``)."""
    if ctx.scope == Scope.global_:
        stats = _global_stats(ctx)
        if stats.dare_kept_l1 is None:
            raise ValueError("global DARE l1 rescale needs global stats computed with rescale='l1'")
        before, after = stats.l1[model], stats.dare_kept_l1[model]
        return kept * (before / after) if before >= _L1_EPS and after >= _L1_EPS else kept
    scope = ctx.scope if original.dim() >= 2 else Scope.per_tensor
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
