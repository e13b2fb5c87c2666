"""mergekit's structural fields -> Alloy's: ``slices``/``layer_range``, ``modules``, ``model+lora`` references.

Called from ``merge_ops.mergekit_compat.translate_mergekit`` through two hooks: ``extract_structure`` runs first
and hands the parameter translation a plain ``models:`` config (one entry per input slot, from the first slice);
``apply_structure`` runs last and puts the slices and LoRA adapters into the Alloy recipe.

mergekit 0.1.5 semantics kept here (``plan.py``, ``config.py``, ``common.py``):
  - ``slices: [{sources: [{model, layer_range: [a, b], parameters}], parameters, base_model}]``: output layer
    ``n + i`` of a slice merges layer ``a + i`` of each source; every source of a slice spans the same number of
    layers; the base model must be one of the sources of each slice (it is θ_0 there); embeddings come from the
    first slice's sources, the final norm and lm_head from the last slice's; ``num_hidden_layers`` is the sum of
    the slice lengths.
  - ``modules: {<module>: {slices | models, parameters}}`` is the same for a single-module architecture (the
    decoder-only models Alloy merges have one, ``default``).
  - Parameters resolve source > slice > module > top level. A gradient's position ``t`` runs over the layers of its
    own slice (``t = 1`` in a one-layer slice): ``merge_ops.slices.gradient_positions``.
  - ``model+lora`` is the model with the PEFT adapter merged in (``merge_and_unload``) before merging; it is
    another model than the bare one (the base ``x`` and an input ``x+lora`` are two models).
  - Slice-level and per-source parameters that differ between slices: each slice is translated on its own and
    the translations are joined with filters on the output layers of each slice (``merge_ops.mergekit_slices``).
  - A per-slice ``base_model`` is θ_0 of that slice (the native slice's ``base``), and the model that slice's
    non-base parameters skip.
What Alloy can't express yet is refused, naming the field: a per-slice ``base_model`` without a top-level one, and
several modules.
``residual_weight`` (an ``OutputSliceDefinition`` field mergekit 0.1.5 never reads) is accepted with a warning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Fail = Any  # (loc, msg) -> None, from translate_mergekit
_NO_BASE_METHODS = {"linear", "passthrough"}


@dataclass
class Structure:
    """What ``extract_structure`` took out of the config, for ``apply_structure``."""

    #: per output slice: [(raw model reference, lora reference or None, layer_range)] (base entries included)
    slices: list[list[tuple[str, str | None, tuple[int, int]]]] | None = None
    #: stand-ins for ``model+lora`` references -> (model, lora): the parameter translation sees one distinct
    #: reference per pair (as mergekit's ``ModelReference`` equality), never a '+'
    stand_ins: dict[str, tuple[str, str]] = field(default_factory=dict)
    base: str | None = None
    base_lora: str | None = None
    #: slices configs: the position in slice 0's sources of each input the translation sees as models[j]
    slot_sources: list[int] = field(default_factory=list)
    #: slices configs, per slice: the ``models:`` form of that slice (its inputs with their own parameters, the
    #: slice's parameters ahead of the top-level ones), and where its inputs sit in its sources. Slices that
    #: differ are translated one by one and joined by ``merge_ops.mergekit_slices``.
    slice_configs: list[dict[str, Any]] = field(default_factory=list)
    slice_slot_sources: list[list[int]] = field(default_factory=list)
    #: per slice, its own base (model, lora) where mergekit's per-slice base_model differs from the top-level one
    slice_bases: list[tuple[str, str | None] | None] = field(default_factory=list)
    #: which slice a translation of one slice reports its locations in (``slice_loc``)
    slice_index: int = 0

    def reference(self, model: str, lora: str | None) -> str:
        if lora is None:
            return model
        for key, pair in self.stand_ins.items():
            if pair == (model, lora):
                return key
        key = f"/alloy-lora-reference/{len(self.stand_ins)}"  # a path-like string: translated unchanged
        self.stand_ins[key] = (model, lora)
        return key

    #: the native ``tokenizer`` spec with its raw ``source`` (translated in ``apply_structure``), and the template
    tokenizer: dict[str, Any] | None = None
    chat_template: str | None = None


def split_lora(ref: Any) -> tuple[Any, str | None]:
    """mergekit's ``<model>+<lora>`` reference -> (model, lora); other values unchanged."""
    if isinstance(ref, str) and "+" in ref:
        model, _, lora = ref.partition("+")
        return model, lora
    return ref, None


