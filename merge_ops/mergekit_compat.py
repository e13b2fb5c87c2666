"""Translate a mergekit YAML config into an Alloy recipe dict, with mergekit 0.1.5's semantics and defaults.

A mergekit config is a promise of mergekit's merge, so every field it sets or leaves out means what it means in
mergekit (spec "mergekit recipes give mergekit's result"):

- ``merge_method`` -> the Alloy preset with mergekit's stages: ``task_arithmetic``, ``linear``, ``ties``,
  ``dare_linear``, ``dare_ties``, ``breadcrumbs``, ``breadcrumbs_ties``, ``model_stock``. Anything else is rejected.
- ``lambda`` 1 unless set; ``normalize`` true for ``ties`` and ``linear``, false for the others, mapped to
  ``aggregate: mean | sum`` (with sign consensus: the disjoint mean, or mergekit's disjoint *sum*);
  ``density`` 1 (no pruning) unless set; DARE ``rescale`` true -> ``l1`` (mergekit matches the L1 norm), false ->
  ``none``; sign election on the weighted sum with zero -> +1 is Alloy's rule already; ``scope`` per_tensor.
- Breadcrumbs ``gamma`` (default 0.01) is the top fraction removed: ``top_removed = gamma``, or 0 where density
  is 1 (mergekit returns the tensor unpruned), or ``1 − density`` where density + gamma > 1 (mergekit shrinks
  the removed top to hit the density; per tensor it then removes n − ⌊density·n⌋, which can exceed
  ⌊(1 − density)·n⌋ by one). mergekit ≤ 0.1.4 zeroes tensors with ⌊gamma·n⌋ = 0: a bug Alloy does not
  copy (it removes nothing there).
- ``weight`` is required per model (model or top-level ``parameters``), as in mergekit (model_stock ignores it).
- Parameter values: a number, a gradient (list of numbers over depth), or a filtered list
  ``[{filter: s, value: x}, ..., {value: y}]`` where the first entry whose ``filter`` glob-matches ``*s*`` wins
  (mergekit's fnmatch rule). Filtered lists become Alloy ``overrides``: one per combination of first-matching
  entries, written as mutually exclusive look-ahead regexes, so several filtered params combine exactly.
- ``dtype`` / ``out_dtype`` -> the output dtype (Alloy always computes in float32); ``tokenizer_source: base`` is
  Alloy's behaviour (config and tokenizer files come from the base); other tokenizer sources, ``slices``, LoRA
  ``model+lora`` references and unknown fields are rejected with a ``RecipeError`` naming the field.

Intended differences from mergekit: exact top-k ties by lowest index (mergekit's argsort order is unspecified),
at least one element kept per tensor (mergekit asserts), a DARE mask from Alloy's counter-based generator
(mergekit uses torch's global RNG), float32 compute for half-precision inputs.
"""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path
from typing import Any

from merge_ops import patterns
from merge_ops.errors import RecipeError
from merge_ops.mergekit_structure import Structure, apply_structure, extract_structure, slice_loc

#: mergekit method -> (Alloy method, Alloy stage params fixed by the mergekit method, mergekit's normalize default)
_METHODS: dict[str, tuple[str, dict[str, Any], bool]] = {
    "linear": ("linear", {}, True),
    "task_arithmetic": ("task_arithmetic", {"sparsify": "none", "consensus": "none"}, False),
    "ties": ("ties", {"sparsify": "magnitude", "consensus": "ties_sign"}, True),
    "dare_linear": ("dare_linear", {"sparsify": "dare", "consensus": "none"}, False),
    "dare_ties": ("dare_ties", {"sparsify": "dare", "consensus": "ties_sign"}, False),
    "breadcrumbs": ("breadcrumbs", {"sparsify": "breadcrumbs", "consensus": "none"}, False),
    "breadcrumbs_ties": ("breadcrumbs_ties", {"sparsify": "breadcrumbs", "consensus": "ties_sign"}, False),
    "model_stock": ("model_stock", {}, False),
}
_TASK_VECTOR = {"task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties"}
#: method-level parameters mergekit accepts per method (int8_mask only changes mergekit's mask dtype)
_GLOBAL_PARAMS: dict[str, set[str]] = {
    "linear": {"normalize"},
    "model_stock": {"filter_wise"},
    **{m: {"normalize", "lambda", "int8_mask", "rescale"} for m in _TASK_VECTOR},
}
_TENSOR_PARAMS: dict[str, set[str]] = {
    "linear": {"weight"},
    "model_stock": {"weight"},
    "task_arithmetic": {"weight", "density"},
    "ties": {"weight", "density"},
    "dare_linear": {"weight", "density"},
    "dare_ties": {"weight", "density"},
    "breadcrumbs": {"weight", "density", "gamma"},
    "breadcrumbs_ties": {"weight", "density", "gamma"},
}
_TOP_FIELDS = {
    "merge_method",
    "models",
    "base_model",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "name",
}
_DTYPES = {
    "float32": "float32",
    "float16": "float16",
    "bfloat16": "bfloat16",
    "fp32": "float32",
    "fp16": "float16",
    "bf16": "bfloat16",
    "half": "float16",
    "float": "float32",
}
_HUB_ID = re.compile(r"^[\w.\-]+/[\w.\-]+$")


