"""The streaming merge: one tensor at a time from the sources to the output shards.

The hops, a module each: ``merge_ops.preflight`` (headers only: the plan), ``merge_ops.first_passes`` (whole-model
statistics when the recipe needs them), ``merge_ops.tensor_merge`` (one tensor: load, task vectors, method, cast,
check), ``merge_ops.writer`` (shards), ``merge_ops.report`` (the job report); this module runs them in order.
The next tensor is read in a loader thread while the current one computes. Peak memory is about 2·(K+3) × the
largest tensor (two tensors in flight), never the model size. Output is written into a scratch folder next to the
destination and renamed into place only when the whole merge succeeded.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kernels import buffers
from merge_ops import __version__
from merge_ops.checkpoint import torch_dtype
from merge_ops.errors import MergeCancelled, OutputError, maps_kernel_errors
from merge_ops.params import CATALOG, MethodInfo
from merge_ops.preflight import (
    MergePlan,
    TensorPlan,
    build_plan,
    check_compatible,
    check_output,
    element_size,
    numel,
    plan_merge,
)
from merge_ops.recipe import Recipe
from merge_ops.report import (
    REPORT_NAME,
    Chosen,
    MergeReport,
    Progress,
    WholeModelRun,
    merge_totals,
    peak_rss_bytes,
)
from merge_ops.scratch import new_scratch, remove_abandoned
from merge_ops.sources import SourceResolver, Sources, open_sources

if TYPE_CHECKING:
    from merge_ops.tensor_merge import TensorMerger

__all__ = ["REPORT_NAME", "MergePlan", "MergeReport", "Progress", "plan_merge", "run_merge"]


@maps_kernel_errors
def run_merge(
    recipe: Recipe,
    *,
    output_dir: Path | None = None,
    resolver: SourceResolver | None = None,
    device: str = "cpu",
    progress: Callable[[Progress], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    scratch_root: Path | None = None,
    data_root: Path | None = None,
) -> MergeReport:
    """Merge per ``recipe`` into ``output_dir`` (default: ``recipe.output.path``); returns the job report.

    Raises typed ``MergeError``s; on any failure (or ``should_cancel()`` turning true between tensors) the scratch
    folder is removed and nothing is left at ``output_dir``.
    """
    started = time.perf_counter()
    target = target_dir(recipe, output_dir)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OutputError("--device cuda was asked for but no CUDA device is available")
    chosen = _choose_first(recipe, WholeModelRun(resolver, device, data_root, progress, should_cancel))
    streamed: Recipe = chosen.streamed
    info = CATALOG[streamed.method]
    sources = open_sources(streamed, info, resolver)
    scratch_parent = scratch_root or target.parent
    remove_abandoned(scratch_parent, target.name)  # what killed merges into this output left
    scratch = new_scratch(scratch_parent, target.name)
    try:
        check_compatible(streamed, sources)
        plan = build_plan(streamed, info, sources)
        preflight_s = time.perf_counter() - started - sum(chosen.timings.values())
        scratch.mkdir(parents=True)
        report = _merge_into(recipe, chosen, info, sources, plan, dev, scratch, progress, should_cancel)
        report.timings["preflight_s"] = round(preflight_s, 4)
        report.timings["total_s"] = round(time.perf_counter() - started, 4)
        report.output_path = str(target.resolve())
        (scratch / REPORT_NAME).write_text(report.to_json())
        _fsync_dir(scratch)
        _move_into_place(scratch, target)
        return report
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    finally:
        sources.close()


def _move_into_place(scratch: Path, target: Path) -> None:
    """Rename the finished merge onto ``target`` (empty or missing when the merge started; filled meanwhile by
    someone else, it is the user's to sort out, not an internal error)."""
    try:
        if target.exists():
            target.rmdir()  # empty (checked at the start)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(scratch, target)
    except OSError as exc:
        raise OutputError(
            f"cannot move the merge into {target}: {exc.strerror or exc} (was the folder filled while the merge "
            "ran?); choose an empty or new output folder",
            path=str(target),
        ) from None


def _choose_first(recipe: Recipe, run: WholeModelRun) -> Chosen:
    """A method that must hold whole models decides what to stream before the merge starts (greedy soup's
    ingredients, aTLAS' coefficients), so the card, digest and report are the recipe's before the rename. The
    streaming methods stream the recipe itself."""
    if recipe.method == "greedy_soup":
        from merge_ops.greedy_soup import choose_soup

        return choose_soup(recipe, run)
    if recipe.method == "atlas" and recipe.params.get("coefficients") is None:
        from merge_ops.atlas import learn_atlas

        return learn_atlas(recipe, run)
    return Chosen(streamed=recipe, sections={}, timings={})


def target_dir(recipe: Recipe, output_dir: Path | None) -> Path:
    target = Path(output_dir or recipe.output.path or "")
    if str(target) in {"", "."}:
        raise OutputError("no output folder: set output.path in the recipe or pass --out")
    check_output(target)
    return target


def _merge_into(
    recipe: Recipe,
    chosen: Chosen,
    info: MethodInfo,
    sources: Sources,
    plan: MergePlan,
    dev: torch.device,
    scratch: Path,
    progress: Callable[[Progress], None] | None,
    should_cancel: Callable[[], bool] | None,
) -> MergeReport:
    from merge_ops.first_passes import run_first_passes
    from merge_ops.tensor_merge import TensorMerger

    merger = TensorMerger(chosen.streamed, sources, plan, dev)
    passes = run_first_passes(merger, progress, should_cancel)
    rows, files, timings = _merge_tensors(
        recipe, merger, passes.scales, passes.global_stats, scratch, progress, should_cancel
    )
    report = MergeReport(
        method=recipe.method,
        recipe_digest=recipe.digest(),
        scope=plan.scope,
        output_path=None,
        tensors=rows,
        totals={},
        timings={**chosen.timings, **passes.timings, **timings},
        peak_rss_bytes=0,
        copied_non_float=[r["name"] for r in rows if r.get("reason") == "not a floating tensor"],
        lines=passes.lines_info,
        warnings=[w.model_dump() for w in recipe.warnings],
        **chosen.sections,
    )
    _finish_report(report, recipe, info, sources, plan, files, scratch, dev)
    return report


def _merge_tensors(
    recipe: Recipe,
    merger: TensorMerger,
    scales: dict[str, float],
    global_stats: Any,
    scratch: Path,
    progress: Callable[[Progress], None] | None,
    should_cancel: Callable[[], bool] | None,
) -> tuple[list[dict[str, Any]], list[Path], dict[str, float]]:
    """The main pass: every tensor of the plan merged (or copied) and written in plan order; the shards'
    metadata name ``recipe`` (the recipe asked for, not the one streamed for it)."""
    from merge_ops.tensor_merge import prefetched
    from merge_ops.writer import ShardedWriter, WriteBehind

    plan, k = merger.plan, merger.k
    metadata = {
        "format": "pt",
        "alloy_version": __version__,
        "alloy_method": recipe.method,
        "alloy_recipe_sha256": recipe.digest(),
    }
    if recipe.vocab_policy != "error":
        metadata["alloy_vocab_policy"] = recipe.vocab_policy
    writer = WriteBehind(
        ShardedWriter(
            scratch,
            plan=[(t.name, torch_dtype(t.out_dtype), tuple(t.shape)) for t in plan.tensors],
            shard_size=int(recipe.output.shard_size),
            metadata=metadata,
        )
    )

    def bytes_of(tp: TensorPlan) -> int:
        return numel(tp.shape) * element_size(tp.in_dtype) * (1 if tp.action == "copy" else k + 1)

    rows: list[dict[str, Any]] = []
    total = len(plan.tensors)
    bytes_done = 0
    bytes_total = sum(bytes_of(t) for t in plan.tensors)
    t_merge = time.perf_counter()
    load_s = compute_s = 0.0
    try:
        # the passes' buffers are reused from tensor to tensor; each output is written while the next tensor
        # computes, until that tensor asks for the buffer the output is in (``buffers.lend``)
        with buffers.reuse():
            for done, (tp, loaded) in enumerate(prefetched(merger, plan.tensors), start=1):
                if should_cancel is not None and should_cancel():
                    raise MergeCancelled("the merge was cancelled")
                load_s += loaded.load_s
                c0 = time.perf_counter()
                row: dict[str, Any] = {
                    "name": tp.name,
                    "action": tp.action,
                    "shape": tp.shape,
                    "layer": tp.layer,
                }
                if (position := merger.positions.get(tp.name)) is not None:
                    row.update(stack=position.stack, depth=position.depth, num_blocks=position.num_blocks)
                if tp.action == "copy":
                    writer.write(tp.name, loaded.base.cpu())
                    row["reason"] = tp.reason
                else:
                    scale = float(getattr(merger.params_for(tp), "lambda_", 1.0)) * scales.get(tp.name, 1.0)
                    row["scale"] = scale
                    out, stats = merger.merge(loaded, tp, scale, global_stats)
                    row.update(stats)
                    out = out.cpu()
                    buffers.lend(out, writer.write(tp.name, out))
                    if tp.name in scales:
                        row["lines_scale"] = scales[tp.name]
                compute_s += time.perf_counter() - c0
                rows.append(row)
                bytes_done += bytes_of(tp)
                if progress is not None:
                    elapsed = time.perf_counter() - t_merge
                    eta = elapsed / bytes_done * (bytes_total - bytes_done) if bytes_done else None
                    progress(Progress(done, total, bytes_done, bytes_total, eta))
        files = writer.close()
    except BaseException:
        with contextlib.suppress(Exception):
            writer.abort()
        raise
    timings = {
        "merge_s": round(time.perf_counter() - t_merge, 4),
        "load_s": round(load_s, 4),
        "compute_write_s": round(compute_s, 4),
    }
    return rows, files, timings


def _finish_report(
    report: MergeReport,
    recipe: Recipe,
    info: MethodInfo,
    sources: Sources,
    plan: MergePlan,
    files: list[Path],
    scratch: Path,
    dev: torch.device,
) -> None:
    """Totals, peak memory, side files and the model card (written into ``scratch``, its text in the report)."""
    from merge_ops.modelcard import read_front_matter, write_model_card
    from merge_ops.structured_sources import finish_side_files
    from merge_ops.writer import copy_side_files, set_config_dtype

    side = copy_side_files(sources.side_files_from, scratch) if sources.side_files_from else []
    if recipe.dtype is not None and "config.json" in side:
        set_config_dtype(scratch, recipe.dtype)
    side += [f for f in finish_side_files(recipe, sources, scratch) if f not in side]  # slices, tokenizer
    report.totals = merge_totals(report.tensors, plan, files, side)
    report.peak_rss_bytes = peak_rss_bytes()
    report.peak_cuda_bytes = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
    base_card = read_front_matter(sources.side_files_from / "README.md") if sources.side_files_from else None
    lineage = [sources.reference_label] if recipe.base or info.kind == "transfer" else sources.labels
    card = write_model_card(scratch, recipe=recipe, report=report, base_models=lineage, base_card=base_card)
    report.model_card = card.read_text(encoding="utf-8")


def _fsync_dir(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
