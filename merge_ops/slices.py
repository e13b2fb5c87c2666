"""Layer slices: the output model is a stack of layer ranges taken from the inputs (mergekit's ``slices``).

A recipe with ``slices`` builds its output one slice after another::

    slices:
      - sources:
          - {source: ./base, layers: [0, 16]}          # the recipe's base: θ_0 of this slice
          - {source: ./math, layers: [0, 16], weight: 0.6}
          - {source: ./code, layers: [0, 16], weight: 0.4}
      - sources:
          - {source: ./base, layers: [16, 24]}
          - {source: ./math, layers: [8, 16], weight: 0.6}   # any range of the same length
          - {source: ./code, layers: [16, 24], weight: 0.4}

Output layer ``n + i`` of a slice (``n`` layers before it) merges layer ``start + i`` of each of its sources.
A source equal to the recipe's ``base`` (or to the slice's own ``base``: mergekit's per-slice ``base_model``) is θ_0
for that slice (mergekit's rule: the base must be one of the sources of every slice when the method uses a base);
the other sources are the slice's inputs, in order. Alloy merges
input by input position ("slot"): every slice has the same number of inputs, and input j has the same weight and
density in every slice (the engine's weights are per input). Non-layer tensors follow mergekit: embeddings (the
tensors before the layers) come from the first slice's sources, everything else (final norm, lm_head) from the
last slice's. ``config.json`` gets the output's layer count.

This module is torch-free (the API validates recipes with it): the pydantic models, the derivation of the
recipe's per-input ``models`` from the slices, and the layer plan (which input tensor feeds each output tensor).
The sources that read through the plan are in ``merge_ops.structured_sources``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from merge_ops.lines import BLOCK_PATTERN

#: Non-layer tensors that sit before the layers (taken from the first slice); every other one is after them.
PRE_LAYER_TENSOR = re.compile(
    r"(embed_tokens|embed_in|embed_positions|wte|wpe|word_embeddings|tok_embeddings)\."
)
#: config.json keys that hold the layer count, by architecture family (the first one present is updated).
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


class SliceSource(BaseModel):
    """One model's contribution to a slice: its layers ``[start, end)`` (0-based, end excluded)."""

    model_config = ConfigDict(extra="forbid")

    source: str | dict[str, Any] = Field(
        description="A path, hf://org/name@rev or {repo, revision, subfolder}."
    )
    layers: tuple[int, int] = Field(description="[start, end) of this model's layers.")
    lora: str | dict[str, Any] | None = Field(
        None, description="A PEFT LoRA adapter merged into this model before merging."
    )
    weight: float | None = Field(None, ge=-100, le=100, description="w of this input (default 1).")
    density: float | None = Field(None, gt=0, le=1, description="Per-input override of params.density.")
    params: dict[str, Any] = Field(
        default_factory=dict, description="Per-input params, as a model entry's (same in every slice)."
    )

    @field_validator("source", "lora")
    @classmethod
    def _parse(cls, value: Any) -> Any:
        from merge_ops.recipe import HubSource, parse_source  # recipe imports this module

        if isinstance(value, dict):
            HubSource.model_validate(value)
        elif value is not None:
            parse_source(value)
        return value

    @model_validator(mode="after")
    def _range(self) -> SliceSource:
        start, end = self.layers
        if start < 0 or end <= start:
            raise ValueError(f"layers must be [start, end) with 0 <= start < end, got {list(self.layers)}")
        return self

    @property
    def length(self) -> int:
        return self.layers[1] - self.layers[0]


class SliceSpec(BaseModel):
    """One output slice: the same number of layers from each of its sources."""

    model_config = ConfigDict(extra="forbid")

    sources: list[SliceSource] = Field(min_length=1)
    base: str | dict[str, Any] | None = Field(
        None,
        description="The source of this slice that is θ_0 (mergekit's per-slice base_model); default: the "
        "recipe's base.",
    )
    base_lora: str | dict[str, Any] | None = Field(
        None, description="The LoRA adapter of this slice's base, when its source is a model+lora."
    )

    @field_validator("base", "base_lora")
    @classmethod
    def _parse_base(cls, value: Any) -> Any:
        return SliceSource._parse(value)

    @model_validator(mode="after")
    def _same_length(self) -> SliceSpec:
        lengths = {s.length for s in self.sources}
        if len(lengths) > 1:
            raise ValueError(
                f"every source of a slice must give the same number of layers, got {sorted(lengths)}"
            )
        return self

    @property
    def length(self) -> int:
        return self.sources[0].length


def _same_source(a: Any, b: Any) -> bool:
    return a == b or (isinstance(a, dict) and isinstance(b, dict) and a.items() == b.items())