def is_mergekit_config(data: Any) -> bool:
    """A mapping with mergekit's ``merge_method`` key and no Alloy ``method`` key."""
    return isinstance(data, dict) and "merge_method" in data and "method" not in data


def translate_mergekit(data: dict[str, Any]) -> dict[str, Any]:
    """The Alloy recipe dict equivalent to mergekit config ``data``; raises ``RecipeError`` listing every
    unsupported or invalid field as ``{loc, msg}``."""
    errors: list[dict[str, Any]] = []
    structure: Structure | None = None

    def fail(loc: list[str | int], msg: str) -> None:
        # a slices config's inputs are models[j] here: name the slice source instead
        errors.append({"loc": slice_loc(loc, structure) if structure is not None else loc, "msg": msg})

    # slices / modules / model+lora (merge_ops.mergekit_structure): the rest sees a plain models: config
    data, structure = extract_structure(data, fail)
    if errors and not data.get("models"):
        raise _error(errors)
    for key in data:
        if key not in _TOP_FIELDS:
            fail([key], f"mergekit field {key!r} is not supported by Alloy")
    method = data.get("merge_method")
    if method not in _METHODS:
        fail(
            ["merge_method"],
            f"mergekit merge_method {method!r} is not supported; supported: {', '.join(_METHODS)}",
        )
        raise _error(errors)
    alloy_method, stage_params, normalize_default = _METHODS[method]

    global_params = data.get("parameters") or {}
    if not isinstance(global_params, dict):
        fail(["parameters"], "must be a mapping")
        global_params = {}
    for key in global_params:
        if key not in _GLOBAL_PARAMS[method] | _TENSOR_PARAMS[method]:
            fail(["parameters", key], f"parameter {key!r} is not supported for merge_method {method!r}")

    models, per_model_density = _models(data, method, global_params, fail)
    model_densities = [m["density"] for m in models if "density" in m] if per_model_density else None
    recipe: dict[str, Any] = {"method": alloy_method, "models": models}
    base = data.get("base_model")
    if base is not None and method != "linear":
        recipe["base"] = _source(base, ["base_model"], fail)
    elif method in _TASK_VECTOR or method == "model_stock":
        fail(["base_model"], f"merge_method {method!r} needs base_model")

    dtype = data.get("out_dtype") or data.get("dtype")
    if dtype is not None:
        if dtype not in _DTYPES:
            fail(["out_dtype" if "out_dtype" in data else "dtype"], f"dtype {dtype!r} is not supported")
        else:
            recipe["dtype"] = _DTYPES[dtype]
    tokenizer_source = data.get("tokenizer_source")
    if tokenizer_source not in (None, "base"):
        fail(
            ["tokenizer_source"],
            "only tokenizer_source: base is supported (Alloy copies the base's tokenizer)",
        )

    settings: dict[str, Any] = {}
    if method == "linear":
        settings["normalize"] = global_params.get("normalize", normalize_default)
    elif method == "model_stock":
        settings["filter_wise"] = global_params.get("filter_wise", False)
    else:
        settings.update(stage_params)
        normalize = global_params.get("normalize", normalize_default)
        if not isinstance(normalize, bool):
            fail(["parameters", "normalize"], "normalize must be true or false")
        settings["aggregate"] = "mean" if normalize else "sum"
        settings["lambda"] = global_params.get("lambda", 1.0)
        if stage_params["sparsify"] == "dare":
            settings["rescale"] = "l1" if global_params.get("rescale", True) else "none"
        elif global_params.get("rescale", False):
            fail(
                ["parameters", "rescale"], f"rescale: true is only supported for DARE methods, not {method!r}"
            )
        if stage_params["sparsify"] != "none":
            settings["density"] = global_params.get("density", 1.0)
        if stage_params["sparsify"] == "breadcrumbs":
            settings["gamma"] = global_params.get("gamma", 0.01)
    for key in ("normalize", "filter_wise", "lambda"):
        if isinstance(settings.get(key), list):
            fail(["parameters", key], f"{key} must be a single value in Alloy")
    if errors:
        raise _error(errors)

    base_params, overrides = _expand_filters(settings, fail)
    if method in ("breadcrumbs", "breadcrumbs_ties"):
        for override in overrides:
            merged = _breadcrumbs_params({**base_params, **override["params"]}, model_densities, fail)
            override["params"] = {k: merged[k] for k in ("density", "top_removed")}
        base_params = _breadcrumbs_params(base_params, model_densities, fail)
    if errors:
        raise _error(errors)
    recipe["params"] = base_params
    if overrides:
        recipe["overrides"] = overrides
    return apply_structure(recipe, structure, fail)


