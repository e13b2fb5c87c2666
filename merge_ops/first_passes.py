"""The streaming passes that run before the merge when a recipe needs whole-model facts: global top-k / σ
statistics (``scope: global``) and LiNeS' automatic α. Each reads every merged tensor once; neither writes."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from kernels import buffers
from merge_ops.errors import MergeCancelled
from merge_ops.preflight import element_size, global_pass_needed, lines_params, numel
from merge_ops.report import Progress
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


def tracked(
    merger: TensorMerger,
    phase: str,
    progress: Callable[[Progress], None] | None,
    should_cancel: Callable[[], bool] | None,
    items: Callable[[], Iterator[tuple[str, torch.Tensor]]] | None = None,
) -> Callable[[], Iterator[tuple[str, torch.Tensor]]]:
    """``merger.iter_task_vectors`` (or another per-tensor pass, ``items``) as a first pass of its own: progress in
    bytes under ``phase``, and a cancel check before every tensor (a first pass reads the whole model, so it must
    stop like the main pass does)."""
    merged = [t for t in merger.plan.tensors if t.action == "merge"]
    sizes = {t.name: numel(t.shape) * element_size(t.in_dtype) * (merger.k + 1) for t in merged}
    total = sum(sizes.values())

    def run() -> Iterator[tuple[str, torch.Tensor]]:
        started, done_bytes = time.perf_counter(), 0
        for done, (name, taus) in enumerate((items or merger.iter_task_vectors)(), start=1):
            if should_cancel is not None and should_cancel():
                raise MergeCancelled("the merge was cancelled")
            yield name, taus
            done_bytes += sizes.get(name, 0)
            if progress is not None:
                elapsed = time.perf_counter() - started
                eta = elapsed / done_bytes * (total - done_bytes) if done_bytes else None
                progress(Progress(done, len(merged), done_bytes, total, eta, phase=phase))

    return run


def run_first_passes(
    merger: TensorMerger,
    progress: Callable[[Progress], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> FirstPasses:
    # each pass is done with a tensor's task vectors before it asks for the next: their buffers can be reused
    with buffers.reuse():
        return _run_first_passes(merger, progress, should_cancel)


def _run_first_passes(
    merger: TensorMerger,
    progress: Callable[[Progress], None] | None,
    should_cancel: Callable[[], bool] | None,
) -> FirstPasses:
    recipe = merger.recipe
    result = FirstPasses()
    if global_pass_needed(recipe):
        from merge_ops.global_stats import compute_global_stats

        t0 = time.perf_counter()
        result.global_stats = compute_global_stats(
            tracked(merger, "global_stats", progress, should_cancel),
            params=recipe.params_for(""),
            densities=merger.densities,
            seed=recipe.seed,
            source_indices=tuple(range(merger.k)),
        )
        result.timings["global_stats_s"] = round(time.perf_counter() - t0, 4)
    lines = lines_params(recipe)
    if lines is not None:
        from merge_ops.lines import lines_scales

        alpha = lines.alpha if lines.alpha is not None else equal_weights_alpha(merger)
        if alpha is None:
            t1 = time.perf_counter()
            alpha = auto_lines_alpha(merger, result.global_stats, progress, should_cancel)
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


def auto_lines_alpha(
    merger: TensorMerger,
    global_stats: Any,
    progress: Callable[[Progress], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> float:
    """LiNeS multi-task α = (‖Σ_t τ_t‖₁ / ‖τ_merged‖₁) / T over the merged tensors (one streaming pass). When the
    merge is a plain weighted sum (``merger.fused_weights``) both norms come from the stored inputs
    (``merger.iter_sum_l1``: no task vectors are built); otherwise the method runs on each tensor's task vectors."""
    from merge_ops.lines import auto_alpha

    sum_l1 = merged_l1 = 0.0
    if merger.fused_weights is not None:
        weights = torch.tensor(merger.fused_weights, dtype=torch.float32)
        for _, norms in tracked(
            merger, "lines_alpha", progress, should_cancel, lambda: merger.iter_sum_l1(weights)
        )():
            plain, weighted = norms.tolist()
            sum_l1, merged_l1 = sum_l1 + plain, merged_l1 + weighted
        return auto_alpha(sum_l1=sum_l1, merged_l1=merged_l1, num_models=merger.k)
    plans = {t.name: t for t in merger.plan.tensors}
    for name, taus in tracked(merger, "lines_alpha", progress, should_cancel)():
        sum_l1 += float(taus.sum(dim=0).abs().sum(dtype=torch.float64))
        ctx = merger.context(name, global_stats)
        merged = merger.method.fn(taus, ctx, merger.params_for(plans[name]))
        merged_l1 += float(merged.abs().sum(dtype=torch.float64))
    return auto_alpha(sum_l1=sum_l1, merged_l1=merged_l1, num_models=merger.k)


def equal_weights_alpha(merger: TensorMerger) -> float | None:
    """LiNeS' automatic α without its pass, when the merge is Σ_t c·τ_t with one weight c ≠ 0 for every model:
    ‖Σ_t τ_t‖₁ / ‖c·Σ_t τ_t‖₁ = 1/|c|, so α = 1/(|c|·T) (the pass computes the same ratio, up to float32
    rounding of the sums; for c = 1 the two sums are the same bits). None otherwise: the pass is needed. A model
    whose task vectors are all zero gets 1/(|c|·T) here and 1/T from the pass; its merged delta is zero either
    way."""
    weights = merger.fused_weights
    if not weights or any(w != weights[0] for w in weights) or weights[0] == 0:
        return None
    return 1.0 / (abs(weights[0]) * len(weights))