def extract_structure(
    data: dict[str, Any], fail: Fail, warn: Fail | None = None
) -> tuple[dict[str, Any], Structure]:
    """A copy of ``data`` in the ``models:`` form the parameter translation handles, and the structure taken out;
    ``warn(loc, msg)`` hears of the fields mergekit accepts and ignores."""
    out = dict(data)
    structure = Structure()
    base, base_lora = split_lora(data.get("base_model"))
    if base is not None and isinstance(base, str):
        out["base_model"] = structure.reference(base, base_lora)
    raw_params = data.get("parameters")
    top_params: dict[str, Any] = raw_params if isinstance(raw_params, dict) else {}
    # methods that ignore the base (or have none) take every slice source as an input
    if data.get("merge_method") in _NO_BASE_METHODS:
        base = base_lora = None
    structure.base = base if isinstance(base, str) else None
    structure.base_lora = base_lora if structure.base is not None else None

    _extract_tokenizer(out, structure, fail)
    modules = out.pop("modules", None)
    if modules is not None:
        if not isinstance(modules, dict) or len(modules) != 1:
            fail(["modules"], "Alloy merges single-module models: modules must have exactly one entry")
            return out, structure
        ((name, module),) = modules.items()
        if not isinstance(module, dict):
            fail(["modules", name], "must be a mapping with slices or models")
            return out, structure
        if module.get("parameters"):
            # module parameters come before the top-level ones (mergekit's precedence)
            out["parameters"] = top_params = layered_parameters(module["parameters"], top_params)
        if module.get("models") is not None:
            out["models"] = module["models"]
        if module.get("slices") is not None:
            out["slices"] = module["slices"]

    slices = out.pop("slices", None)
    if slices is not None and base is None:
        # the translation of a base-less method must not add the base as one more input: mergekit's slices
        # merge exactly their sources
        out.pop("base_model", None)
    if slices is not None:
        if out.get("models"):
            fail(["slices"], "mergekit takes exactly one of models, slices or modules")
            return out, structure
        out["models"] = _slices_to_models(slices, base, top_params, out, structure, fail, warn)
    listed = out.get("models")
    if isinstance(listed, list):
        cleaned = []
        for entry in listed:
            if isinstance(entry, dict) and "model" in entry:
                model, lora = split_lora(entry["model"])
                if lora is not None:
                    entry = {**entry, "model": structure.reference(model, lora)}
            cleaned.append(entry)
        out["models"] = cleaned
    return out, structure


def layered_parameters(high: Any, low: dict[str, Any]) -> dict[str, Any]:
    """``parameters`` of a scope read before ``low`` (a slice's or module's before the top level): mergekit reads
    each key in the first scope that gives it a value for the tensor, so a filtered list with no catch-all entry
    falls through to the next scope where none of its filters matches (the lists are joined in order)."""
    if not isinstance(high, dict):
        return dict(low)
    out = {**low, **high}
    for key, value in high.items():
        if key not in low:
            continue
        entries = [value] if isinstance(value, dict) else value
        if not (isinstance(entries, list) and entries and all(isinstance(e, dict) for e in entries)):
            continue  # a number or a gradient: every tensor's value
        if any(e.get("filter") in (None, "*") for e in entries):
            continue  # a catch-all entry: the next scope is never read
        below = low[key]
        below_entries = (
            [below]
            if isinstance(below, dict)
            else below
            if isinstance(below, list) and below and all(isinstance(e, dict) for e in below)
            else [{"value": below}]
        )
        out[key] = [*entries, *below_entries]
    return out


def _extract_tokenizer(out: dict[str, Any], structure: Structure, fail: Fail) -> None:
    """``tokenizer_source`` / ``tokenizer: {source, tokens, pad_to_multiple_of}`` / ``chat_template``."""
    source = out.pop("tokenizer_source", None)
    block = out.pop("tokenizer", None)
    template = out.pop("chat_template", None)
    if source is not None and block is not None:
        fail(["tokenizer"], "mergekit takes tokenizer_source or tokenizer, not both")
    elif block is not None:
        if not isinstance(block, dict):
            fail(["tokenizer"], "must be a mapping {source, tokens, pad_to_multiple_of}")
        else:
            for key in block:
                if key not in ("source", "tokens", "pad_to_multiple_of"):
                    fail(["tokenizer", key], f"tokenizer field {key!r} is not supported by mergekit")
            spec: dict[str, Any] = {"source": block.get("source", "union")}
            if block.get("pad_to_multiple_of") is not None:
                spec["pad_to_multiple_of"] = block["pad_to_multiple_of"]
            if block.get("tokens"):
                spec["tokens"] = _tokens(block["tokens"], fail)
            structure.tokenizer = spec
    elif source is not None:
        structure.tokenizer = {"source": source}
    if structure.tokenizer is not None and not isinstance(structure.tokenizer["source"], str):
        fail(
            ["tokenizer_source" if source is not None else "tokenizer"],
            "the source must be base, union or a model",
        )
        structure.tokenizer = None
    if template is not None:
        from merge_ops.tokenizer import chat_template_problem

        if not isinstance(template, str):
            fail(["chat_template"], "must be a string")
        elif why := chat_template_problem(template):
            fail(["chat_template"], why)
        else:
            structure.chat_template = template