def _error(errors: list[dict[str, Any]]) -> RecipeError:
    summary = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in errors)
    return RecipeError(f"unsupported mergekit config: {summary}", errors=errors)


def _models(
    data: dict[str, Any], method: str, global_params: dict[str, Any], fail: Any
) -> tuple[list[dict], bool]:
    raw_models = data.get("models")
    if not isinstance(raw_models, list) or not raw_models:
        fail(["models"], "mergekit config needs a non-empty models list")
        return [], False
    models: list[dict[str, Any]] = []
    any_density = False
    for i, entry in enumerate(raw_models):
        loc: list[str | int] = ["models", i]
        if not isinstance(entry, dict) or "model" not in entry:
            fail(loc, "each model needs a 'model' field")
            continue
        for key in entry:
            if key not in ("model", "parameters"):
                fail([*loc, key], f"mergekit model field {key!r} is not supported")
        params = entry.get("parameters") or {}
        if not isinstance(params, dict):
            fail([*loc, "parameters"], "must be a mapping")
            params = {}
        model: dict[str, Any] = {"source": _source(entry["model"], [*loc, "model"], fail)}
        for key, value in params.items():
            if key not in _TENSOR_PARAMS[method]:
                fail(
                    [*loc, "parameters", key], f"per-model parameter {key!r} is not supported for {method!r}"
                )
            elif not _is_number(value):
                fail(
                    [*loc, "parameters", key],
                    f"per-model {key} must be a single number in Alloy "
                    "(gradients and filters are supported in the top-level parameters)",
                )
        weight = params.get("weight", global_params.get("weight"))
        if method != "model_stock":
            if weight is None:
                fail([*loc, "parameters", "weight"], "mergekit requires a weight for every model")
            elif not _is_number(weight):
                fail(["parameters", "weight"], "a top-level weight must be a single number in Alloy")
            else:
                model["weight"] = float(weight)
        if "density" in params and _is_number(params["density"]):
            model["density"] = float(params["density"])
            any_density = True
        models.append(model)
    if any_density:
        default = global_params.get("density", 1.0)
        for model in models:
            if "density" not in model:
                if not _is_number(default):
                    fail(
                        ["parameters", "density"],
                        "with per-model densities the top-level density must be a number",
                    )
                    continue
                model["density"] = float(default)
    return models, any_density


