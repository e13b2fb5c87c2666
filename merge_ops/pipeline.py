"""The streaming merge: one tensor at a time from the sources to the output shards.

Per tensor: load the base and K inputs (prefetched by a loader thread while the previous tensor computes, so I/O
and compute overlap), build the task vectors [K, *S] in float32, call the registered method, apply the scale
stage (λ · LiNeS) and cast once. Peak memory is about 2·(K+3) × the largest tensor (two tensors in flight), never
the model size. Output is written into a scratch folder next to the destination and renamed into place only when
the whole merge succeeded. Preflight (headers only) is in ``merge_ops.preflight``.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

import kernels
from merge_ops import __version__
from merge_ops.checkpoint import torch_dtype
from merge_ops.errors import (
    IncompatibleModelsError,
    MergeCancelled,
    NonFiniteTensorError,
    OutputError,
    maps_kernel_errors,
)
from merge_ops.lines import block_map
from merge_ops.params import CATALOG, MethodInfo, StagesParams
from merge_ops.preflight import (
    MergePlan,
    Sources,
    TensorPlan,
    build_plan,
    check_compatible,
    check_output,
    element_size,
    global_pass_needed,
    has_gradients,
    lines_params,
    numel,
    open_sources,
    plan_merge,
)
from merge_ops.recipe import Recipe
from merge_ops.registry import TensorContext, get_method

__all__ = ["MergePlan", "MergeReport", "Progress", "plan_merge", "run_merge"]
REPORT_NAME = "alloy-report.json"


@dataclass(frozen=True)
class Progress:
    tensors_done: int
    tensors_total: int
    bytes_done: int
    bytes_total: int
    eta_s: float | None
    #: "merge", or "evaluate" while greedy soup scores candidates (then the tensor counts are evaluations)
    phase: str = "merge"


class MergeReport(BaseModel):
    alloy_version: str = __version__
    method: str
    recipe_digest: str
    scope: str
    output_path: str | None
    tensors: list[dict[str, Any]]
    totals: dict[str, Any]
    timings: dict[str, float]
    peak_rss_bytes: int
    peak_cuda_bytes: int | None = None
    copied_non_float: list[str]
    lines: dict[str, Any] | None = None
    #: the README.md written beside the shards (the web form renders it)
    model_card: str | None = None
    #: greedy_soup: every ingredient's score, the order tried and the chosen ingredients
    greedy_soup: dict[str, Any] | None = None
    #: what the recipe's source format (mergekit) ignores or coerces: [{loc, msg}]
    warnings: list[dict[str, Any]] = []

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)


# ---------------------------------------------------------------------------------------------------------------
# the merge


@dataclass
class _Loaded:
    """One tensor's inputs as stored (raw dtypes: the loader thread only reads and transfers)."""

    name: str
    base: torch.Tensor
    #: θ_t of each full-checkpoint input whose shape matches the base; None where the task vector comes from
    #: the source itself (LoRA, task-vector files, transfer, vocabulary alignment). None for copies.
    inputs: list[torch.Tensor | None] | None
    load_s: float


