"""Preflight of a merge: on the opened sources (``merge_ops.sources``), read only headers, check compatibility,
plan every tensor.

Fails before any compute on missing tensors, shape or dtype-kind mismatches (float vs. integer; float widths may
differ, everything is computed in float32) and unusable outputs. ``plan_merge`` is ``alloy merge --dry-run``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel

from merge_ops.errors import IncompatibleModelsError, OutputError
from merge_ops.params import CATALOG, LinesParams, MethodInfo, Scope, StagesParams
from merge_ops.recipe import Recipe
from merge_ops.sources import SourceResolver, Sources, open_sources

FLOAT_CODES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
OUTPUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CODE_TO_DTYPE = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
DTYPE_TO_CODE = {v: k for k, v in CODE_TO_DTYPE.items()}
# Rows of these tensors may differ between models when the recipe sets a vocab_policy.
VOCAB_TENSOR = re.compile(r"(embed_tokens|embed_in|wte|word_embeddings|shared|lm_head|embed_out)\.weight$")


class TensorPlan(BaseModel):
    name: str
    shape: list[int]
    in_dtype: str
    out_dtype: str
    action: Literal["merge", "copy"]
    reason: str | None = None
    layer: int | None = None


class MergePlan(BaseModel):
    method: str
    scope: str
    reference: str
    models: list[str]
    tensors: list[TensorPlan]
    bytes_read: int
    bytes_written: int
    largest_tensor_bytes: int
    estimated_peak_bytes: int
    passes: int

    def summary(self) -> str:
        merged = sum(t.action == "merge" for t in self.tensors)
        gib = 2**30
        return (
            f"method {self.method} (scope {self.scope}), {len(self.models)} model(s) onto {self.reference}\n"
            f"tensors: {merged} merged, {len(self.tensors) - merged} copied from the reference\n"
            f"read {self.bytes_read / gib:.3f} GiB in {self.passes} pass(es), write {self.bytes_written / gib:.3f} GiB\n"
            f"largest tensor {self.largest_tensor_bytes / 2**20:.1f} MiB, "
            f"estimated peak memory {self.estimated_peak_bytes / 2**20:.1f} MiB"
        )


# ---------------------------------------------------------------------------------------------------------------
# preflight


def check_compatible(recipe: Recipe, sources: Sources) -> None:
    """Every merged tensor present with the same shape in every full source (headers only)."""
    ref_infos = sources.reference.infos
    problems: list[str] = []
    for src, label in zip(sources.inputs, sources.labels, strict=True):
        infos = src.infos
        if src.sparse_coverage:
            unknown = sorted(set(infos) - set(ref_infos))
            if unknown:
                problems.append(f"{label} adapts tensors the base lacks: {_names(unknown)}")
        else:
            missing = sorted(
                n for n in ref_infos if n not in infos and recipe.filters.merges(n) and is_float(ref_infos[n])
            )
            extra = sorted(set(infos) - set(ref_infos))
            if missing:
                problems.append(f"{label} lacks tensors of {sources.reference_label}: {_names(missing)}")
            if extra:
                problems.append(f"{label} has tensors that {sources.reference_label} lacks: {_names(extra)}")
        for name, info in infos.items():
            base_info = ref_infos.get(name)
            if base_info is None or not recipe.filters.merges(name):
                continue
            if is_float(info) != is_float(base_info):
                problems.append(
                    f"{name}: dtype {info.dtype} in {label} but {base_info.dtype} in {sources.reference_label}"
                )
            elif tuple(info.shape) != tuple(base_info.shape):
                if (
                    recipe.vocab_policy != "error"
                    and VOCAB_TENSOR.search(name)
                    and tuple(info.shape[1:]) == tuple(base_info.shape[1:])
                ):
                    if recipe.vocab_policy == "truncate" and info.shape[0] < base_info.shape[0]:
                        problems.append(
                            f"{name}: {label} has {info.shape[0]} rows, fewer than the base's "
                            f"{base_info.shape[0]}; use vocab_policy pad_zero or pad_mean"
                        )
                    continue
                problems.append(
                    f"{name}: shape {list(info.shape)} in {label} but {list(base_info.shape)} in "
                    f"{sources.reference_label}"
                )
    if problems:
        raise IncompatibleModelsError(
            "models are incompatible: "
            + "; ".join(problems[:8])
            + (f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""),
            problems=problems,
        )


def _names(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def is_float(info: Any) -> bool:
    return info.dtype in FLOAT_CODES


def element_size(code: str) -> int:
    return {
        "F64": 8,
        "I64": 8,
        "U64": 8,
        "F32": 4,
        "I32": 4,
        "U32": 4,
        "F16": 2,
        "BF16": 2,
        "I16": 2,
        "U16": 2,
    }.get(code, 1)


def build_plan(recipe: Recipe, info: MethodInfo, sources: Sources) -> MergePlan:
    from merge_ops.lines import find_block

    tensors: list[TensorPlan] = []
    bytes_read = bytes_written = largest = 0
    k = len(sources.inputs)
    for name, tinfo in sources.reference.infos.items():
        count = numel(tinfo.shape)
        action: Literal["merge", "copy"]
        nbytes = count * element_size(tinfo.dtype)
        if not is_float(tinfo):
            action, reason, out_code = "copy", "not a floating tensor", tinfo.dtype
        elif not recipe.filters.merges(name):
            action, reason, out_code = "copy", "excluded by filters", tinfo.dtype
        else:
            action, reason = "merge", None
            out_code = DTYPE_TO_CODE[OUTPUT_DTYPES[recipe.dtype]] if recipe.dtype else tinfo.dtype
            bytes_read += nbytes * (k + 1)
            largest = max(largest, count * 4)
        if action == "copy":
            bytes_read += nbytes
        bytes_written += count * element_size(out_code)
        block = find_block(name)
        tensors.append(
            TensorPlan(
                name=name,
                shape=list(tinfo.shape),
                in_dtype=tinfo.dtype,
                out_dtype=out_code,
                action=action,
                reason=reason,
                layer=block[1] if block else None,
            )
        )
    passes = 1 + first_pass_count(recipe)
    return MergePlan(
        method=recipe.method,
        scope=recipe.effective_scope().value,
        reference=sources.reference_label,
        models=sources.labels,
        tensors=tensors,
        bytes_read=bytes_read * passes,
        bytes_written=bytes_written,
        largest_tensor_bytes=largest,
        # two tensors in flight (prefetch), each K task vectors + base + delta in float32, plus the output
        estimated_peak_bytes=2 * (k + 3) * largest,
        passes=passes,
    )


def numel(shape: Any) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def global_pass_needed(recipe: Recipe) -> bool:
    params = recipe.params_for("")  # global statistics use the top-level params (gradient lists: first value)
    return (
        isinstance(params, StagesParams)
        and recipe.effective_scope() is Scope.global_
        and (
            params.sparsify in {"magnitude", "breadcrumbs", "compeft"}
            or (params.sparsify == "dare" and params.rescale == "l1")
        )
    )


def has_gradients(recipe: Recipe) -> bool:
    # a gradient set only in an override (a filtered mergekit gradient) is a gradient too
    scopes = [recipe.params, *(o.params for o in recipe.overrides)]
    return any(isinstance(v, list) for scope in scopes for v in scope.values())


def lines_params(recipe: Recipe) -> LinesParams | None:
    if recipe.method == "lines":
        p = CATALOG["lines"].params.model_validate(
            {k: v for k, v in recipe.params.items() if not isinstance(v, list)}
        )
        return LinesParams(alpha=p.alpha, beta=p.beta, head_scale=p.head_scale)  # type: ignore[attr-defined]
    return recipe.lines


def first_pass_count(recipe: Recipe) -> int:
    lines = lines_params(recipe)
    return int(global_pass_needed(recipe)) * 2 + int(lines is not None and lines.alpha is None)


def check_output(output_dir: Path) -> None:
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise OutputError(
            f"output {output_dir} exists and is not empty; choose a new folder", path=str(output_dir)
        )


def plan_merge(recipe: Recipe, *, resolver: SourceResolver | None = None) -> MergePlan:
    """Preflight: open every source, read headers, check compatibility; no tensor is loaded."""
    info = CATALOG[recipe.method]
    sources = open_sources(recipe, info, resolver)
    try:
        check_compatible(recipe, sources)
        return build_plan(recipe, info, sources)
    finally:
        sources.close()
