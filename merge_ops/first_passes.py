"""The streaming passes that run before the merge when a recipe needs whole-model facts: global top-k / σ
statistics (``scope: global``) and LiNeS' automatic α. Each reads every merged tensor once; neither writes."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from merge_ops.preflight import global_pass_needed, lines_params
from merge_ops.tensor_merge import TensorMerger


@dataclass
class FirstPasses:
    #: ``merge_ops.global_stats`` statistics for ``scope: global``, else None
    global_stats: Any = None
    #: LiNeS scale per merged tensor (empty without LiNeS)
    scales: dict[str, float] = field(default_factory=dict)
    #: the report's ``lines`` entry
    lines_info: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)


def run_first_passes(merger: TensorMerger) -> FirstPasses:
    recipe = merger.recipe
    result = FirstPasses()
    if global_pass_needed(recipe):
        from merge_ops.global_stats import compute_global_stats

        t0 = time.perf_counter()
        result.global_stats = compute_global_stats(
            merger.iter_task_vectors,
            params=recipe.params_for(""),
            densities=merger.densities,
            seed=recipe.seed,
            source_indices=tuple(range(merger.k)),
        )
        result.timings["global_stats_s"] = round(time.perf_counter() - t0, 4)
    lines = lines_params(recipe)
    if lines is not None:
        from merge_ops.lines import lines_scales

        alpha = lines.alpha
        if alpha is None:
            t1 = time.perf_counter()
            alpha = auto_lines_alpha(merger, result.global_stats)
            result.timings["lines_alpha_s"] = round(time.perf_counter() - t1, 4)
        merged_names = [t.name for t in merger.plan.tensors if t.action == "merge"]
        result.scales = lines_scales(merged_names, alpha=alpha, beta=lines.beta, head_scale=lines.head_scale)
        result.lines_info = {
            "alpha": alpha,
            "beta": lines.beta,
            "head_scale": lines.head_scale,
            "alpha_auto": lines.alpha is None,
        }
    return result


def auto_lines_alpha(merger: TensorMerger, global_stats: Any) -> float:
    """LiNeS multi-task α = (‖Σ_t τ_t‖₁ / ‖τ_merged‖₁) / T over the merged tensors (one streaming pass)."""
    from merge_ops.lines import auto_alpha

    sum_l1 = merged_l1 = 0.0
    plans = {t.name: t for t in merger.plan.tensors}
    for name, taus in merger.iter_task_vectors():
        sum_l1 += float(taus.sum(dim=0).abs().sum(dtype=torch.float64))
        ctx = merger.context(name, global_stats)
        merged = merger.method.fn(taus, ctx, merger.params_for(plans[name]))
        merged_l1 += float(merged.abs().sum(dtype=torch.float64))
    return auto_alpha(sum_l1=sum_l1, merged_l1=merged_l1, num_models=merger.k)
