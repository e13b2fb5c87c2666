"""Merging one tensor: load its K+1 inputs, build the task vectors, call the method, add to the base, cast, check.

Two paths. A plain weighted sum of full checkpoints (soups, task arithmetic, LiNeS, ``stages`` with no sparsify or
consensus) runs as one ``kernels.fused_task_arithmetic`` pass (on CPU the cache-blocked twin in
``kernels.cpu_fused``). Everything else builds the task vectors [K, *S] in float32, calls the registered method
with the one ``TensorContext`` built here (``TensorMerger.context``), adds λ·LiNeS·delta to θ_0 and casts once.
Either way the finiteness check runs on the tensor that will be written, after the cast to the output dtype (an
fp16 overflow is Inf only after the cast), and a failure names the source that holds the NaN/Inf, or says the
merge overflowed the output dtype when no input does.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

import kernels
from kernels import buffers
from merge_ops import patterns
from merge_ops.checkpoint import release_pages, torch_dtype
from merge_ops.errors import IncompatibleModelsError, NonFiniteTensorError
from merge_ops.lines import block_map
from merge_ops.params import CATALOG, StagesParams
from merge_ops.preflight import MergePlan, TensorPlan, has_gradients
from merge_ops.recipe import Recipe
from merge_ops.registry import TensorContext, get_method
from merge_ops.slices import gradient_positions
from merge_ops.sources import Sources
from merge_ops.task_vector_stats import GRAM_KEY


@dataclass
class Loaded:
    """One tensor's inputs as stored (raw dtypes: the loader thread only reads and transfers)."""

    name: str
    base: torch.Tensor
    #: θ_t of each full-checkpoint input whose shape matches the base; None where the task vector comes from
    #: the source itself (LoRA, task-vector files, transfer, vocabulary alignment). None for copies.
    inputs: list[torch.Tensor | None] | None
    load_s: float


