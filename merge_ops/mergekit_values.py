"""mergekit parameter settings as first-match chains, and their Alloy forms (``merge_ops.mergekit_compat``).

A chain is ``[(substring filter or None, value or gradient), ...]``: the first entry whose filter is a substring
of the tensor name (None: every tensor) wins; no entry matching means the next place mergekit reads (a model's
own parameters, then the top level, then the default).
"""

from __future__ import annotations

import itertools
import math
import re
from typing import Any

from merge_ops.errors import RecipeError
from merge_ops.mergekit_methods import REQUIRED, MkMethod

#: A resolved mergekit setting: (substring filter or None for every tensor, value or gradient), first match wins.
Chain = list[tuple[str | None, Any]]


def truncate(chain: Chain) -> Chain:
    """Entries after a catch-all are unreachable."""
    for i, (pattern, _) in enumerate(chain):
        if pattern is None:
            return chain[: i + 1]
    return chain


def covers_all(chain: Chain) -> bool:
    return any(pattern is None and value is not None and value is not REQUIRED for pattern, value in chain)


def alloy_value(chain: Chain, default: Any) -> Any:
    """A chain as an Alloy value: a number, a gradient, or a filtered list ending with the default."""
    chain = truncate(chain)
    if not chain:
        return None if default is REQUIRED or default is None else float(default)
    if chain[0][0] is None:
        return chain[0][1]
    entries: list[dict[str, Any]] = [
        {"filter": re.escape(pattern), "value": value} for pattern, value in chain if pattern is not None
    ]
    if chain[-1][0] is None:
        entries.append({"value": chain[-1][1]})
    elif default is not None and default is not REQUIRED:
        entries.append({"value": float(default)})
    return entries


def anchors(chain: Chain, default: float) -> list[float]:
    values: list[float] = []
    for _, value in truncate(chain):
        values += value if isinstance(value, list) else [value]
    if not covers_all(truncate(chain)):
        values.append(default)
    return [float(v) for v in values]


#: Most overrides one mergekit config may expand to (merge_ops.recipe.MAX_OVERRIDES).
MAX_FILTER_COMBINATIONS = 256


def expand_filters(filtered: dict[str, Chain], mk: MkMethod) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Filtered shared params as base params plus mutually exclusive overrides (one per combination of
    first-matching entries, written as look-ahead regexes; the all-unmatched combination is the base)."""
    options_by_key: dict[str, list[tuple[str | None, Any]]] = {}
    for key, chain in filtered.items():
        options = [
            (re.escape(pattern) if pattern is not None else None, value) for pattern, value in truncate(chain)
        ]
        if not options or options[-1][0] is not None:
            p = mk.param(key)
            options.append((None, p.default if p is not None and p.default is not REQUIRED else None))
        options_by_key[key] = options
    keys = list(options_by_key)
    combinations = math.prod(len(options_by_key[k]) for k in keys)
    if combinations > MAX_FILTER_COMBINATIONS:
        # one override per combination: bound it before building them (a few lists multiply fast)
        msg = (
            f"filtered parameters give {combinations} combinations of entries; at most "
            f"{MAX_FILTER_COMBINATIONS} are supported (use fewer filtered parameters or entries)"
        )
        raise RecipeError(
            f"unsupported mergekit config: parameters: {msg}", errors=[{"loc": ["parameters"], "msg": msg}]
        )
    base: dict[str, Any] = {}
    overrides = []
    for choice in itertools.product(*(range(len(options_by_key[k])) for k in keys)):
        conditions: list[str] = []
        params: dict[str, Any] = {}
        for key, index in zip(keys, choice, strict=True):
            options = options_by_key[key]
            conditions += [f"(?!.*(?:{p}))" for p, _ in options[:index] if p is not None]
            pattern, value = options[index]
            if pattern is not None:
                conditions.append(f"(?=.*(?:{pattern}))")
            if value is not None:
                params[key] = value
        if all(options_by_key[k][i][0] is None for k, i in zip(keys, choice, strict=True)):
            base.update(params)
        else:
            overrides.append({"filter": "^" + "".join(conditions), "params": params})
    return base, overrides
