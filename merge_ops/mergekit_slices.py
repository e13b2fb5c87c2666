"""mergekit slices whose parameters differ: one translation per slice, joined by filters on each slice's layers.

mergekit resolves a tensor's parameters in the slice that writes it: the source's own ``parameters``, then the
slice's, then the module's and the top-level ones (``ConfigReader.parameter_sources``); the embeddings take the
first slice's, the final norm and lm_head the last slice's. Alloy's recipe has one set of params and one
``models:`` list for all slices, so when the slices' translations differ they are joined here:

  - per-model values (weight, density, epsilon, ...): per input slot, a filtered list with the entries of each
    slice but the last restricted to that slice's output layers (a conjunction with the entry's own filter), and
    the last slice's entries after them unrestricted (every tensor of an earlier slice is caught by its slice's
    catch-all entry first);
  - shared params: the last slice's as ``params`` and its overrides, preceded by one override per earlier slice
    (and per override of that slice, restricted to the slice) that sets that slice's full params.

Gradients keep their positions within each slice (``merge_ops.slices.gradient_positions``). A per-model filter
naming a layer number is refused when a slice renumbers layers: mergekit matches per-model filters on the
source's tensor name, Alloy on the output's.
"""

from __future__ import annotations

import re
from typing import Any

from merge_ops.params import CATALOG

Fail = Any  # (loc, msg) -> None
#: block names of merge_ops.lines.BLOCK_PATTERN (decoder layers across architectures)
_BLOCK = r"(?:^|\.)(?:layers|layer|h|blocks|block|resblocks)\."
#: tensors before the layers, which mergekit takes from the first slice (merge_ops.slices.PRE_LAYER_TENSOR)
_PRE_LAYER = r"(?:embed_tokens|embed_in|embed_positions|wte|wpe|word_embeddings|tok_embeddings)\."
#: per-model values a slot may carry outside ``params``
_FIELDS = ("weight", "density")


def slice_region(first: int, length: int, *, with_pre_layer: bool) -> str:
    """A regex matching the output tensors of a slice of ``length`` layers starting at output layer ``first``."""
    layers = "|".join(str(i) for i in range(first, first + length))
    region = f"{_BLOCK}(?:{layers})\\."
    return f"(?:{region}|{_PRE_LAYER})" if with_pre_layer else region


def conjunction(region: str, pattern: str | None) -> str:
    """A filter matching names in ``region`` that also match ``pattern`` (None: every name), in the look-ahead
    form ``merge_ops.patterns`` evaluates as a conjunction of RE2 searches."""
    head = f"^(?=.*(?:{region}))"
    if pattern is None:
        return head
    if pattern.startswith("^(?"):
        return head + pattern[1:]  # already a conjunction (merge_ops.mergekit_values.expand_filters)
    return f"{head}(?=.*(?:{pattern}))"


def join_slice_recipes(
    recipes: list[dict[str, Any]], lengths: list[int], renumbered: bool, fail: Fail
) -> dict[str, Any]:
    """One recipe equal to ``recipes[i]`` on the tensors of slice ``i`` (``lengths``: layers per slice)."""
    first, last = recipes[0], recipes[-1]
    if renumbered:
        _refuse_layer_filters(recipes, fail)
    if all(_merge_part(r) == _merge_part(first) for r in recipes):
        return first
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    regions = [
        slice_region(start, n, with_pre_layer=i == 0)
        for i, (start, n) in enumerate(zip(starts, lengths, strict=True))
    ]
    joined = {k: v for k, v in last.items() if k not in ("params", "overrides", "models")}
    joined["params"] = dict(last.get("params") or {})
    joined["overrides"] = _joined_overrides(recipes, regions, fail)
    if not joined["overrides"]:
        joined.pop("overrides")
    joined["models"] = _joined_models(recipes, regions, fail)
    return joined


def _merge_part(recipe: dict[str, Any]) -> Any:
    """What differs between slices: params, overrides and the models' values (not their sources)."""
    models = [{k: v for k, v in m.items() if k != "source"} for m in recipe.get("models") or []]
    return recipe.get("params"), recipe.get("overrides"), models


