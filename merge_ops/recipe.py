"""The Alloy recipe: one pydantic model for YAML/JSON recipes, validated before any file is read.

Validation collects every problem (field errors and cross-field rules) into one ``RecipeError`` whose
``context['errors']`` is a list of ``{loc, msg}``. mergekit configs are translated by ``merge_ops.mergekit_compat``
into this model first. Torch-free: the API validates recipes without importing torch.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from merge_ops import patterns
from merge_ops.errors import RecipeError
from merge_ops.evaluators.spec import EvaluatorSpec
from merge_ops.params import CATALOG, LinesParams, MethodInfo, Params, Scope
from merge_ops.safe_load import UnsafeDocumentError, check_plain_data, load_yaml
from merge_ops.slices import SliceSpec, derive_models
from merge_ops.tokenizer import ModelToken, TokenizerSpec, ZeroToken, chat_template_problem

OutputDtype = Literal["float32", "float16", "bfloat16"]

# Bounds on what one recipe may ask for. Validation cost grows with (gradient anchors x overrides) and the worker
# matches every pattern against every tensor name, so each list is bounded (far above real recipes: mergekit
# gradients have a handful of anchors, 1,000-model soups are supported).
MAX_MODELS = 4096
MAX_PATTERNS = 256  # per filters list
MAX_OVERRIDES = 256
MAX_GRADIENT_ANCHORS = 128
MAX_PARAMS = 64  # keys in one params mapping
MAX_WEIGHT = 100.0  # |w_t|, as for per-model weights
_MAX_PATH_CHARS = 4096
_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


_REPO_PART = re.compile(r"^[\w\-.]{1,96}$", flags=re.ASCII)


def check_repo_id(repo: str, *, namespace_required: bool) -> str:
    """huggingface_hub's ``validate_repo_id`` rules, so a repo id Alloy accepts is one the Hub client accepts:
    ``[org/]name`` of ``[A-Za-z0-9_.-]``, at most 96 each, no ``--`` or ``..``, no leading/trailing ``-`` or ``.``."""
    parts = repo.split("/")
    if len(parts) > 2 or (namespace_required and len(parts) != 2):
        raise ValueError(
            f"bad Hub repo id {repo!r}; expected {'org/name' if namespace_required else '[org/]name'}"
        )
    for part in parts:
        if not _REPO_PART.match(part) or part[0] in "-." or part[-1] in "-." or "--" in part or ".." in part:
            raise ValueError(
                f"bad Hub repo id {repo!r}: each part is 1-96 of letters, digits, '_', '-', '.', "
                "with no '--' or '..' and not starting or ending with '-' or '.'"
            )
    return repo


def _check_subfolder(subfolder: str) -> str:
    parts = subfolder.strip("/").split("/")
    if any(part in ("", ".", "..") for part in parts) or "\x00" in subfolder or "\\" in subfolder:
        raise ValueError(f"bad subfolder {subfolder!r}; use a relative folder without '.' or '..' parts")
    return subfolder


class HubSource(_Model):
    """A Hub repository at a revision (branch, tag or commit), optionally a subfolder."""

    repo: str = Field(max_length=200, description="org/name")
    revision: str = Field("main", min_length=1, max_length=255, pattern=r"^[^\s\x00]+$")
    subfolder: str | None = Field(None, max_length=1000)

    @field_validator("repo")
    @classmethod
    def _repo(cls, value: str) -> str:
        return check_repo_id(value, namespace_required=False)

    @field_validator("subfolder")
    @classmethod
    def _subfolder(cls, value: str | None) -> str | None:
        return _check_subfolder(value) if value is not None else None

    def uri(self) -> str:
        sub = f"/{self.subfolder}" if self.subfolder else ""
        return f"hf://{self.repo}{sub}@{self.revision}"


Source = str | HubSource
#: Where a value is written in a recipe: ``("models", 0, "source")``.
Loc = tuple[str | int, ...]
_HF_URI = re.compile(r"^hf://(?P<repo>[\w.\-]+/[\w.\-]+)(?P<sub>(/[\w.\-]+)*)(@(?P<rev>[^@\s]+))?$")


def parse_source(source: Source) -> HubSource | Path:
    """``hf://org/name[/subfolder][@revision]`` or a ``HubSource`` -> HubSource; anything else -> a local path."""
    if isinstance(source, HubSource):
        return source
    if source.startswith("hf://"):
        match = _HF_URI.match(source)
        if not match:
            raise ValueError(f"malformed Hub source {source!r}; expected hf://org/name[/subfolder]@revision")
        sub = match["sub"].strip("/") or None
        try:
            return HubSource(repo=match["repo"], revision=match["rev"] or "main", subfolder=sub)
        except ValidationError as exc:
            raise ValueError(exc.errors()[0]["msg"].removeprefix("Value error, ")) from None
    if not source.strip():
        raise ValueError("empty source")
    if "\x00" in source or len(source) > _MAX_PATH_CHARS:
        raise ValueError(f"a path has at most {_MAX_PATH_CHARS} characters and no NUL character")
    return Path(source)