def _tokens(tokens: Any, fail: Fail) -> dict[str, Any]:
    """mergekit's ``tokenizer.tokens`` with the model references translated (the native form is the same)."""
    if not isinstance(tokens, dict):
        fail(["tokenizer", "tokens"], "must be a mapping of token -> {source, force}")
        return {}
    out: dict[str, Any] = {}
    for token, entry in tokens.items():
        loc: list[str | int] = ["tokenizer", "tokens", str(token)]
        if not isinstance(entry, dict) or "source" not in entry:
            fail(loc, "each token needs a source (a model, {kind: model_token, ...} or {kind: zero})")
            continue
        src = entry["source"]
        if isinstance(src, str):
            src = _alloy_source(src)
        elif isinstance(src, dict) and isinstance(src.get("model"), str):
            src = {**src, "model": _alloy_source(src["model"])}
        out[str(token)] = {**entry, "source": src}
    return out


def _slices_to_models(
    slices: Any,
    base: Any,
    top_params: dict[str, Any],
    out: dict[str, Any],
    structure: Structure,
    fail: Fail,
    warn: Fail | None,
) -> list[dict[str, Any]]:
    if not isinstance(slices, list) or not slices:
        fail(["slices"], "slices must be a non-empty list of {sources: [...]}")
        return []
    plan: list[list[tuple[str, str | None, tuple[int, int]]]] = []
    slots: list[dict[str, Any]] | None = None
    for i, spec in enumerate(slices):
        loc: list[str | int] = ["slices", i]
        if not isinstance(spec, dict) or not isinstance(spec.get("sources"), list) or not spec["sources"]:
            fail(loc, "each slice needs a non-empty sources list")
            continue
        for key in spec:
            if key == "residual_weight":
                # a field of mergekit 0.1.5's OutputSliceDefinition that nothing in mergekit reads
                if warn is not None and spec[key] is not None:
                    warn([*loc, key], "mergekit 0.1.5 accepts residual_weight and ignores it; so does Alloy")
            elif key not in ("sources", "parameters", "base_model"):
                fail([*loc, key], f"slice field {key!r} is not supported by Alloy")
        # mergekit's per-slice base_model: θ_0 of this slice (and the model its non-base parameters skip)
        own_base, own_lora = split_lora(spec.get("base_model"))
        slice_base, slice_lora = base, structure.base_lora
        if own_base is not None and (own_base, own_lora) != (base, structure.base_lora):
            if base is None:
                fail(
                    [*loc, "base_model"],
                    "a per-slice base_model needs a top-level base_model in Alloy (and a method that uses one)",
                )
            elif not isinstance(own_base, str):
                fail([*loc, "base_model"], "a model reference must be a string")
            else:
                slice_base, slice_lora = own_base, own_lora
        structure.slice_bases.append(
            (slice_base, slice_lora) if (slice_base, slice_lora) != (base, structure.base_lora) else None
        )
        slice_params = spec.get("parameters") or {}
        if not isinstance(slice_params, dict):
            fail([*loc, "parameters"], "must be a mapping")
            slice_params = {}
        entries: list[tuple[str, str | None, tuple[int, int]]] = []
        inputs: list[dict[str, Any]] = []
        slot_sources: list[int] = []
        for j, src in enumerate(spec["sources"]):
            sloc = [*loc, "sources", j]
            if not isinstance(src, dict) or "model" not in src or "layer_range" not in src:
                fail(sloc, "each slice source needs model and layer_range")
                continue
            for key in src:
                if key not in ("model", "layer_range", "parameters"):
                    fail([*sloc, key], f"slice source field {key!r} is not supported by Alloy")
            layer_range = src["layer_range"]
            if (
                not isinstance(layer_range, list | tuple)
                or len(layer_range) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in layer_range)
            ):
                fail([*sloc, "layer_range"], "layer_range must be [start, end] (integers)")
                continue
            model, lora = split_lora(src["model"])
            entries.append((model, lora, (int(layer_range[0]), int(layer_range[1]))))
            if slice_base is not None and (model, lora) == (slice_base, slice_lora):
                continue  # θ_0 of this slice
            slot_sources.append(j)
            inputs.append(
                {"model": structure.reference(model, lora), "parameters": src.get("parameters") or {}}
            )
        if slice_base is not None and entries and len(inputs) == len(entries):
            fail(
                [*loc, "sources"],
                "base_model must be one of the sources of every slice (mergekit 0.1.5: base input is not "
                "present in merge inputs); add it with the slice's layer_range",
            )
        plan.append(entries)
        # the slice's parameters come before the top-level ones (mergekit's precedence)
        config = {**out, "models": inputs, "parameters": layered_parameters(slice_params, top_params)}
        if structure.slice_bases[-1] is not None:
            config["base_model"] = structure.reference(slice_base, slice_lora)
        structure.slice_configs.append(config)
        structure.slice_slot_sources.append(slot_sources)
        if slots is None:
            slots = inputs
        elif len(inputs) != len(slots):
            fail(
                [*loc, "sources"],
                f"every slice must have the same number of sources besides the base ({len(slots)} in slice 0, "
                f"{len(inputs)} here): Alloy merges the sources position by position",
            )
    structure.slices = plan
    if structure.slice_configs:
        structure.slot_sources = structure.slice_slot_sources[0]
        out["parameters"] = structure.slice_configs[0]["parameters"]
        if "base_model" in structure.slice_configs[0]:
            out["base_model"] = structure.slice_configs[0]["base_model"]
    return slots or []