def split_slice(
    spec: SliceSpec, base: Any, base_lora: Any = None
) -> tuple[SliceSource | None, list[SliceSource]]:
    """(the base's entry or None, the inputs in order) of one slice: the base is the source equal to ``base``
    with the base's LoRA (``x`` and ``x`` + a LoRA are two models), or to the slice's own ``base``."""
    if spec.base is not None:
        base, base_lora = spec.base, spec.base_lora
    base_entry = next(
        (
            s
            for s in spec.sources
            if base is not None and _same_source(s.source, base) and _same_source(s.lora, base_lora)
        ),
        None,
    )
    return base_entry, [s for s in spec.sources if s is not base_entry]


def derive_models(data: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[tuple[str | int, ...], str]]]:
    """A recipe dict with ``slices``: fill ``models`` with one entry per input slot (its first slice's source,
    weight, density and LoRA), so weights and per-model densities reach the engine unchanged.

    Returns the new dict and the problems found, as ``(loc, message)``; the dict is returned unchanged when the
    slices are malformed (the field validation reports that)."""
    raw = data.get("slices")
    if raw is None:
        return data, []
    try:
        specs = [SliceSpec.model_validate(s) for s in raw]
    except Exception:  # noqa: BLE001 - pydantic reports the exact problem when the field is validated
        return data, []
    if not specs:
        return data, [(("slices",), "slices must not be empty")]
    problems: list[tuple[tuple[str | int, ...], str]] = []
    base = data.get("base")
    slots: list[dict[str, Any]] | None = None
    for i, spec in enumerate(specs):
        base_entry, inputs = split_slice(spec, base, data.get("base_lora"))
        slice_base = spec.base if spec.base is not None else base
        if slice_base is not None and base_entry is None and data.get("method") not in _NO_BASE_METHODS:
            problems.append(
                (
                    (("slices", i, "sources")),
                    "the base must be one of the sources of every slice (its layers are θ_0)",
                )
            )
        if not inputs:
            problems.append(
                ((("slices", i, "sources")), "a slice needs at least one source besides the base")
            )
            continue
        entries = [_slot_entry(s) for s in inputs]
        if slots is None:
            slots = entries
            continue
        if len(entries) != len(slots):
            problems.append(
                (
                    ("slices", i, "sources"),
                    f"every slice must have the same number of inputs besides the base ({len(slots)} in slice 0, "
                    f"{len(entries)} here): Alloy merges the inputs position by position",
                )
            )
            continue
        for j, (entry, first) in enumerate(zip(entries, slots, strict=True)):
            for key in ("weight", "density", "params"):
                if entry.get(key) != first.get(key):
                    problems.append(
                        (
                            ("slices", i, "sources", j, key),
                            f"input {j} has {key} {entry.get(key)} here but {first.get(key)} in slice 0; "
                            "an input's weight, density and params must be the same in every slice",
                        )
                    )
    if data.get("models") and not _same_models(data["models"], slots or []):
        problems.append((("slices",), "set either models or slices, not both (slices list their sources)"))
    return {**data, "models": slots or []}, problems


def _same_models(written: Any, derived: list[dict[str, Any]]) -> bool:
    """A stored (dumped) sliced recipe carries its derived models: those are accepted, nothing else."""
    from merge_ops.recipe import ModelEntry  # recipe imports this module

    try:
        return [ModelEntry.model_validate(m) for m in written] == [
            ModelEntry.model_validate(m) for m in derived
        ]
    except Exception:  # noqa: BLE001 - malformed entries are not the derived ones
        return False


#: methods that merge without a base (the base need not be a source of each slice)
_NO_BASE_METHODS = {"linear", "model_soup", "greedy_soup", "passthrough"}


def _slot_entry(src: SliceSource) -> dict[str, Any]:
    entry: dict[str, Any] = {"source": src.source}
    if src.weight is not None:
        entry["weight"] = src.weight
    if src.density is not None:
        entry["density"] = src.density
    if src.params:
        entry["params"] = src.params
    if src.lora is not None:
        entry["lora"] = src.lora
    return entry


# ---------------------------------------------------------------------------------------------------------------
# the layer plan


@dataclass(frozen=True)
class Feed:
    """Where one output tensor comes from: ``key`` identifies a source (its position in ``SlicePlan.sources``)."""

    key: int
    name: str


@dataclass
class SlicePlan:
    """Per slot (and for θ_0), every output tensor name -> the source tensor that feeds it."""

    #: the distinct (source, lora) pairs to open, in first-use order
    sources: list[tuple[Any, Any]]
    reference: dict[str, Feed] | None
    slots: list[dict[str, Feed]]
    num_layers: int