def _source(ref: Any, loc: list[str | int], fail: Any) -> str:
    """mergekit model reference -> Alloy source: an existing local folder stays a path, ``org/name[@rev]`` is a
    Hub repository."""
    if not isinstance(ref, str) or not ref.strip():
        fail(loc, "a model reference must be a string")
        return ""
    if "+" in ref:
        fail(loc, "mergekit 'model+lora' references are not supported; list the LoRA as its own model source")
        return ref
    if Path(ref).expanduser().exists() or ref.startswith(("/", ".", "~", "hf://")):
        return ref
    repo, _, revision = ref.partition("@")
    if _HUB_ID.match(repo):
        return f"hf://{repo}@{revision}" if revision else f"hf://{repo}"
    return ref


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_filtered(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _glob_regex(pattern: str | None) -> str | None:
    """mergekit matches ``fnmatch(name, f"*{filter}*")``; None and '*' match everything."""
    if pattern is None or pattern == "*":
        return None
    if not any(ch in pattern for ch in "*?["):
        return re.escape(pattern)
    # RE2 syntax (merge_ops.patterns): fnmatch.translate emits atomic groups and \Z, which RE2 lacks
    return patterns.glob_regex(pattern)


#: Most overrides one mergekit config may expand to (merge_ops.recipe.MAX_OVERRIDES).
MAX_FILTER_COMBINATIONS = 256

#: mergekit's defaults for the parameters a filtered list may leave unmatched
_MERGEKIT_DEFAULTS = {"density": 1.0, "gamma": 0.01}


def _expand_filters(settings: dict[str, Any], fail: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Split filtered-list params into base params plus mutually exclusive overrides (one per combination of
    first-matching entries; the all-unmatched combination is the base)."""
    base = {k: v for k, v in settings.items() if not _is_filtered(v)}
    filtered: dict[str, list[tuple[str | None, Any]]] = {}
    for key, entries in settings.items():
        if not _is_filtered(entries):
            continue
        options: list[tuple[str | None, Any]] = []
        for j, entry in enumerate(entries):
            if set(entry) - {"filter", "value"} or "value" not in entry:
                fail(["parameters", key, j], "a filtered entry is {filter: pattern, value: x}")
                continue
            options.append((_glob_regex(entry.get("filter")), entry["value"]))
            if options[-1][0] is None:
                break  # entries after a catch-all are unreachable in mergekit
        if not options or options[-1][0] is not None:
            options.append((None, _MERGEKIT_DEFAULTS.get(key)))  # nothing matched: mergekit's default
        filtered[key] = options
    keys = list(filtered)
    combinations = math.prod(len(filtered[k]) for k in keys)
    if combinations > MAX_FILTER_COMBINATIONS:
        # one override per combination: bound it before building them (a few lists multiply fast)
        fail(
            ["parameters"],
            f"filtered parameters give {combinations} combinations of entries; at most "
            f"{MAX_FILTER_COMBINATIONS} are supported (use fewer filtered parameters or entries)",
        )
        return base, []
    overrides = []
    for choice in itertools.product(*(range(len(filtered[k])) for k in keys)):
        conditions: list[str] = []
        params: dict[str, Any] = {}
        for key, index in zip(keys, choice, strict=True):
            options = filtered[key]
            conditions += [f"(?!.*(?:{p}))" for p, _ in options[:index] if p is not None]
            pattern, value = options[index]
            if pattern is not None:
                conditions.append(f"(?=.*(?:{pattern}))")
            params[key] = value
        if all(filtered[k][i][0] is None for k, i in zip(keys, choice, strict=True)):
            base.update(params)  # every param on its catch-all: where no override matches
        else:
            overrides.append({"filter": "^" + "".join(conditions), "params": params})
    return base, overrides


def _breadcrumbs_params(
    params: dict[str, Any], model_densities: list[float] | None, fail: Any
) -> dict[str, Any]:
    """mergekit density/gamma -> Alloy density/top_removed (see the module docstring)."""
    out = dict(params)
    density = out.get("density", 1.0)
    gamma = out.pop("gamma", 0.01)
    if model_densities is not None:
        # per-model densities: one shared top_removed must mean the same for every model in mergekit's terms
        if not _is_number(gamma):
            fail(["parameters", "gamma"], "with per-model densities gamma must be a single number")
            return out
        if gamma > 0 and any(d >= 1 or d + gamma > 1 for d in model_densities):
            fail(
                ["parameters", "gamma"],
                "per-model densities with density = 1 or density + gamma > 1 "
                "(mergekit prunes those models differently) are not supported",
            )
        out["top_removed"] = float(gamma)
        out["density"] = min(model_densities)  # only validated: the per-model densities are what is used
        return out
    if _is_number(density) and _is_number(gamma):
        out["top_removed"] = 0.0 if density >= 1 else min(float(gamma), 1.0 - float(density))
        return out
    anchors_d = density if isinstance(density, list) else [density]
    anchors_g = gamma if isinstance(gamma, list) else [gamma]
    if not all(_is_number(x) for x in anchors_d + anchors_g):
        fail(["parameters", "gamma"], "density and gamma must be numbers or lists of numbers")
    elif any(d + g > 1 for d in anchors_d for g in anchors_g) or any(d >= 1 for d in anchors_d):
        fail(
            ["parameters", "gamma"],
            "gradients of density/gamma where density + gamma > 1 or density = 1 are not supported",
        )
    out["top_removed"] = gamma
    return out