class _Engine:
    def __init__(self, recipe: Recipe, sources: Sources, plan: MergePlan, device: torch.device) -> None:
        self.recipe, self.sources, self.plan, self.device = recipe, sources, plan, device
        self.method = get_method(recipe.method)
        self.k = len(sources.inputs)
        self.weights = torch.tensor(sources.weights, dtype=torch.float32, device=device)
        self.scope = recipe.effective_scope()
        self.densities = (
            tuple(m.density or 0.0 for m in recipe.models) if any(m.density for m in recipe.models) else None
        )
        self.side_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.positions = block_map([t.name for t in plan.tensors if t.action == "merge"])
        self._params_cache: dict[tuple[Any, ...], Any] = {}
        self._model_params_cache: dict[tuple[Any, ...], Any] = {}
        self.fused_weights = _fused_weights(recipe, sources)
        # A soup without normalize is Σ w_t·θ_t: task vectors against a zero reference, and no base added.
        info = CATALOG[recipe.method]
        self.zero_reference = info.kind == "soup" and not getattr(
            info.params.model_validate(recipe.params), "normalize", True
        )

    # -- loading (runs in the loader thread) ---------------------------------------------------------
    def load(self, tp: TensorPlan) -> _Loaded:
        """Read the base and the K inputs of one tensor as stored, onto the device (a side stream on CUDA)."""
        start = time.perf_counter()
        with (
            torch.cuda.stream(self.side_stream) if self.side_stream is not None else contextlib.nullcontext()
        ):
            base = self._to_device(self.sources.reference.load(tp.name))
            inputs: list[torch.Tensor | None] | None = None
            if tp.action == "merge":
                inputs = [self._load_input(i, src, tp, base) for i, src in enumerate(self.sources.inputs)]
            if self.side_stream is not None:
                self.side_stream.synchronize()
        return _Loaded(tp.name, base, inputs, time.perf_counter() - start)

    def _load_input(self, index: int, src: Any, tp: TensorPlan, base: torch.Tensor) -> torch.Tensor | None:
        if self.sources.reference_is_input and index == 0:
            return base
        if src.is_delta or tp.name not in src.infos or tuple(src.infos[tp.name].shape) != tuple(base.shape):
            return None
        return self._to_device(src.load(tp.name))

    # -- compute (main thread) -------------------------------------------------------------------------
    def task_vectors(self, loaded: _Loaded, tp: TensorPlan) -> torch.Tensor:
        """[K, *S] float32: θ_t − θ_0 (or the source's own delta), computed in place, one model at a time."""
        assert loaded.inputs is not None
        base = loaded.base
        base_f = torch.zeros_like(base, dtype=torch.float32) if self.zero_reference else base.float()
        taus = torch.empty((self.k, *base.shape), dtype=torch.float32, device=self.device)
        for i, (src, raw) in enumerate(zip(self.sources.inputs, loaded.inputs, strict=True)):
            if self.sources.reference_is_input and i == 0 and not self.zero_reference:
                taus[i].zero_()
            elif raw is not None:
                taus[i].copy_(raw).sub_(base_f)  # convert, then subtract (fast on CPU)
            elif src.sparse_coverage and tp.name not in src.infos:
                taus[i].zero_()
            else:
                taus[i] = self._aligned_task_vector(src, tp.name, base_f)
        return taus

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor

    def _aligned_task_vector(self, src: Any, name: str, base_f: torch.Tensor) -> torch.Tensor:
        shape = tuple(src.infos[name].shape) if name in src.infos else tuple(base_f.shape)
        if shape == tuple(base_f.shape):
            return src.task_vector(name, base_f)
        # vocab_policy (validated in preflight): align the model's rows to the base's
        rows = base_f.shape[0]
        common = min(rows, shape[0])
        full = src.load(name) if not src.is_delta else None
        if full is None:
            raise IncompatibleModelsError(
                f"{name}: {src.label} is a delta source with other rows than the base"
            )
        tau = torch.zeros_like(base_f)
        tau[:common] = self._to_device(full[:common]).float() - base_f[:common]
        if common < rows and self.recipe.vocab_policy == "pad_mean":
            tau[common:] = tau[:common].mean(dim=0, keepdim=True)
        return tau

    def params_for(self, tp: TensorPlan) -> Any:
        """Params of one tensor: name overrides, and gradients interpolated over the block depth (cached)."""
        position = self.positions.get(tp.name)
        override = next(
            (i for i, o in enumerate(self.recipe.overrides) if re.search(o.filter, tp.name)), None
        )
        depth = position.depth if position and has_gradients(self.recipe) else None
        key = (override, depth, position.num_blocks if position and depth is not None else None)
        if key not in self._params_cache:
            self._params_cache[key] = self.recipe.params_for(
                tp.name, layer=depth, num_layers=position.num_blocks if position else None
            )
        return self._params_cache[key]

    def merged_delta(
        self, loaded: _Loaded, tp: TensorPlan, global_stats: Any
    ) -> tuple[torch.Tensor, TensorContext]:
        taus = self.task_vectors(loaded, tp)
        if not all_finite(taus):
            raise self._non_finite(tp.name, loaded, taus)
        params = self.params_for(tp)
        weights, densities, model_params = self.model_params_for(tp, params)
        ctx = TensorContext(
            name=tp.name,
            weights=weights,
            seed=self.recipe.seed,
            source_indices=tuple(range(self.k)),
            scope=self.scope,
            densities=densities,
            global_stats=global_stats,
            model_params=model_params,
            base=loaded.base.float() if self.method.info.needs_base_weights else None,
            reference_is_input=self.sources.reference_is_input,
        )
        delta = self.method.fn(taus, ctx, params)
        return delta, ctx

    def model_params_for(
        self, tp: TensorPlan, params: Any
    ) -> tuple[torch.Tensor, tuple[float, ...] | None, tuple[dict[str, float], ...]]:
        """Per-model weights, densities and params of one tensor (recipe ``models[].params``: numbers,
        gradients over the block depth, filtered lists), cached by their resolved values."""
        if not self.recipe.has_model_params():
            return self.weights, self.densities, ()
        position = self.positions.get(tp.name)
        resolved = self.recipe.model_params_for(
            tp.name,
            layer=position.depth if position else None,
            num_layers=position.num_blocks if position else None,
        )
        default_density = float(getattr(params, "density", 1.0))
        key = (tuple(tuple(sorted(r.items())) for r in resolved), default_density)
        if key not in self._model_params_cache:
            weights = self.weights
            if any("weight" in r for r in resolved):
                base_weights = self.sources.weights
                weights = torch.tensor(
                    [r.get("weight", w) for r, w in zip(resolved, base_weights, strict=True)],
                    dtype=torch.float32,
                    device=self.device,
                )
            densities = self.densities
            if any("density" in r for r in resolved):
                own = self.densities or (default_density,) * self.k
                densities = tuple(r.get("density", d) for r, d in zip(resolved, own, strict=True))
            self._model_params_cache[key] = (weights, densities, resolved)
        return self._model_params_cache[key]

    def fused_output(self, loaded: _Loaded, tp: TensorPlan, scale: float) -> torch.Tensor:
        """base + scale·Σ w_t(θ_t − base) in one pass (kernels.fused_task_arithmetic), cast to the output dtype.
        NaN/Inf in any input reaches the output, so checking the output finds every poisoned input."""
        assert loaded.inputs is not None and self.fused_weights is not None
        inputs = [t for t in loaded.inputs if t is not None]  # the fused path has full checkpoints only
        out = kernels.fused_task_arithmetic(
            loaded.base, inputs, self.fused_weights, scale=scale, out_dtype=torch_dtype(tp.out_dtype)
        )
        if not all_finite(out):
            raise self._non_finite(
                tp.name, loaded, torch.stack([t.float() - loaded.base.float() for t in inputs])
            )
        return out

    def _non_finite(self, name: str, loaded: _Loaded, taus: torch.Tensor) -> NonFiniteTensorError:
        """Name the source(s) holding NaN/Inf in ``name`` (the base poisons every task vector)."""
        if not bool(torch.isfinite(loaded.base.float()).all()):
            culprit = self.sources.reference_label
        else:
            bad = [i for i in range(self.k) if not bool(torch.isfinite(taus[i]).all())]
            culprit = ", ".join(self.sources.labels[i] for i in bad)
        return NonFiniteTensorError(
            f"tensor {name} holds NaN or Inf in {culprit}", tensor=name, source=culprit
        )

    def iter_task_vectors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, [K, *S]) for every merged tensor, for the first passes (global statistics, LiNeS α)."""
        for tp in self.plan.tensors:
            if tp.action == "merge":
                loaded = self.load(tp)
                taus = self.task_vectors(loaded, tp)
                if not all_finite(taus):
                    raise self._non_finite(tp.name, loaded, taus)
                yield tp.name, taus


def _prefetched(engine: _Engine, tensors: list[TensorPlan]) -> Iterator[tuple[TensorPlan, _Loaded]]:
    """Load tensor i+1 in a thread while the caller computes tensor i (torch and safetensors release the GIL)."""
    if not tensors:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="alloy-loader") as pool:
        pending: Future[_Loaded] = pool.submit(engine.load, tensors[0])
        for i, tp in enumerate(tensors):
            loaded = pending.result()
            if i + 1 < len(tensors):
                pending = pool.submit(engine.load, tensors[i + 1])
            yield tp, loaded


@maps_kernel_errors
def run_merge(
    recipe: Recipe,
    *,
    output_dir: Path | None = None,
    resolver: Any = None,
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
    if recipe.method == "greedy_soup":
        from merge_ops.greedy_soup import write_greedy_soup

        return write_greedy_soup(
            recipe,
            output_dir=output_dir,
            resolver=resolver,
            device=device,
            progress=progress,
            should_cancel=should_cancel,
            scratch_root=scratch_root,
            data_root=data_root,
        )
    started = time.perf_counter()
    target = target_dir(recipe, output_dir)
    info = CATALOG[recipe.method]
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OutputError("--device cuda was asked for but no CUDA device is available")
    sources = open_sources(recipe, info, resolver)
    scratch = (scratch_root or target.parent) / f".{target.name}.alloy-tmp-{uuid.uuid4().hex[:12]}"
    try:
        check_compatible(recipe, sources)
        plan = build_plan(recipe, info, sources)
        preflight_s = time.perf_counter() - started
        scratch.mkdir(parents=True)
        report = _merge_into(recipe, info, sources, plan, dev, scratch, progress, should_cancel)
        report.timings["preflight_s"] = round(preflight_s, 4)
        report.timings["total_s"] = round(time.perf_counter() - started, 4)
        report.output_path = str(target.resolve())
        (scratch / REPORT_NAME).write_text(report.to_json())
        _fsync_dir(scratch)
        if target.exists():
            target.rmdir()  # empty (checked above)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(scratch, target)
        return report
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    finally:
        sources.close()


def target_dir(recipe: Recipe, output_dir: Path | None) -> Path:
    target = Path(output_dir or recipe.output.path or "")
    if str(target) in {"", "."}:
        raise OutputError("no output folder: set output.path in the recipe or pass --out")
    check_output(target)
    return target


def _merge_into(
    recipe: Recipe,
    info: MethodInfo,
    sources: Sources,
    plan: MergePlan,
    dev: torch.device,
    scratch: Path,
    progress: Callable[[Progress], None] | None,
    should_cancel: Callable[[], bool] | None,
) -> MergeReport:
    from merge_ops.lines import lines_scales
    from merge_ops.modelcard import read_front_matter, write_model_card
    from merge_ops.writer import ShardedWriter, copy_side_files, set_config_dtype

    engine = _Engine(recipe, sources, plan, dev)
    timings: dict[str, float] = {}
    global_stats = None
    t0 = time.perf_counter()
    if global_pass_needed(recipe):
        from merge_ops.global_stats import compute_global_stats

        global_stats = compute_global_stats(
            engine.iter_task_vectors,
            params=recipe.params_for(""),
            densities=engine.densities,
            seed=recipe.seed,
            source_indices=tuple(range(engine.k)),
        )
        timings["global_stats_s"] = round(time.perf_counter() - t0, 4)

    lines = lines_params(recipe)
    lines_info: dict[str, Any] | None = None
    scales: dict[str, float] = {}
    if lines is not None:
        alpha = lines.alpha
        if alpha is None:
            t1 = time.perf_counter()
            alpha = _auto_lines_alpha(engine, global_stats)
            timings["lines_alpha_s"] = round(time.perf_counter() - t1, 4)
        merged_names = [t.name for t in plan.tensors if t.action == "merge"]
        scales = lines_scales(merged_names, alpha=alpha, beta=lines.beta, head_scale=lines.head_scale)
        lines_info = {
            "alpha": alpha,
            "beta": lines.beta,
            "head_scale": lines.head_scale,
            "alpha_auto": lines.alpha is None,
        }

    writer_plan = [(t.name, torch_dtype(t.out_dtype), tuple(t.shape)) for t in plan.tensors]
    metadata = {
        "format": "pt",
        "alloy_version": __version__,
        "alloy_method": recipe.method,
        "alloy_recipe_sha256": recipe.digest(),
    }
    if recipe.vocab_policy != "error":
        metadata["alloy_vocab_policy"] = recipe.vocab_policy
    writer = ShardedWriter(
        scratch, plan=writer_plan, shard_size=int(recipe.output.shard_size), metadata=metadata
    )
    rows: list[dict[str, Any]] = []
    copied_non_float: list[str] = []
    total = len(plan.tensors)
    bytes_done = 0
    bytes_total = sum(
        numel(t.shape) * element_size(t.in_dtype) * (1 if t.action == "copy" else engine.k + 1)
        for t in plan.tensors
    )
    t_merge = time.perf_counter()
    load_s = compute_s = 0.0
    try:
        for done, (tp, loaded) in enumerate(_prefetched(engine, plan.tensors), start=1):
            if should_cancel is not None and should_cancel():
                raise MergeCancelled("the merge was cancelled")
            load_s += loaded.load_s
            c0 = time.perf_counter()
            row: dict[str, Any] = {"name": tp.name, "action": tp.action, "shape": tp.shape, "layer": tp.layer}
            if (position := engine.positions.get(tp.name)) is not None:
                row.update(stack=position.stack, depth=position.depth, num_blocks=position.num_blocks)
            if tp.action == "copy":
                writer.write(tp.name, loaded.base.cpu())
                row["reason"] = tp.reason
                if tp.reason == "not a floating tensor":
                    copied_non_float.append(tp.name)
            else:
                scale = float(getattr(engine.params_for(tp), "lambda_", 1.0)) * scales.get(tp.name, 1.0)
                row["scale"] = scale
                if engine.fused_weights is not None:
                    out = engine.fused_output(loaded, tp, scale)
                else:
                    delta, ctx = engine.merged_delta(loaded, tp, global_stats)
                    start = torch.zeros_like(delta) if engine.zero_reference else loaded.base.float()
                    out = start.add_(delta, alpha=scale) if scale != 0 else start
                    if not all_finite(out):
                        raise NonFiniteTensorError(f"merging {tp.name} overflowed to NaN/Inf", tensor=tp.name)
                    out = out.to(torch_dtype(tp.out_dtype))
                    row.update({k: round(float(v), 6) for k, v in ctx.report.items()})
                writer.write(tp.name, out.cpu())
                if tp.name in scales:
                    row["lines_scale"] = scales[tp.name]
            compute_s += time.perf_counter() - c0
            rows.append(row)
            bytes_done += (
                numel(tp.shape) * element_size(tp.in_dtype) * (1 if tp.action == "copy" else engine.k + 1)
            )
            if progress is not None:
                elapsed = time.perf_counter() - t_merge
                eta = elapsed / bytes_done * (bytes_total - bytes_done) if bytes_done else None
                progress(Progress(done, total, bytes_done, bytes_total, eta))
        files = writer.close()
    except BaseException:
        with contextlib.suppress(Exception):
            writer.abort()
        raise
    timings.update(
        {
            "merge_s": round(time.perf_counter() - t_merge, 4),
            "load_s": round(load_s, 4),
            "compute_write_s": round(compute_s, 4),
        }
    )
    side = copy_side_files(sources.side_files_from, scratch) if sources.side_files_from else []
    if recipe.dtype is not None and "config.json" in side:
        set_config_dtype(scratch, recipe.dtype)
    report = MergeReport(
        method=recipe.method,
        recipe_digest=recipe.digest(),
        scope=plan.scope,
        output_path=None,
        tensors=rows,
        totals=_totals(rows, plan, files, side),
        timings=timings,
        peak_rss_bytes=_peak_rss(),
        peak_cuda_bytes=torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None,
        copied_non_float=copied_non_float,
        lines=lines_info,
        warnings=[w.model_dump() for w in recipe.warnings],
    )
    base_card = read_front_matter(sources.side_files_from / "README.md") if sources.side_files_from else None
    lineage = [sources.reference_label] if recipe.base or info.kind == "transfer" else sources.labels
    card = write_model_card(scratch, recipe=recipe, report=report, base_models=lineage, base_card=base_card)
    report.model_card = card.read_text(encoding="utf-8")
    return report


def _auto_lines_alpha(engine: _Engine, global_stats: Any) -> float:
    """LiNeS multi-task α = (‖Σ_t τ_t‖₁ / ‖τ_merged‖₁) / T over the merged tensors (one streaming pass)."""
    sum_l1 = merged_l1 = 0.0
    plans = {t.name: t for t in engine.plan.tensors}
    for name, taus in engine.iter_task_vectors():
        sum_l1 += float(taus.sum(dim=0).abs().sum(dtype=torch.float64))
        ctx = TensorContext(
            name=name,
            weights=engine.weights,
            seed=engine.recipe.seed,
            source_indices=tuple(range(engine.k)),
            scope=engine.scope,
            densities=engine.densities,
            global_stats=global_stats,
        )
        merged_l1 += float(
            engine.method.fn(taus, ctx, engine.params_for(plans[name])).abs().sum(dtype=torch.float64)
        )
    from merge_ops.lines import auto_alpha

    return auto_alpha(sum_l1=sum_l1, merged_l1=merged_l1, num_models=engine.k)


def all_finite(tensor: torch.Tensor) -> bool:
    """True when no element is NaN/Inf. One reduction (a sum is non-finite iff an element is, or the sum
    overflows); only then the exact elementwise check, so the common case costs one read and no bool tensor."""
    if bool(torch.isfinite(tensor.sum(dtype=torch.float32))):
        return True
    return bool(torch.isfinite(tensor).all())


def _fused_weights(recipe: Recipe, sources: Sources) -> list[float] | None:
    """Weights for the one-pass path, when the merge is a plain weighted sum of full checkpoints: soups, task
    arithmetic, LiNeS, and ``stages`` without sparsify/consensus. None when the generic path is needed."""
    full_inputs = all(s.kind == "checkpoint" and not s.sparse_coverage for s in sources.inputs)
    if (
        not full_inputs
        or recipe.vocab_policy != "error"
        or recipe.overrides
        or has_gradients(recipe)
        or recipe.has_model_params()
    ):
        return None
    info = CATALOG[recipe.method]
    params = info.params.model_validate(recipe.params)
    weights = list(sources.weights)
    if info.kind == "soup":
        total = sum(weights)
        normalized = getattr(params, "normalize", True)
        return [w / total for w in weights] if normalized and total != 0 else None
    if recipe.method == "lines" or (
        isinstance(params, StagesParams)
        and params.sparsify == "none"
        and params.consensus == "none"
        and params.aggregate == "sum"
    ):
        return weights
    return None


def _totals(
    rows: list[dict[str, Any]], plan: MergePlan, files: list[Path], side: list[str]
) -> dict[str, Any]:
    merged = [r for r in rows if r["action"] == "merge"]
    totals: dict[str, Any] = {
        "tensors": len(rows),
        "merged": len(merged),
        "copied": len(rows) - len(merged),
        "bytes_read": plan.bytes_read,
        "bytes_written": plan.bytes_written,
        "shards": [f.name for f in files],
        "side_files": side,
    }
    weights = {r["name"]: numel(r["shape"]) for r in merged}
    for key in ("kept_density", "sign_conflict_rate"):
        values = [(r[key], weights[r["name"]]) for r in merged if key in r]
        if values:
            totals[key] = round(sum(v * w for v, w in values) / max(1, sum(w for _, w in values)), 6)
    return totals


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _fsync_dir(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