def rename_layer(name: str, index: int) -> str:
    """``name`` with its block index replaced by ``index``."""
    match = BLOCK_PATTERN.search(name)
    assert match is not None
    return f"{name[: match.start(2)]}{index}{name[match.end(2) :]}"


def layer_of(name: str) -> int | None:
    match = BLOCK_PATTERN.search(name)
    return int(match.group(2)) if match else None


def plan_slices(
    specs: list[SliceSpec],
    base: Any,
    names_of: Callable[[int, tuple[Any, Any]], Iterable[str]],
    base_lora: Any = None,
) -> SlicePlan:
    """The layer plan of ``specs``. ``names_of(key, (source, lora))`` lists the tensor names of the source
    numbered ``key`` (from its headers; called once per source and tensor table)."""
    keys: list[tuple[Any, Any]] = []

    def key_of(src: SliceSource) -> int:
        pair = (src.source, src.lora)
        for k, known in enumerate(keys):
            if _same_source(known[0], pair[0]) and _same_source(known[1], pair[1]):
                return k
        keys.append(pair)
        return len(keys) - 1

    split = [split_slice(spec, base, base_lora) for spec in specs]
    has_base = all(b is not None for b, _ in split)
    k = len(split[0][1])
    reference: dict[str, Feed] | None = {} if has_base else None
    slots: list[dict[str, Feed]] = [{} for _ in range(k)]
    offset = 0
    last = len(specs) - 1
    for i, (spec, (base_entry, inputs)) in enumerate(zip(specs, split, strict=True)):
        targets: list[tuple[dict[str, Feed], SliceSource]] = [(slots[j], s) for j, s in enumerate(inputs)]
        if reference is not None and base_entry is not None:
            targets.append((reference, base_entry))
        for table, src in targets:
            key = key_of(src)
            _feed_slice(table, key, names_of(key, keys[key]), src, offset, first=i == 0, last=i == last)
        offset += spec.length
    return SlicePlan(sources=keys, reference=reference, slots=slots, num_layers=offset)


def _feed_slice(
    table: dict[str, Feed],
    key: int,
    names: Iterable[str],
    src: SliceSource,
    offset: int,
    *,
    first: bool,
    last: bool,
) -> None:
    start, end = src.layers
    for name in names:
        layer = layer_of(name)
        if layer is None:
            pre = PRE_LAYER_TENSOR.search(name) is not None
            if (pre and first) or (not pre and last):
                table[name] = Feed(key, name)
        elif start <= layer < end:
            table[rename_layer(name, offset + layer - start)] = Feed(key, name)


def layer_count_problems(specs: list[SliceSpec], counts: dict[int, int], plan: SlicePlan) -> list[str]:
    """Ranges past a model's last layer (``counts``: source key -> its number of layers)."""
    problems = []
    for i, spec in enumerate(specs):
        for j, src in enumerate(spec.sources):
            key = next(
                k
                for k, (s, lora) in enumerate(plan.sources)
                if _same_source(s, src.source) and _same_source(lora, src.lora)
            )
            if src.layers[1] > counts.get(key, 0):
                problems.append(
                    f"slices[{i}].sources[{j}].layers: {list(src.layers)} goes past the model's "
                    f"{counts.get(key, 0)} layers"
                )
    return problems


def gradient_positions(recipe: Any, names: Iterable[str]) -> dict[str, Any] | None:
    """For a recipe with ``slices``: each output layer tensor's position for gradients, within its own slice
    (mergekit's ``t = i / (n - 1)`` over the slice's n layers, and ``t = 1`` for a one-layer slice); None for
    other recipes (positions over the whole stack). LiNeS keeps the whole output's depth."""
    if getattr(recipe, "slices", None) is None:
        return None
    from merge_ops.lines import BlockPosition, find_block

    bounds: list[tuple[int, int]] = []  # (first output layer, length) per slice
    start = 0
    for spec in recipe.slices:
        length = spec.length if isinstance(spec, SliceSpec) else SliceSpec.model_validate(spec).length
        bounds.append((start, length))
        start += length
    positions: dict[str, Any] = {}
    for name in names:
        block = find_block(name)
        if block is None:
            continue
        stack, index = block
        first, length = next((f, n) for f, n in bounds if f <= index < f + n)
        # a one-layer slice sits at the end of a two-point ramp: t = 1, as mergekit sets it
        depth, num = (1, 2) if length == 1 else (index - first, length)
        positions[name] = BlockPosition(stack, index, depth, num)
    return positions