Weight = Annotated[
    float,
    Field(
        ge=-MAX_WEIGHT,
        le=MAX_WEIGHT,
        description="w_t in [-100, 100]; negative weights negate a task vector.",
    ),
]


class FilteredValue(_Model):
    """One entry of a filtered per-model value: ``value`` for the tensors whose name matches ``filter``."""

    filter: str | None = Field(
        None, description="Regex searched in the tensor name; null matches every tensor."
    )
    value: float | list[float] = Field(description="A number, or a gradient over the layer depth.")

    @field_validator("filter")
    @classmethod
    def _compile(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            patterns.compile_pattern(
                pattern
            )  # linear-time engine (merge_ops.patterns), as every recipe regex
        return pattern


#: A per-model parameter: a number, a gradient (numbers spread over the layer depth), or a filtered list (the
#: first entry whose filter matches the tensor name wins; no match -> the method-level value).
PerModelValue = float | list[float] | list[FilteredValue]


class ModelEntry(_Model):
    source: Source
    weight: Weight = 1.0
    density: float | None = Field(None, gt=0, le=1, description="Per-model override of params.density.")
    lora: Source | None = Field(
        None, description="A PEFT LoRA adapter merged into this model before the merge (mergekit model+lora)."
    )
    params: dict[str, PerModelValue] = Field(
        default_factory=dict,
        description="Per-model params resolved per tensor (weight, density, top_removed, ...): a number, a "
        "gradient over depth, or a filtered list [{filter: regex, value: x}, ...]; they win over `weight`, "
        "`density` and the method-level `params`.",
    )

    @field_validator("source", "lora")
    @classmethod
    def _parse(cls, value: Source | None) -> Source | None:
        if value is not None:
            parse_source(value)
        return value


class Filters(_Model):
    include: list[str] = Field(
        default_factory=list,
        max_length=MAX_PATTERNS,
        description="Only tensors matching one of these merge (RE2 regexes: no look-around).",
    )
    exclude: list[str] = Field(
        default_factory=list,
        max_length=MAX_PATTERNS,
        description="Tensors matching these are copied from the base (RE2 regexes: no look-around).",
    )

    @field_validator("include", "exclude")
    @classmethod
    def _compile(cls, values: list[str]) -> list[str]:
        for pattern in values:
            patterns.compile_pattern(pattern)  # ValueError: a 422 naming the pattern
        return values

    def merges(self, name: str) -> bool:
        if self.include and not any(patterns.search(p, name) for p in self.include):
            return False
        return not any(patterns.search(p, name) for p in self.exclude)


class ParamOverride(_Model):
    """Params for the tensors whose name matches ``filter`` (first matching override wins)."""

    filter: str = Field(description="An RE2 regex searched in the tensor name (no look-around).")
    params: dict[str, Any] = Field(max_length=MAX_PARAMS)

    @field_validator("filter")
    @classmethod
    def _compile(cls, pattern: str) -> str:
        patterns.compile_pattern(pattern)
        return pattern


class RecipeWarning(_Model):
    """Something the recipe's source format accepts that Alloy ignored or coerced (mergekit leniency)."""

    loc: list[str | int]
    msg: str


class HubOutput(_Model):
    repo: str = Field(max_length=200, description="org/name")
    private: bool = True
    branch: str = Field("main", min_length=1, max_length=255, pattern=r"^[^\s\x00]+$")
    create_pr: bool = False
    commit_message: str | None = Field(None, max_length=1000)

    @field_validator("repo")
    @classmethod
    def _repo(cls, value: str) -> str:
        return check_repo_id(value, namespace_required=True)


class OutputSpec(_Model):
    path: str | None = Field(
        None, max_length=_MAX_PATH_CHARS, description="Local folder; created, must not hold a model already."
    )
    hub: HubOutput | None = None
    shard_size: int | str = Field(5 * 10**9, description="Bytes per shard, or '500MB', '5GB', '2GiB'.")
    copy_files_from: Literal["base"] | Annotated[int, Field(ge=0)] = Field(
        "base", description="Where config/tokenizer files come from: 'base' or a model index (0-based)."
    )

    @field_validator("path")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        if value is not None and "\x00" in value:
            raise ValueError("a path may not contain a NUL character")
        return value

    @field_validator("shard_size")
    @classmethod
    def _size(cls, value: int | str) -> int:
        return parse_size(value)


def parse_size(value: int | str) -> int:
    if isinstance(value, int):
        size = value
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", value, flags=re.IGNORECASE)
        if not match:
            raise ValueError(f"bad size {value!r}; use bytes or e.g. '500MB', '5GB'")
        size = int(float(match[1]) * _SIZE_UNITS[(match[2] or "").upper()])
    if size < 1024:
        raise ValueError("shard_size must be at least 1KB")
    if size > 2**50:
        raise ValueError("shard_size must be at most 1PiB")
    return size


class Recipe(_Model):
    """An Alloy merge recipe. ``params`` values may be a number, or a list of numbers interpolated over the
    layer depth (a mergekit gradient); ``overrides`` set params per tensor-name regex."""

    method: str = Field(description="A method id from GET /v1/methods.")
    base: Source | None = Field(None, description="The base model θ_0 (required by task-vector methods).")
    base_lora: Source | None = Field(
        None, description="A PEFT LoRA adapter merged into the base first (mergekit base_model: model+lora)."
    )
    models: list[ModelEntry] = Field(default_factory=list, max_length=MAX_MODELS)
    weights: list[Weight] | None = Field(
        None, max_length=MAX_MODELS, description="Alternative to per-model weights; one per model."
    )
    params: dict[str, Any] = Field(default_factory=dict, max_length=MAX_PARAMS)
    overrides: list[ParamOverride] = Field(default_factory=list, max_length=MAX_OVERRIDES)
    lines: LinesParams | None = Field(None, description="LiNeS layer scaling on top of a task-vector method.")
    scope: Scope | None = Field(None, description="Scope of top-k/σ statistics; default: the method's.")
    dtype: OutputDtype | None = Field(None, description="Output dtype; default: the base's.")
    seed: int = Field(0, ge=0, lt=2**63)
    filters: Filters = Field(default_factory=Filters)
    slices: list[SliceSpec] | None = Field(
        None, description="Build the output from layer ranges of the models (see merge_ops.slices)."
    )
    tokenizer: TokenizerSpec | None = Field(
        None,
        description="The output's vocabulary; embedding/lm_head rows are re-indexed to it (merge_ops.tokenizer).",
    )
    chat_template: str | None = Field(
        None, max_length=100_000, description="A Jinja chat template saved with the tokenizer, or 'auto'."
    )
    vocab_policy: Literal["error", "truncate", "pad_zero", "pad_mean"] = "error"
    evaluator: EvaluatorSpec | None = Field(None, description="Held-out scorer for greedy_soup.")
    allow_pickle: bool = Field(
        False, description="Read .bin/.pt checkpoints (with torch weights_only loading)."
    )
    # fine-tuning transfer names its three models instead of base + models
    source_base: Source | None = None
    source_finetuned: Source | None = None
    target_base: Source | None = None
    output: OutputSpec = Field(default_factory=OutputSpec)
    warnings: list[RecipeWarning] = Field(
        default_factory=list,
        description="Keys the recipe's source format (mergekit) ignores or coerces, with suggestions; they do "
        "not change the merge.",
    )

    @field_validator("base", "source_base", "source_finetuned", "target_base")
    @classmethod
    def _parse_source(cls, value: Source | None) -> Source | None:
        if value is not None:
            parse_source(value)  # ValueError: a malformed hf:// URI or repo id, NUL in a path
        return value

    @model_validator(mode="wrap")
    @classmethod
    def _validate_everything(cls, data: Any, handler: Any) -> Self:
        """Run field validation and the cross-field rules, and report the problems of both at once."""
        problems: list[InitErrorDetails] = []
        if isinstance(data, dict) and data.get("slices") is not None:
            data, slice_problems = derive_models(data)  # one model entry per input slot
            problems += [_problem(loc, msg) for loc, msg in slice_problems]
        problems += _cross_field_problems(data) if isinstance(data, dict) else []
        try:
            recipe = handler(data)
        except ValidationError as exc:
            line_errors = [_as_init_error(e) for e in exc.errors()] + problems
            raise ValidationError.from_exception_data(cls.__name__, line_errors) from None
        if problems:
            raise ValidationError.from_exception_data(cls.__name__, problems)
        return recipe

    # -- derived values used by the engine --------------------------------------------------------------
    def model_weights(self) -> list[float]:
        return list(self.weights) if self.weights is not None else [m.weight for m in self.models]

    def effective_scope(self) -> Scope:
        return self.scope or CATALOG[self.method].default_scope

    def params_for(
        self, tensor_name: str, *, layer: int | None = None, num_layers: int | None = None
    ) -> Params:
        """The method's params for one tensor: overrides by name, then gradients interpolated over depth."""
        raw = dict(self.params)
        for override in self.overrides:
            if patterns.search(override.filter, tensor_name):
                raw.update(override.params)
                break
        resolved = {k: _interpolate(v, layer, num_layers) for k, v in raw.items()}
        return CATALOG[self.method].params.model_validate(resolved)

    def has_model_params(self) -> bool:
        return any(m.params for m in self.models)

    def model_params_for(
        self, tensor_name: str, *, layer: int | None = None, num_layers: int | None = None
    ) -> tuple[dict[str, float], ...]:
        """Each model's own params for one tensor (filters by name, then gradients over depth). A key whose
        filtered list matches nothing is left out: the method-level value applies (mergekit's precedence)."""
        out = []
        for model in self.models:
            resolved: dict[str, float] = {}
            for key, value in model.params.items():
                if isinstance(value, list) and value and isinstance(value[0], FilteredValue):
                    entry = next(
                        (
                            e
                            for e in value
                            if isinstance(e, FilteredValue)
                            and (e.filter is None or patterns.search(e.filter, tensor_name))
                        ),
                        None,
                    )
                    if entry is None:
                        continue
                    value = entry.value
                resolved[key] = float(_interpolate(value, layer, num_layers))
            out.append(resolved)
        return tuple(out)

    # -- the recipe's sources: one list, used to confine, pin, resolve and cite them --------------------------
    def sources(self) -> list[tuple[Loc, Source]]:
        """Every model and adapter the recipe reads, with where it is written (``("models", 0, "source")``).

        A sliced recipe lists its slices' sources (its ``models`` are derived from them); the tokenizer's and
        ``tokens:``' model sources are included. Hub sources are ``HubSource`` or ``hf://`` strings as written."""
        found: list[tuple[Loc, Any]] = [
            (("base",), self.base),
            (("base_lora",), self.base_lora),
            (("source_base",), self.source_base),
            (("source_finetuned",), self.source_finetuned),
            (("target_base",), self.target_base),
        ]
        if self.slices is None:
            for i, model in enumerate(self.models):
                found += [(("models", i, "source"), model.source), (("models", i, "lora"), model.lora)]
        else:
            for i, spec in enumerate(self.slices):
                for j, src in enumerate(spec.sources):
                    at: Loc = ("slices", i, "sources", j)
                    found += [((*at, "source"), src.source), ((*at, "lora"), src.lora)]
        if self.tokenizer is not None:
            if self.tokenizer.source not in ("base", "union"):
                found.append((("tokenizer", "source"), self.tokenizer.source))
            for token, entry in self.tokenizer.tokens.items():
                where: Loc = ("tokenizer", "tokens", token, "source")
                if isinstance(entry.source, ModelToken):
                    found.append(((*where, "model"), entry.source.model))
                elif not isinstance(entry.source, ZeroToken):
                    found.append((where, entry.source))
        return [(loc, _as_source(value)) for loc, value in found if value is not None]

    def with_sources(self, replace: Callable[[Loc, Source], Source]) -> Recipe:
        """The recipe with each of ``sources()`` replaced by ``replace(loc, source)`` (confined paths, pinned
        Hub revisions), validated again. A sliced recipe's ``models`` are derived again from its slices."""
        return Recipe.model_validate(self.dump_with_sources(replace))

    def dump_with_sources(self, replace: Callable[[Loc, Source], Source], **dump: Any) -> dict[str, Any]:
        """``model_dump(mode="json")`` with each source replaced, not validated (a card's labels need not be
        distinct). A sliced recipe's derived ``models`` are left out: its slices say it."""
        data = self.model_dump(mode="json", by_alias=True, **({"exclude_none": True} | dump))
        if self.slices is not None:
            data.pop("models", None)
        for loc, source in self.sources():
            new = replace(loc, source)
            if new is not source:
                _set_at(data, loc, new.model_dump(mode="json") if isinstance(new, HubSource) else new)
        return data

    def hub_lineage(self) -> list[str]:
        """Hub repo ids of the recipe's models, base first: the model card's ``base_model``."""
        models = [(loc, s) for loc, s in self.sources() if loc[-1] != "lora" and loc[0] != "tokenizer"]
        models.sort(key=lambda item: item[0] != ("target_base",))  # transfer: the result's base first
        repos = [parse_source(s) for _, s in models]
        return list(dict.fromkeys(p.repo for p in repos if isinstance(p, HubSource)))

    def digest(self) -> str:
        """A stable hash of the recipe (the provenance and idempotency key); warnings don't change the merge."""
        dumped = self.model_dump(mode="json", by_alias=True, exclude={"warnings"})
        canonical = json.dumps(dumped, sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()


def _as_source(value: Any) -> Source:
    return HubSource.model_validate(value) if isinstance(value, dict) else value


def _set_at(data: Any, loc: Loc, value: Any) -> None:
    for key in loc[:-1]:
        data = data[key]
    data[loc[-1]] = value


def _interpolate(value: Any, layer: int | None, num_layers: int | None) -> Any:
    """mergekit gradients: a list of anchors spread evenly over the layers, linearly interpolated."""
    if not isinstance(value, list):
        return value
    if len(value) == 1 or layer is None or not num_layers or num_layers < 2:
        return value[0]
    position = layer / (num_layers - 1) * (len(value) - 1)
    low = min(int(position), len(value) - 2)
    frac = position - low
    return value[low] * (1 - frac) + value[low + 1] * frac


def _as_init_error(error: Any) -> InitErrorDetails:
    detail: dict[str, Any] = {"type": error["type"], "loc": error["loc"], "input": error.get("input")}
    if error["type"] in {"value_error", "assertion_error"} or "ctx" not in error:
        # re-raise custom messages verbatim (the builtin templates can't be re-rendered from ctx alone)
        detail["type"] = PydanticCustomError("value_error", error["msg"].removeprefix("Value error, "))
    else:
        detail["ctx"] = error["ctx"]
    return detail  # type: ignore[return-value]


def _problem(loc: tuple[str | int, ...], msg: str) -> InitErrorDetails:
    return {"type": PydanticCustomError("recipe_rule", msg), "loc": loc, "input": None}


def _cross_field_problems(data: dict[str, Any]) -> list[InitErrorDetails]:
    """Rules that involve several fields: method, params, base, models, weights, transfer's three models."""
    problems: list[InitErrorDetails] = []
    method = data.get("method")
    info = CATALOG.get(method) if isinstance(method, str) else None
    if isinstance(method, str) and info is None:
        problems.append(
            _problem(("method",), f"unknown method {method!r}; known: {', '.join(sorted(CATALOG))}")
        )
    models = data.get("models") or []
    if info is not None and info.kind == "transfer":
        for key in ("source_base", "source_finetuned", "target_base"):
            if not data.get(key):
                problems.append(_problem((key,), f"method 'transfer' needs {key}"))
        if models or data.get("base"):
            problems.append(
                _problem(
                    ("models",),
                    "method 'transfer' takes source_base, source_finetuned and "
                    "target_base instead of base and models",
                )
            )
    elif info is not None:
        if info.needs_base and not data.get("base"):
            problems.append(_problem(("base",), f"method {method!r} needs a base model"))
        if len(models) < info.min_models:
            problems.append(
                _problem(("models",), f"method {method!r} needs at least {info.min_models} model(s)")
            )
        problems += _input_count_problems(
            info, models, has_base=bool(data.get("base")), lines=data.get("lines")
        )
    if data.get("base_lora") and not data.get("base"):
        problems.append(_problem(("base_lora",), "base_lora needs a base to apply the adapter to"))
    template = data.get("chat_template")
    if isinstance(template, str) and (why := chat_template_problem(template)):
        problems.append(_problem(("chat_template",), why))
    if method == "greedy_soup" and not data.get("evaluator"):
        problems.append(_problem(("evaluator",), "method 'greedy_soup' needs an evaluator"))
    raw_params = data.get("params")
    atlas_params: dict[str, Any] = raw_params if isinstance(raw_params, dict) else {}
    if (
        method == "atlas"
        and not data.get("evaluator")
        and atlas_params.get("coefficients") is None
        and atlas_params.get("steps", 1) != 0
    ):
        problems.append(
            _problem(("evaluator",), "method 'atlas' trains on an evaluator's data: set evaluator")
        )
    weights = data.get("weights")
    if isinstance(weights, list) and isinstance(models, list) and len(weights) != len(models):
        problems.append(_problem(("weights",), f"{len(weights)} weights for {len(models)} models"))
    if info is not None and not info.weighted:
        problems += _unread_weight_problems(info.name, models, weights)
    output = data.get("output")
    copy_from = output.get("copy_files_from") if isinstance(output, dict) else None
    if (
        isinstance(copy_from, int)
        and not isinstance(copy_from, bool)
        and isinstance(models, list)
        and copy_from >= len(models) > 0
    ):
        problems.append(
            _problem(
                ("output", "copy_files_from"),
                f"model index {copy_from} out of range: the recipe has {len(models)} model(s), "
                f"indices 0..{len(models) - 1}",
            )
        )
    if info is not None:
        problems += _params_problems(info.params, data.get("params") or {}, ("params",))
        problems += _model_params_problems(info, data)
        for i, override in enumerate(data.get("overrides") or []):
            if isinstance(override, dict) and isinstance(override.get("params"), dict):
                merged = {**(data.get("params") or {}), **override["params"]}
                problems += _params_problems(info.params, merged, ("overrides", i, "params"))
    return problems


def _unread_weight_problems(method: str, models: Any, weights: Any) -> list[InitErrorDetails]:
    """A method that never reads weights (model_stock, slerp, karcher, ...) refuses a weight other than 1: it
    would be ignored (mergekit ignores it too)."""
    given = (
        [(("weights", i), w) for i, w in enumerate(weights)]
        if isinstance(weights, list)
        else [
            (("models", i, "weight"), m.get("weight", 1.0))
            for i, m in enumerate(models if isinstance(models, list) else [])
            if isinstance(m, dict)
        ]
    )
    return [
        _problem(
            loc, f"method {method!r} does not weight its models; remove the weight (it would be ignored)"
        )
        for loc, w in given
        if isinstance(w, int | float) and not isinstance(w, bool) and w != 1
    ]


def _input_count_problems(
    info: MethodInfo, models: list[Any], *, has_base: bool, lines: Any
) -> list[InitErrorDetails]:
    """mergekit's input contracts (the base counts as an input) and LiNeS only on pure task-vector methods."""
    problems: list[InitErrorDetails] = []
    name, count, inputs = info.name, len(models), len(models) + int(has_base)
    if info.max_models is not None and count > info.max_models:
        problems.append(_problem(("models",), f"method {name!r} takes at most {info.max_models} model(s)"))
    with_base = " (the base counts as one)" if has_base else ""
    if inputs < info.min_inputs or (info.max_inputs is not None and inputs > info.max_inputs):
        want = (
            f"exactly {info.min_inputs}"
            if info.min_inputs == info.max_inputs
            else f"at least {info.min_inputs}"
            if info.max_inputs is None
            else f"{info.min_inputs} to {info.max_inputs}"
        )
        problems.append(
            _problem(("models",), f"method {name!r} takes {want} input model(s){with_base}, got {inputs}")
        )
    if lines is not None and info.needs_base_weights:
        problems.append(_problem(("lines",), f"LiNeS scales task-vector merges; method {name!r} is not one"))
    return problems


def _params_problems(model: type[Params], raw: Any, loc: tuple[str | int, ...]) -> list[InitErrorDetails]:
    """Validate params with every gradient anchor in turn (each anchor must be valid on its own)."""
    if not isinstance(raw, dict):
        return []  # the field validator reports a non-dict
    lists = {k: v for k, v in raw.items() if isinstance(v, list)}
    problems: list[InitErrorDetails] = []
    for key, value in lists.items():
        if not value or not all(isinstance(x, int | float) and not isinstance(x, bool) for x in value):
            problems.append(_problem((*loc, key), "a gradient must be a non-empty list of numbers"))
        elif len(value) > MAX_GRADIENT_ANCHORS:
            problems.append(
                _problem(
                    (*loc, key), f"a gradient has at most {MAX_GRADIENT_ANCHORS} anchors, not {len(value)}"
                )
            )
    if problems:
        return problems
    depth = max((len(v) for v in lists.values()), default=1)
    seen: set[tuple[Any, ...]] = set()
    for i in range(depth):
        sample = {k: (v[min(i, len(v) - 1)] if isinstance(v, list) else v) for k, v in raw.items()}
        try:
            model.model_validate(sample)
        except ValidationError as exc:
            for error in exc.errors():
                key = (error["loc"], error["msg"])
                if key not in seen:
                    seen.add(key)
                    problems.append(_problem((*loc, *error["loc"]), error["msg"]))
    return problems


#: per-model keys every task-vector and soup method reads (besides its params model's own fields)
_PER_MODEL_ALWAYS = {"weight"}


def _model_params_problems(info: Any, data: dict[str, Any]) -> list[InitErrorDetails]:
    """Per-model params: known keys, every anchor valid for the method, and a scope that can use them."""
    models = data.get("models")
    if not isinstance(models, list):
        return []
    fields = {f.alias or name for name, f in info.params.model_fields.items()}
    allowed = ((fields & _PER_MODEL_KEYS) - info.shared_params) | (
        _PER_MODEL_ALWAYS if info.weighted else set()
    )
    top = {k: v for k, v in (data.get("params") or {}).items() if not isinstance(v, list)}
    problems: list[InitErrorDetails] = []
    for i, model in enumerate(models):
        params = model.get("params") if isinstance(model, dict) else None
        if not isinstance(params, dict) or not params:
            continue
        scope = data.get("scope") or info.default_scope
        if scope == "global":
            problems.append(
                _problem(("models", i, "params"), "per-model params need scope per_tensor or per_row")
            )
        # plain numbers are checked together (density + top_removed ≤ 1, ...); a value that varies by tensor
        # pairs with the others per tensor only, so then each value is checked on its own field's bounds
        own = {k: v for k, v in params.items() if k in fields and isinstance(v, int | float)}
        if "density" in fields and isinstance(model.get("density"), int | float) and "density" not in own:
            own["density"] = model["density"]
        varying = {k for k, v in params.items() if k in fields and isinstance(v, list)}
        for key, value in params.items():
            loc = ("models", i, "params", key)
            if key not in allowed:
                why = (
                    f"{key!r} holds for all models at once: set it in params"
                    if key in info.shared_params
                    else f"per-model keys: {', '.join(sorted(allowed))}"
                    if allowed
                    else "it reads no per-model params"
                )
                problems.append(_problem(loc, f"method {info.name!r} takes no per-model {key!r}; {why}"))
                continue
            for anchor in _anchors(value):
                if key == "weight":
                    if not -100 <= anchor <= 100:
                        problems.append(_problem(loc, "weight must be in [-100, 100]"))
                    continue
                try:
                    if varying - {key}:
                        _field_adapter(info.params, key).validate_python(anchor)
                    else:
                        info.params.model_validate({**top, **own, key: anchor})
                except ValidationError as exc:
                    problems += [_problem(loc, e["msg"]) for e in exc.errors()]
                    break
    return problems


def _field_adapter(model: type[Params], key: str) -> TypeAdapter[Any]:
    """A validator of one field of ``model`` (by name or alias) with its constraints."""
    name = next(n for n, f in model.model_fields.items() if key in (n, f.alias))
    field = model.model_fields[name]
    return TypeAdapter(Annotated[field.annotation, *field.metadata])


#: params a model may set for itself (methods read them with ``ctx.per_model`` or ``ctx.densities``)
_PER_MODEL_KEYS = {"density", "top_removed", "epsilon", "t", "gamma", "select_topk", "scale"}


def _anchors(value: Any) -> list[float]:
    """Every number a per-model value can take (gradient anchors, filtered entries' values)."""
    items = value if isinstance(value, list) else [value]
    out: list[float] = []
    for item in items:
        inner = item.get("value") if isinstance(item, dict) else item
        for x in inner if isinstance(inner, list) else [inner]:
            if isinstance(x, int | float) and not isinstance(x, bool):
                out.append(float(x))
    return out


def load_recipe(data: dict[str, Any] | str | Path) -> Recipe:
    """Parse and validate a recipe (a dict, YAML/JSON text, or a file path); mergekit configs are translated."""
    if isinstance(data, Path) or (
        isinstance(data, str) and "\n" not in data and data.endswith((".yaml", ".yml", ".json"))
    ):
        path = Path(data)
        try:
            data = path.read_text()
        except OSError as exc:
            raise RecipeError(f"cannot read recipe {path}: {exc.strerror}", errors=[]) from None
    try:
        if isinstance(data, str):
            data = load_yaml(data)  # JSON is YAML; aliases, deep nesting, bad text and numbers refused
        else:
            check_plain_data(data)
    except UnsafeDocumentError as exc:
        raise RecipeError(f"recipe refused: {exc}", errors=[{"loc": [], "msg": str(exc)}]) from None
    if not isinstance(data, dict):
        raise RecipeError("a recipe must be a mapping", errors=[{"loc": [], "msg": "expected a mapping"}])
    from merge_ops.mergekit_compat import is_mergekit_config, translate_mergekit

    native = not is_mergekit_config(data)
    if not native:
        data = translate_mergekit(data)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise recipe_error(exc) from None
    if native:
        _refuse_zero_sum_soup(recipe)
    return recipe


def _refuse_zero_sum_soup(recipe: Recipe) -> None:
    """A normalized soup divides by Σw: with Σw = 0 the result is not an average of anything (with [1, -1] it is
    2·ft1 − ft2). mergekit divides anyway; a native recipe is refused instead, saying what to do."""
    field = CATALOG[recipe.method].params.model_fields.get("normalize")
    if field is None or not recipe.params.get("normalize", field.default) or not recipe.models:
        return
    weights = recipe.model_weights()
    if abs(math.fsum(weights)) <= 1e-6 * max(1.0, max(abs(w) for w in weights)):
        loc = ["weights"] if recipe.weights is not None else ["models"]
        msg = (
            "the weights sum to 0, so a normalized soup (which divides by their sum) is undefined; "
            "use weights with a non-zero sum, or params.normalize: false for a plain weighted sum"
        )
        raise RecipeError(f"invalid recipe: {'.'.join(loc)}: {msg}", errors=[{"loc": loc, "msg": msg}])


def recipe_error(exc: ValidationError) -> RecipeError:
    errors = [{"loc": [str(p) for p in e["loc"]], "msg": e["msg"]} for e in exc.errors()]
    summary = "; ".join(f"{'.'.join(e['loc']) or 'recipe'}: {e['msg']}" for e in errors)
    return RecipeError(f"invalid recipe: {summary}", errors=errors)