class TensorMerger:
    """Everything a merge needs per tensor, fixed for the whole merge: the method, weights, scope, params cache."""

    def __init__(self, recipe: Recipe, sources: Sources, plan: MergePlan, device: torch.device) -> None:
        self.recipe, self.sources, self.plan, self.device = recipe, sources, plan, device
        self.method = get_method(recipe.method)
        self.k = len(sources.inputs)
        self.weights = torch.tensor(sources.weights, dtype=torch.float32, device=device)
        self.scope = recipe.effective_scope()
        #: each model's own ``density`` field (None: the tensor's method-level density applies)
        self.own_densities = tuple(m.density for m in recipe.models)
        #: per-model densities with the recipe-level fallback (the global first pass); per tensor: ``context``
        self.densities = (
            self.densities_with(getattr(recipe.params_for(""), "density", None))
            if any(d is not None for d in self.own_densities)
            else None
        )
        self.side_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        merged = [t.name for t in plan.tensors if t.action == "merge"]
        # gradients run over each slice's own layers in a sliced recipe (merge_ops.slices)
        self.positions = gradient_positions(recipe, merged) or block_map(merged)
        self._params_cache: dict[tuple[Any, ...], Any] = {}
        self._model_params_cache: dict[tuple[Any, ...], Any] = {}
        self._plans = {t.name: t for t in plan.tensors}
        self.fused_weights = fused_weights(recipe, sources)
        # A soup without normalize is Σ w_t·θ_t, and sparse_soup needs exact zeros: task vectors against a zero
        # reference, and no base added.
        info = CATALOG[recipe.method]
        if info.reads_weights and (delta := next((s for s in sources.inputs if s.is_delta), None)):
            raise IncompatibleModelsError(
                f"{recipe.method} averages full weights; {delta.label} is a {delta.kind}", source=delta.label
            )
        self.zero_reference = info.reads_weights or (
            info.kind == "soup" and not getattr(info.params.model_validate(recipe.params), "normalize", True)
        )

    # -- loading (runs in the loader thread) ---------------------------------------------------------
    def load(self, tp: TensorPlan) -> Loaded:
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
        return Loaded(tp.name, base, inputs, time.perf_counter() - start)

    def _load_input(self, index: int, src: Any, tp: TensorPlan, base: torch.Tensor) -> torch.Tensor | None:
        if self.sources.reference_is_input and index == 0:
            return base
        if src.is_delta or tp.name not in src.infos or tuple(src.infos[tp.name].shape) != tuple(base.shape):
            return None
        return self._to_device(src.load(tp.name))

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor

    # -- compute (main thread) -------------------------------------------------------------------------
    def finite_task_vectors(
        self, loaded: Loaded, tp: TensorPlan, gram: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``task_vectors``, checked: a NaN or ±Inf in any of them raises ``NonFiniteTensorError`` naming its
        source (tested in the same pass where every input is a full checkpoint)."""
        raws = self._full_inputs(loaded)
        if raws is not None:
            taus, bad = kernels.checked_task_vectors(loaded.base, raws, gram=gram)
            finite = int(bad) == 0
        else:
            taus = self.task_vectors(loaded, tp, gram)
            finite = all_finite(taus)
        if not finite:
            raise self._non_finite(tp.name, loaded, taus)
        return taus

    def _full_inputs(self, loaded: Loaded) -> list[torch.Tensor] | None:
        """The K stored inputs when every one is a full checkpoint of the base's shape (the one-pass path from
        stored tensors), else None."""
        raws = [raw for raw in loaded.inputs or () if raw is not None]
        full = len(raws) == self.k and not self.zero_reference and not self.sources.reference_is_input
        return raws if full else None

    def task_vectors(self, loaded: Loaded, tp: TensorPlan, gram: torch.Tensor | None = None) -> torch.Tensor:
        """[K, *S] float32: θ_t − θ_0 (or the source's own delta), computed in place, one model at a time.
        ``gram`` gains the task vectors' Gram matrix (in the same pass where every input is a full checkpoint)."""
        assert loaded.inputs is not None
        base = loaded.base
        raws = self._full_inputs(loaded)
        if raws is not None:
            return kernels.task_vectors(base, raws, gram=gram)  # every input a full checkpoint: one pass
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
        if gram is not None:
            gram += kernels.task_vector_gram(taus)
        return taus

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
            (i for i, o in enumerate(self.recipe.overrides) if patterns.search(o.filter, tp.name)), None
        )
        depth = position.depth if position and has_gradients(self.recipe) else None
        key = (override, depth, position.num_blocks if position and depth is not None else None)
        if key not in self._params_cache:
            self._params_cache[key] = self.recipe.params_for(
                tp.name, layer=depth, num_layers=position.num_blocks if position else None
            )
        return self._params_cache[key]

    def context(self, name: str, global_stats: Any, base: torch.Tensor | None = None) -> TensorContext:
        """The one place a method's ``TensorContext`` is built (the merge and the LiNeS α pass both use it).
        ``base``: θ_0 as stored, passed on in float32 only to methods whose catalog entry asks for it."""
        weights, densities, model_params = self.model_params_for(name)
        return TensorContext(
            name=name,
            weights=weights,
            seed=self.recipe.seed,
            source_indices=tuple(range(self.k)),
            scope=self.scope,
            densities=densities,
            global_stats=global_stats,
            model_params=model_params,
            base=_float32_reference(base)
            if base is not None and self.method.info.needs_base_weights
            else None,
            reference_is_input=self.sources.reference_is_input,
        )

    def densities_with(self, default: float | None) -> tuple[float, ...] | None:
        """Per-model densities when some model sets its own ``density``: the others get ``default`` (the
        tensor's method-level density); None when no model sets one (methods then read ``params.density``)."""
        if all(d is None for d in self.own_densities):
            return None
        fallback = float(default) if default is not None else 1.0
        return tuple(fallback if d is None else float(d) for d in self.own_densities)

    def model_params_for(
        self, name: str
    ) -> tuple[torch.Tensor, tuple[float, ...] | None, tuple[dict[str, float], ...]]:
        """Per-model weights, densities and params of one tensor (recipe ``models[].params``: numbers,
        gradients over the block depth, filtered lists), cached by their resolved values. A model without a
        value of its own gets the tensor's method-level one (its override or gradient), as in mergekit."""
        if not self.recipe.has_model_params() and self.densities is None:
            return self.weights, None, ()
        method_density = getattr(self.params_for(self._plans[name]), "density", None)
        if not self.recipe.has_model_params():
            return self.weights, self.densities_with(method_density), ()
        position = self.positions.get(name)
        resolved = self.recipe.model_params_for(
            name,
            layer=position.depth if position else None,
            num_layers=position.num_blocks if position else None,
        )
        default_density = float(method_density) if method_density is not None else 1.0
        key = (tuple(tuple(sorted(r.items())) for r in resolved), default_density)
        if key not in self._model_params_cache:
            weights = self.weights
            if any("weight" in r for r in resolved):
                weights = torch.tensor(
                    [r.get("weight", w) for r, w in zip(resolved, self.sources.weights, strict=True)],
                    dtype=torch.float32,
                    device=self.device,
                )
            densities = self.densities_with(default_density)
            if any("density" in r for r in resolved):
                own = densities or (default_density,) * self.k
                densities = tuple(r.get("density", d) for r, d in zip(resolved, own, strict=True))
            self._model_params_cache[key] = (weights, densities, resolved)
        return self._model_params_cache[key]

    def merged_delta(
        self, loaded: Loaded, tp: TensorPlan, global_stats: Any
    ) -> tuple[torch.Tensor, TensorContext, torch.Tensor]:
        """The method's merged delta, its context, and the task vectors' Gram matrix (taken before the method
        runs: a method may work in place on its task vectors)."""
        gram = torch.zeros((self.k, self.k), dtype=torch.float64, device=loaded.base.device)
        taus = self.finite_task_vectors(loaded, tp, gram)
        ctx = self.context(tp.name, global_stats, loaded.base)
        delta = self.method.fn(taus, ctx, self.params_for(tp))
        return delta, ctx, gram

    def merge(
        self, loaded: Loaded, tp: TensorPlan, scale: float, global_stats: Any
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """The output tensor of one merged tensor (output dtype, on the device) and its report statistics,
        among them the task vectors' Gram matrix (``merge_ops.task_vector_stats``)."""
        out_dtype = torch_dtype(tp.out_dtype)
        if self.fused_weights is not None:
            gram = torch.zeros((self.k, self.k), dtype=torch.float64, device=loaded.base.device)
            out = self._fused_output(loaded, tp, scale, out_dtype, gram)
            return out, {GRAM_KEY: gram.cpu().tolist()}
        delta, ctx, gram = self.merged_delta(loaded, tp, global_stats)
        out = kernels.apply_delta(
            None if self.zero_reference else loaded.base, delta, scale=scale, out_dtype=out_dtype
        )
        if not all_finite(out):
            raise self._overflow(tp.name, out_dtype)  # the inputs are finite (checked above)
        stats: dict[str, Any] = {
            k: v if isinstance(v, list) else round(float(v), 6) for k, v in ctx.report.items()
        }
        return out, {**stats, GRAM_KEY: gram.cpu().tolist()}

    def _fused_output(
        self, loaded: Loaded, tp: TensorPlan, scale: float, out_dtype: torch.dtype, gram: torch.Tensor
    ) -> torch.Tensor:
        """base + scale·Σ w_t(θ_t − base) in one pass, cast to the output dtype. NaN/Inf in any input reaches the
        output, so checking the output finds every poisoned input; with none, the sum overflowed the dtype."""
        assert loaded.inputs is not None and self.fused_weights is not None
        inputs = [t for t in loaded.inputs if t is not None]  # the fused path has full checkpoints only
        out = kernels.fused_task_arithmetic(
            loaded.base, inputs, self.fused_weights, scale=scale, out_dtype=out_dtype, gram=gram
        )
        if not all_finite(out):
            taus = torch.stack([t.float() - loaded.base.float() for t in inputs])
            if all_finite(loaded.base) and all_finite(taus):
                raise self._overflow(tp.name, out_dtype)
            raise self._non_finite(tp.name, loaded, taus)
        return out

    def _non_finite(self, name: str, loaded: Loaded, taus: torch.Tensor) -> NonFiniteTensorError:
        """Name the source(s) holding NaN/Inf in ``name`` (the base poisons every task vector)."""
        if not bool(torch.isfinite(loaded.base).all()):
            culprit = self.sources.reference_label
        else:
            bad = [i for i in range(self.k) if not bool(torch.isfinite(taus[i]).all())]
            culprit = ", ".join(self.sources.labels[i] for i in bad)
        return NonFiniteTensorError(
            f"tensor {name} holds NaN or Inf in {culprit}", tensor=name, source=culprit
        )

    @staticmethod
    def _overflow(name: str, out_dtype: torch.dtype) -> NonFiniteTensorError:
        return NonFiniteTensorError(
            f"merging {name} overflowed to NaN/Inf in {str(out_dtype).removeprefix('torch.')} (largest finite "
            f"value {torch.finfo(out_dtype).max:g}); set dtype: float32 or bfloat16, or lower lambda or the weights",
            tensor=name,
        )

    def iter_sum_l1(self, weights: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, float64 [2]: ‖Σ_t τ_t‖₁ and ‖Σ_t w_t·τ_t‖₁) for every merged tensor, for LiNeS' α over a plain
        weighted sum. From the stored inputs where every input is a full checkpoint of the base
        (``kernels.task_vector_sum_l1``: no task vectors are built), else from the task vectors; NaN/Inf raises
        as in ``iter_task_vectors``. The next tensor loads meanwhile."""
        for tp, loaded in prefetched(self, [t for t in self.plan.tensors if t.action == "merge"]):
            raws = self._full_inputs(loaded)
            if raws is not None:
                norms = kernels.task_vector_sum_l1(loaded.base, raws, weights)
                if float(norms[2]) == 0:
                    yield tp.name, norms[:2]
                    continue
            yield tp.name, kernels.sum_l1(self.finite_task_vectors(loaded, tp), weights)

    def iter_task_vectors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, [K, *S]) for every merged tensor, for the first passes (global statistics, LiNeS α); the next
        tensor loads while the caller works on this one."""
        for tp, loaded in prefetched(self, [t for t in self.plan.tensors if t.action == "merge"]):
            yield tp.name, self.finite_task_vectors(loaded, tp)


def prefetched(merger: TensorMerger, tensors: list[TensorPlan]) -> Iterator[tuple[TensorPlan, Loaded]]:
    """Load tensor i+1 in a thread while the caller computes tensor i (torch and the reader release the GIL).
    When the caller asks for tensor i+1, that thread also takes tensor i's pages out of the page tables
    (``checkpoint.release_pages``), work the main thread would otherwise do when it drops them."""
    if not tensors:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="alloy-loader") as pool:
        pending: Future[Loaded] = pool.submit(merger.load, tensors[0])
        for i, tp in enumerate(tensors):
            loaded = pending.result()
            if i + 1 < len(tensors):
                pending = pool.submit(merger.load, tensors[i + 1])
            yield tp, loaded
            pool.submit(_release_pages, loaded)


def _release_pages(loaded: Loaded) -> None:
    for tensor in (loaded.base, *(loaded.inputs or ())):
        if tensor is not None:
            release_pages(tensor)


def _float32_reference(base: torch.Tensor) -> torch.Tensor:
    """θ_0 in float32, in a buffer reused from tensor to tensor inside ``buffers.reuse()`` (a new one per tensor,
    ``base.float()``, page-faulted fresh memory: 15 % of the main thread's py-spy samples in a SLERP merge)."""
    if base.dtype == torch.float32 or base.device.type != "cpu":
        return base.float()
    return buffers.take("reference_float32", base.shape, torch.float32).copy_(base)


def all_finite(tensor: torch.Tensor) -> bool:
    """True when no element is NaN/Inf (``kernels.all_finite``: on CPU one compiled pass over the exponent bits)."""
    return kernels.all_finite(tensor)


def fused_weights(recipe: Recipe, sources: Sources) -> list[float] | None:
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