def _joined_overrides(recipes: list[dict[str, Any]], regions: list[str], fail: Fail) -> list[dict[str, Any]]:
    last = recipes[-1]
    if all(
        (r.get("params"), r.get("overrides")) == (last.get("params"), last.get("overrides")) for r in recipes
    ):
        return list(last.get("overrides") or [])  # only the models' values differ
    method = last.get("method")
    keys = set().union(*((r.get("params") or {}).keys() for r in recipes))
    overrides: list[dict[str, Any]] = []
    for i, (recipe, region) in enumerate(zip(recipes[:-1], regions[:-1], strict=True)):
        params = dict(recipe.get("params") or {})
        for key in sorted(keys - params.keys()):  # unset in this slice: the params model's default
            default = _default(method, key)
            if default is _MISSING:
                fail(
                    ["slices", i, "parameters", key], f"{key} is set in another slice but has no default here"
                )
                continue
            params[key] = default
        for override in recipe.get("overrides") or []:
            overrides.append(
                {
                    "filter": conjunction(region, override["filter"]),
                    "params": {**params, **override["params"]},
                }
            )
        overrides.append({"filter": conjunction(region, None), "params": params})
    return overrides + list(last.get("overrides") or [])


_MISSING = object()


def _default(method: Any, key: str) -> Any:
    info = CATALOG.get(method) if isinstance(method, str) else None
    if info is None:
        return _MISSING
    for name, f in info.params.model_fields.items():
        if key in (name, f.alias):
            return _MISSING if f.is_required() else f.get_default(call_default_factory=True)
    return _MISSING


def _refuse_layer_filters(recipes: list[dict[str, Any]], fail: Fail) -> None:
    for i, recipe in enumerate(recipes):
        for j, model in enumerate(recipe.get("models") or []):
            for key, value in (model.get("params") or {}).items():
                if _names_a_layer(value):
                    fail(
                        ["slices", i, "sources", j, "parameters", key],
                        "a per-model filter naming a layer number is not supported when a slice renumbers layers "
                        "(mergekit matches it on the source's tensor name, Alloy on the output's)",
                    )


def _joined_models(recipes: list[dict[str, Any]], regions: list[str], fail: Fail) -> list[dict[str, Any]]:
    slots = len(recipes[-1].get("models") or [])
    out = []
    for j in range(slots):
        per_slice = [(r.get("models") or [])[j] for r in recipes]
        entry: dict[str, Any] = {k: v for k, v in per_slice[0].items() if k not in (*_FIELDS, "params")}
        keys = set().union(*(set(m.get("params", {})) | (set(_FIELDS) & set(m)) for m in per_slice))
        params: dict[str, Any] = {}
        for key in sorted(keys):
            values = [_slot_value(m, r, key) for m, r in zip(per_slice, recipes, strict=True)]
            if all(v == values[0] for v in values):
                if values[0] is not None:
                    _place(entry, params, key, values[0])
                continue
            entries: list[dict[str, Any]] = []
            for i, (value, region) in enumerate(zip(values, regions, strict=True)):
                if value is None:
                    fail(
                        ["slices", i, "sources", j, "parameters", key],
                        f"{key} is unset here but set in another slice",
                    )
                    break
                if i == len(values) - 1:
                    entries += _as_entries(value)
                    continue
                restricted = _as_entries(value)
                if restricted[-1].get("filter") is not None:
                    fail(
                        ["slices", i, "sources", j, "parameters", key],
                        f"a filtered {key} with no catch-all entry is not supported when slices differ",
                    )
                    break
                entries += [{**e, "filter": conjunction(region, e.get("filter"))} for e in restricted]
            params[key] = entries
        if params:
            entry["params"] = params
        out.append(entry)
    return out


def _slot_value(model: dict[str, Any], recipe: dict[str, Any], key: str) -> Any:
    """A slot's value of ``key`` in one slice: its own, else the method-level value (hoisted shared values)."""
    own = model.get("params", {}).get(key, model.get(key))
    return own if own is not None else (recipe.get("params") or {}).get(key)


def _place(entry: dict[str, Any], params: dict[str, Any], key: str, value: Any) -> None:
    if key in _FIELDS and isinstance(value, float):
        entry[key] = value
    else:
        params[key] = value


def _as_entries(value: Any) -> list[dict[str, Any]]:
    """A per-model value (number, gradient or filtered list) as filtered-list entries."""
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return [dict(e) for e in value]
    return [{"value": value}]


def _names_a_layer(value: Any) -> bool:
    return any(re.search(r"\d", e.get("filter") or "") for e in _as_entries(value))