def slice_loc(loc: list[Any], structure: Structure) -> list[Any]:
    """A location in the ``models:`` list the translation saw -> where it is in a slices config."""
    if (
        structure.slices is not None
        and len(loc) >= 2
        and loc[0] == "models"
        and isinstance(loc[1], int)
        and loc[1] < len(structure.slot_sources)
    ):
        return ["slices", structure.slice_index, "sources", structure.slot_sources[loc[1]], *loc[2:]]
    return loc


def apply_structure(recipe: dict[str, Any], structure: Structure, fail: Fail) -> dict[str, Any]:
    """Put the slices and LoRA adapters taken out by ``extract_structure`` into the translated recipe."""
    models = recipe.get("models") or []
    for model in models:
        pair = structure.stand_ins.get(model.get("source", ""))
        if pair is not None:
            model["source"], model["lora"] = _alloy_source(pair[0]), _alloy_source(pair[1])
    base_pair = structure.stand_ins.get(recipe.get("base") or "")
    if base_pair is not None:
        recipe["base"], recipe["base_lora"] = _alloy_source(base_pair[0]), _alloy_source(base_pair[1])
    if structure.tokenizer is not None:
        source = structure.tokenizer["source"]
        if source not in ("base", "union"):
            model, lora = split_lora(source)
            if lora is not None:
                fail(["tokenizer_source"], "a model+lora tokenizer source is not supported; name the model")
            source = _alloy_source(model)
        recipe["tokenizer"] = {**structure.tokenizer, "source": source}
    if structure.chat_template is not None:
        recipe["chat_template"] = structure.chat_template
    if structure.slices is None:
        return recipe
    if any(structure.slice_bases) and structure.base is not None:
        # the translation of slice 0 took its own base: the recipe's base is the top-level one
        recipe["base"] = _alloy_source(structure.base)
        recipe.pop("base_lora", None)
        if structure.base_lora is not None:
            recipe["base_lora"] = _alloy_source(structure.base_lora)
    base = recipe.get("base")
    slices = []
    for i, entries in enumerate(structure.slices):
        sources = []
        slot = 0
        own = structure.slice_bases[i] if i < len(structure.slice_bases) else None
        for model, lora, layer_range in entries:
            item: dict[str, Any] = {"source": _alloy_source(model), "layers": list(layer_range)}
            if lora is not None:
                item["lora"] = _alloy_source(lora)
            if own is not None:
                is_base = (model, lora) == own
            else:
                is_base = structure.base is not None and (model, lora) == (
                    structure.base,
                    structure.base_lora,
                )
            if is_base:
                if own is None and base is not None:
                    item["source"] = base
            elif slot < len(models):
                translated = models[slot]
                for key in ("weight", "density", "params"):
                    if key in translated:
                        item[key] = translated[key]
                slot += 1
            sources.append(item)
        spec: dict[str, Any] = {"sources": sources}
        if own is not None:
            spec["base"] = _alloy_source(own[0])
            if own[1] is not None:
                spec["base_lora"] = _alloy_source(own[1])
        slices.append(spec)
    recipe = {k: v for k, v in recipe.items() if k != "models"}
    recipe["slices"] = slices
    return recipe


def _alloy_source(ref: str) -> str:
    """mergekit model reference -> Alloy source, as ``mergekit_compat`` translates ``models[].model``: an existing
    local path stays a path, ``org/name[@rev]`` is a Hub repository (kept here so both hooks agree on LoRAs)."""
    from merge_ops.mergekit_refs import alloy_source

    return alloy_source(ref)
