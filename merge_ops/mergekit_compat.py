"""Translate a mergekit YAML config into an Alloy recipe dict, with mergekit 0.1.5's semantics and defaults.

A mergekit config is a promise of mergekit's merge, so every field it sets or leaves out means what it means in
mergekit (spec "mergekit recipes give mergekit's result"); the facts about each method are in
``merge_ops.mergekit_methods``.

- ``merge_method``: ``linear``, ``task_arithmetic``, ``ties``, ``dare_linear``, ``dare_ties``, ``breadcrumbs``,
  ``breadcrumbs_ties`` become Alloy's presets with mergekit's stages (``normalize`` -> ``aggregate: mean | sum``,
  DARE ``rescale`` true -> ``l1``), ``model_stock`` keeps mergekit's unclamped cosine; any other mergekit method
  in Alloy's catalog translates generically (shared parameters -> ``params``, per-model ones ->
  ``models[].params``, mergekit's names verbatim). A mergekit method Alloy lacks is refused naming the field.
- Every parameter is resolved where mergekit resolves it: a per-model parameter (``weight``, ``density``,
  ``gamma``, ``epsilon``, ``scale``) from the model's own ``parameters`` first, then the top-level ones, then
  mergekit's default; a shared one (``normalize``, ``lambda``, ``rescale``, ``t``, ...) from the top level only.
  Each value is a number, a gradient (numbers spread over the layers) or a filtered list
  ``[{filter: s, value: x}, ..., {value: y}]`` whose first entry with ``s`` a substring of the tensor name wins
  (``*`` or no filter: every tensor; no entry matches: the next place). Per-model chains go to
  ``models[].params`` (plain numbers to ``weight`` / ``density``); shared filtered lists become ``overrides``.
- Breadcrumbs ``gamma`` is the top fraction removed: ``top_removed = gamma``, 0 where density is 1 (mergekit
  returns the tensor unpruned), ``1 − density`` where density + gamma > 1 (mergekit shrinks the removed top to
  n − ⌊density·n⌋; Alloy's ⌊(1 − density)·n⌋ can be one less: an intended difference of Alloy's floor rule).
  Gradients of density/gamma reaching those cases are refused (no gradient of top_removed expresses them).
- ``base_model``: θ_0 for methods that use a base; listed again in ``models:`` it is dropped there (it is the
  base, and needs no weight). For ``linear`` and the other methods mergekit gives no base, ``base_model`` is one
  more input model (mergekit adds it when it is not listed), with the top-level parameters.
- ``dtype`` / ``out_dtype`` -> the output dtype (Alloy always computes in float32); ``tokenizer_source: base``
  (or ``tokenizer: {source: base}``) is Alloy's behaviour.

Lenient where mergekit is lenient: keys mergekit ignores (unknown top-level, model or parameter names, shared
parameters set per model) and values it coerces (``1.0`` for ``true``, ``"0.5"``) are accepted with mergekit's
result and listed in the recipe's ``warnings`` with a suggestion. Refused, naming the field: what mergekit
rejects, and what Alloy cannot do yet (``slices``, ``modules``, other tokenizers, ``chat_template``, LoRA
``model+lora`` references).

Intended differences from mergekit: exact top-k ties by lowest index (mergekit's sort order is unspecified), at
least one element kept per tensor, a DARE mask from Alloy's counter-based generator (mergekit uses torch's
global RNG), float32 compute for half-precision inputs.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from typing import Any

from pydantic import TypeAdapter, ValidationError

from merge_ops.errors import RecipeError
from merge_ops.mergekit_methods import (
    CONFIG_FIELDS,
    MERGEKIT_METHODS,
    MODEL_FIELDS,
    REQUIRED,
    MkMethod,
    MkParam,
)
from merge_ops.mergekit_structure import Structure, apply_structure, extract_structure, slice_loc
from merge_ops.mergekit_values import Chain, alloy_value, anchors, covers_all, expand_filters, truncate
from merge_ops.params import CATALOG

Loc = list[str | int]

#: mergekit method -> Alloy stage params fixed by the method (the GeneralizedTaskArithmeticMerge family)
_STAGES: dict[str, dict[str, str]] = {
    "task_arithmetic": {"sparsify": "none", "consensus": "none"},
    "ties": {"sparsify": "magnitude", "consensus": "ties_sign"},
    "dare_linear": {"sparsify": "dare", "consensus": "none"},
    "dare_ties": {"sparsify": "dare", "consensus": "ties_sign"},
    "breadcrumbs": {"sparsify": "breadcrumbs", "consensus": "none"},
    "breadcrumbs_ties": {"sparsify": "breadcrumbs", "consensus": "ties_sign"},
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
_ADAPTERS: dict[type, TypeAdapter[Any]] = {t: TypeAdapter(t) for t in (bool, float, int)}


def is_mergekit_config(data: Any) -> bool:
    """A mapping with mergekit's ``merge_method`` key and no Alloy ``method`` key."""
    return isinstance(data, dict) and "merge_method" in data and "method" not in data


def translate_mergekit(data: dict[str, Any]) -> dict[str, Any]:
    """The Alloy recipe dict equivalent to mergekit config ``data``, with ``warnings`` listing what mergekit
    ignores or coerces; raises ``RecipeError`` listing every unsupported or invalid field as ``{loc, msg}``."""
    translator = _Translator(data)
    # slices / modules / model+lora / tokenizers (merge_ops.mergekit_structure): the parameter translation sees
    # a plain ``models:`` config, and the structure is put back into the translated recipe
    translator.data, translator.structure = extract_structure(data, translator.fail)
    recipe = translator.run()
    recipe = apply_structure(recipe, translator.structure, translator.fail)
    translator.raise_if_failed()
    return recipe


def suggest(name: str, known: Sequence[str]) -> str:
    match = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f"; did you mean {match[0]!r}?" if match else ""


class _Translator:
    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        self.errors: list[dict[str, Any]] = []
        self.warnings: list[dict[str, Any]] = []
        self.structure: Structure | None = None
        #: the config as written (``data`` becomes its ``models:`` form once the structure is taken out)
        self.raw = data

    def fail(self, loc: Loc, msg: str) -> None:
        # a slices config's inputs are models[j] here: name the slice source instead
        where = slice_loc(loc, self.structure) if self.structure is not None else loc
        self.errors.append({"loc": where, "msg": msg})

    def warn(self, loc: Loc, msg: str) -> None:
        self.warnings.append({"loc": loc, "msg": msg})

    def raise_if_failed(self) -> None:
        if self.errors:
            summary = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in self.errors
            )
            raise RecipeError(
                f"unsupported mergekit config: {summary}", errors=self.errors, warnings=self.warnings
            )

    # -- the whole config ------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        data = self.data
        name = data.get("merge_method")
        mk = MERGEKIT_METHODS.get(name) if isinstance(name, str) else None
        for key in data:
            if key not in CONFIG_FIELDS:
                hint = suggest(key, CONFIG_FIELDS)
                if not hint and mk is not None and (param := suggest(key, mk.names)):
                    hint = f"{param.removesuffix('?')} under 'parameters:'?"
                self.warn([key], f"mergekit ignores the field {key!r}{hint}")
        if mk is None:
            self.fail(
                ["merge_method"],
                f"{name!r} is not a mergekit merge_method; mergekit 0.1.5 has: "
                f"{', '.join(MERGEKIT_METHODS)}{suggest(str(name), list(MERGEKIT_METHODS))}",
            )
        elif name not in _STAGES and name not in ("linear", "model_stock") and name not in CATALOG:
            self.fail(["merge_method"], f"mergekit merge_method {name!r} is not supported by Alloy yet")
        self._structure()
        # the top-level parameters are read even when the structure is refused, so every warning is listed
        top_chains = self._top_chains(mk) if mk is not None else {}
        self.raise_if_failed()
        assert mk is not None
        recipe = self._method(mk, top_chains)
        self.raise_if_failed()
        dtype_key = "out_dtype" if data.get("out_dtype") else "dtype"
        dtype = data.get(dtype_key)
        if dtype:
            if dtype not in _DTYPES:
                self.fail([dtype_key], f"dtype {dtype!r} is not supported (use float32, float16 or bfloat16)")
            else:
                recipe["dtype"] = _DTYPES[dtype]
        self.raise_if_failed()
        recipe["warnings"] = self.warnings
        return recipe

    def _structure(self) -> None:
        """The fields Alloy can't do yet, and mergekit's own rule: exactly one of models, slices, modules."""
        data = self.data
        for key in ("slices", "modules"):
            if data.get(key):
                self.fail(
                    [key],
                    f"mergekit {key} (layer ranges) are not supported yet; list whole models under "
                    "'models:' instead",
                )
        if data.get("chat_template") is not None:
            self.fail(
                ["chat_template"],
                "chat_template is not supported yet; remove it to keep the base's chat template",
            )
        tokenizer_source = data.get("tokenizer_source")
        if tokenizer_source not in (None, "base"):
            self.fail(
                ["tokenizer_source"],
                "only tokenizer_source: base is supported yet (Alloy copies the base's tokenizer)",
            )
        tokenizer = data.get("tokenizer")
        if tokenizer is not None and tokenizer_source is not None:
            self.fail(["tokenizer"], "mergekit takes tokenizer_source or tokenizer, not both")
        elif tokenizer is not None and tokenizer != {"source": "base"}:
            self.fail(
                ["tokenizer"],
                "only 'tokenizer: {source: base}' is supported yet (Alloy copies the base's tokenizer)",
            )
        if not self.raw.get("slices") and not self.raw.get("modules"):
            models = data.get("models")
            if not isinstance(models, list) or not models:
                self.fail(
                    ["models"], "mergekit needs one of 'models', 'slices' or 'modules'; give a 'models:' list"
                )
        if not isinstance(data.get("parameters") or {}, dict):
            self.fail(["parameters"], "must be a mapping")

    # -- one method ------------------------------------------------------------------------------------------
    def _top_chains(self, mk: MkMethod) -> dict[str, Chain]:
        top = self.data.get("parameters") or {}
        if not isinstance(top, dict):
            return {}
        for key in top:
            if mk.param(key) is None:
                self.warn(
                    ["parameters", key],
                    f"mergekit's {mk.name} ignores the parameter {key!r}{suggest(key, mk.names)}",
                )
        return {
            p.name: self.chain(top[p.name], p, ["parameters", p.name]) for p in mk.params if p.name in top
        }

    def _method(self, mk: MkMethod, top_chains: dict[str, Chain]) -> dict[str, Any]:
        data = self.data
        models = self._models(mk)
        base = data.get("base_model")
        recipe: dict[str, Any] = {}
        if mk.base == "ignored":
            if base is not None and not any(m["ref"] == self._ref(base) for m in models):
                source = _source(base, ["base_model"], self.fail)
                models.append({"ref": self._ref(base), "loc": ["base_model"], "chains": {}, "source": source})
        elif base is not None:
            recipe["base"] = _source(base, ["base_model"], self.fail)
            models = [m for m in models if m["ref"] != self._ref(base)]  # the base listed again: it is θ_0
        elif mk.base == "required":
            self.fail(["base_model"], f"merge_method {mk.name!r} needs base_model")
        inputs = len(models) + (1 if "base" in recipe else 0)
        if inputs < mk.min_inputs:
            self.fail(
                ["models"],
                f"merge_method {mk.name!r} needs at least {mk.min_inputs} models counting the "
                f"base; this config has {inputs}",
            )
        per_model = [p for p in mk.params if p.per_model]
        for m in models:  # per-model chains: the model's own value, then the top level's, then the default
            m["resolved"] = {
                p.name: m["chains"].get(p.name, []) + top_chains.get(p.name, []) for p in per_model
            }
        shared = {p.name: top_chains.get(p.name, [(None, p.default)]) for p in mk.params if not p.per_model}
        for p in mk.params:
            if not p.per_model and not covers_all(shared[p.name]) and p.default is REQUIRED:
                self.fail(["parameters", p.name], f"mergekit's {mk.name} needs {p.name} for every tensor")
        if self.errors:
            return recipe
        if mk.name in _STAGES:
            recipe.update(self._stages(mk, models, shared))
        elif mk.name == "linear":
            recipe.update(method="linear", params={"normalize": self.constant(shared, "normalize")})
            recipe["models"] = [self._model_entry(m, {"weight"}, mk) for m in models]
        elif mk.name == "model_stock":
            recipe.update(
                method="model_stock",
                params={"filter_wise": self.constant(shared, "filter_wise"), "cosine_clamp": "mergekit"},
            )
            recipe["models"] = [{"source": m["source"]} for m in models]
        else:  # a method Alloy implements under mergekit's name, with mergekit's parameter names
            params, overrides = self.shared_params(_known_to_alloy(shared, mk, self.fail), mk)
            recipe.update(method=mk.name, params=params)
            if overrides:
                recipe["overrides"] = overrides
            recipe["models"] = [self._model_entry(m, {p.name for p in per_model}, mk) for m in models]
        return recipe

    def _models(self, mk: MkMethod) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        raw = self.data.get("models")
        for i, entry in enumerate(raw if isinstance(raw, list) else []):
            loc: Loc = ["models", i]
            if not isinstance(entry, dict) or "model" not in entry:
                self.fail(loc, "each model needs a 'model' field")
                continue
            for key in entry:
                if key not in MODEL_FIELDS:
                    self.warn(
                        [*loc, key], f"mergekit ignores the model field {key!r}{suggest(key, MODEL_FIELDS)}"
                    )
            params = entry.get("parameters") or {}
            if not isinstance(params, dict):
                self.fail([*loc, "parameters"], "must be a mapping")
                continue
            chains: dict[str, Chain] = {}
            for key, value in params.items():
                p = mk.param(key)
                if p is None:
                    self.warn(
                        [*loc, "parameters", key],
                        f"mergekit's {mk.name} ignores the parameter {key!r}{suggest(key, mk.names)}",
                    )
                elif not p.per_model:
                    self.warn(
                        [*loc, "parameters", key],
                        f"mergekit reads {key!r} only from the top-level "
                        "parameters; this per-model value is ignored",
                    )
                else:
                    chains[key] = self.chain(value, p, [*loc, "parameters", key])
            ref = self._ref(entry["model"])
            out.append(
                {
                    "ref": ref,
                    "loc": loc,
                    "chains": chains,
                    "source": _source(entry["model"], [*loc, "model"], self.fail),
                }
            )
        return out

    def _ref(self, ref: Any) -> str:
        flat = _reference_string(ref)
        return flat.strip() if isinstance(flat, str) else repr(ref)

    # -- the task-arithmetic family --------------------------------------------------------------------------
    def _stages(self, mk: MkMethod, models: list[dict[str, Any]], shared: dict[str, Chain]) -> dict[str, Any]:
        stages = _STAGES[mk.name]
        normalize = self.constant(shared, "normalize")
        rescale = self.constant(shared, "rescale")
        params: dict[str, Any] = {**stages, "aggregate": "mean" if normalize else "sum"}
        if stages["sparsify"] == "dare":
            params["rescale"] = "l1" if rescale else "none"
        elif rescale:
            self.fail(
                ["parameters", "rescale"],
                f"rescale: true is only supported for DARE methods, not {mk.name!r}",
            )
        if stages["sparsify"] != "none":
            params["density"] = 1.0  # every model sets its own (mergekit's default is 1: no pruning)
        if stages["sparsify"] == "breadcrumbs":
            params["top_removed"] = 0.0
        lam, overrides = self.shared_params({"lambda": shared["lambda"]}, mk)
        params.update(lam)
        recipe: dict[str, Any] = {"method": mk.name, "params": params}
        if overrides:
            recipe["overrides"] = overrides
        entries = []
        keys = {"weight", "density"} if stages["sparsify"] != "none" else {"weight"}
        sets_density = "density" in (self.data.get("parameters") or {}) or any(
            "density" in m["chains"] for m in models
        )
        if stages["sparsify"] == "none" and sets_density:
            self.warn(
                ["parameters", "density"], f"mergekit's {mk.name} does not prune: density has no effect"
            )
        for m in models:
            entry = self._model_entry(m, keys, mk)
            if stages["sparsify"] == "breadcrumbs":
                top_removed = self._top_removed(m, mk)
                if top_removed is not None:
                    entry.setdefault("params", {})["top_removed"] = top_removed
            entries.append(entry)
        recipe["models"] = entries
        _hoist_shared(recipe, ("density", "top_removed"))
        return recipe

    def _top_removed(self, m: dict[str, Any], mk: MkMethod) -> Any:
        """mergekit's gamma with its density rule, for one model (see the module docstring)."""
        density, gamma = m["resolved"]["density"], m["resolved"]["gamma"]
        d = alloy_value(density, 1.0)
        g = alloy_value(gamma, 0.01)
        if isinstance(d, float) and isinstance(g, float):
            return _gamma_rule(d, g)
        ds, gs = anchors(density, 1.0), anchors(gamma, 0.01)
        if all(x < 1 for x in ds) and all(x + y <= 1 for x in ds for y in gs):
            return g  # the rule is the identity on every value these can take
        if not any(isinstance(v, list) for _, v in [*truncate(density), *truncate(gamma)]):
            # filtered numbers only: the rule per combination of matching entries, as one filtered list
            base, overrides = expand_filters({"density": density, "gamma": gamma}, mk)
            entries = [
                {"filter": o["filter"], "value": _gamma_rule(o["params"]["density"], o["params"]["gamma"])}
                for o in overrides
            ]
            return [*entries, {"value": _gamma_rule(base["density"], base["gamma"])}]
        self.fail(
            [*m["loc"], "parameters", "gamma"],
            "a density or gamma gradient reaching density = 1 or density + gamma > 1 is not supported (mergekit "
            "shrinks the removed top there, which no gradient of top_removed expresses)",
        )
        return None

    # -- values ----------------------------------------------------------------------------------------------
    def _model_entry(self, m: dict[str, Any], keys: set[str], mk: MkMethod) -> dict[str, Any]:
        """Alloy ``models[]`` entry: plain numbers as ``weight`` / ``density``, anything else in ``params``."""
        entry: dict[str, Any] = {"source": m["source"]}
        params: dict[str, Any] = {}
        for key in sorted(keys):
            chain = m["resolved"].get(key, [])
            p = mk.param(key)
            p_default = p.default if p is not None else None
            if key == "weight" and not covers_all(chain):
                where = "for tensors matching none of its filters " if chain else ""
                self.fail(
                    [*m["loc"], "parameters", "weight"],
                    f"mergekit needs a weight for every model except "
                    f"the base {where}(set it here or in the top-level parameters)",
                )
                continue
            value = alloy_value(chain, p_default)
            if value is None:
                continue
            if key in ("weight", "density") and isinstance(value, float):
                entry[key] = value
            else:
                params[key] = value
        if params:
            entry["params"] = params
        return entry

    def shared_params(
        self, shared: dict[str, Chain], mk: MkMethod
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Shared params: constants and gradients into ``params``, filtered lists into ``overrides``."""
        params: dict[str, Any] = {}
        filtered: dict[str, Chain] = {}
        for key, chain in shared.items():
            p = mk.param(key)
            if p is None:
                continue
            chain = truncate(chain)
            if chain and chain[0][0] is None:
                if chain[0][1] is not None:
                    params[key] = chain[0][1]
            elif p.kind is bool:
                self.fail(["parameters", key], f"a filtered {key} is not supported; give one value")
            else:
                filtered[key] = chain
        base, overrides = expand_filters(filtered, mk)
        params.update(base)
        return params, overrides

    def constant(self, shared: dict[str, Chain], key: str) -> Any:
        chain = truncate(shared[key])
        if chain and chain[0][0] is None and not isinstance(chain[0][1], list):
            return chain[0][1]
        self.fail(["parameters", key], f"{key} must be a single value in Alloy")
        return None

    def chain(self, setting: Any, p: MkParam, loc: Loc) -> Chain:
        """A mergekit ParameterSetting as a first-match chain, each value coerced as mergekit does."""
        if isinstance(setting, dict):
            setting = [setting]
        if isinstance(setting, list) and setting and all(isinstance(e, dict) for e in setting):
            out: Chain = []
            for j, entry in enumerate(setting):
                if "value" not in entry:
                    self.fail([*loc, j], "a filtered entry is {filter: name part, value: x}")
                    continue
                for key in entry:
                    if key not in ("filter", "value"):
                        self.warn(
                            [*loc, j, key],
                            f"mergekit ignores {key!r} in a filtered entry"
                            f"{suggest(key, ['filter', 'value'])}",
                        )
                pattern = entry.get("filter")
                if pattern is not None and not isinstance(pattern, str):
                    self.fail([*loc, j, "filter"], "a filter is a string")
                    continue
                value = self.scalar_or_gradient(entry["value"], p, [*loc, j, "value"])
                out.append((None if pattern in (None, "*") else pattern, value))
            return out
        value = self.scalar_or_gradient(setting, p, loc)
        return [] if value is None else [(None, value)]

    def scalar_or_gradient(self, value: Any, p: MkParam, loc: Loc) -> Any:
        if isinstance(value, list):
            if not value:
                return None  # mergekit: an empty list is no value here
            if p.kind is bool or not all(_is_scalar(v) for v in value):
                self.fail(loc, f"a gradient of {p.name} must be a list of numbers")
                return None
            return [float(self.coerce(v, p, [*loc, i])) for i, v in enumerate(value)]
        if not _is_scalar(value) and value is not None:
            self.fail(loc, f"{p.name} must be a number, a gradient or a filtered list")
            return None
        return self.coerce(value, p, loc)

    def coerce(self, value: Any, p: MkParam, loc: Loc) -> Any:
        if value is None and p.default is None:
            return None
        kind = p.kind
        try:
            result = _ADAPTERS[kind].validate_python(value)
        except ValidationError:
            want = "true or false" if kind is bool else "a number"
            self.fail(loc, f"{p.name} must be {want} (got {value!r})")
            return None
        if type(value) is not type(result) and not (kind is float and type(value) is int):
            self.warn(loc, f"mergekit reads {value!r} as {result!r}; write {_yaml(result)}")
        return float(result) if kind is float else result


#: mergekit parameters with no effect on the merged values (int8_mask only changes mergekit's mask dtype)
_NO_EFFECT = {"int8_mask"}


def _known_to_alloy(shared: dict[str, Chain], mk: MkMethod, fail: Any) -> dict[str, Chain]:
    """The shared parameters Alloy's params model of ``mk`` declares; one that changes the merge and that Alloy
    lacks is refused (never silently dropped)."""
    fields = {f.alias or name for name, f in CATALOG[mk.name].params.model_fields.items()}
    kept = {}
    for key, chain in shared.items():
        param = mk.param(key)
        if key in fields:
            kept[key] = chain
        elif key not in _NO_EFFECT and param is not None and chain != [(None, param.default)]:
            fail(["parameters", key], f"Alloy's {mk.name} does not take {key!r} yet")
    return kept


def _gamma_rule(density: float, gamma: float) -> float:
    """mergekit's Breadcrumbs: density 1 prunes nothing; density + gamma > 1 shrinks the removed top."""
    return 0.0 if density >= 1 else min(float(gamma), 1.0 - float(density))


def _hoist_shared(recipe: dict[str, Any], keys: tuple[str, ...]) -> None:
    """Per-model numbers every model shares move to the method-level ``params`` (a readable recipe, and the
    engine's plain path); all of ``keys`` or none, since Breadcrumbs validates density and top_removed together."""
    entries = recipe["models"]
    present = [k for k in keys if any(k in e or k in e.get("params", {}) for e in entries)]
    shared = {}
    for key in present:
        values = [e.get(key, e.get("params", {}).get(key)) for e in entries]
        if not all(isinstance(v, float) and v == values[0] for v in values):
            return
        shared[key] = values[0]
    recipe["params"].update(shared)
    for e in entries:
        for key in shared:
            e.pop(key, None)
            e.get("params", {}).pop(key, None)
        if "params" in e and not e["params"]:
            del e["params"]


def _yaml(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else repr(value)


def _is_scalar(value: Any) -> bool:
    return isinstance(value, bool | int | float | str)


def _reference_string(ref: Any) -> Any:
    """mergekit's mapping forms of a reference (``{model: {path, revision}, lora: ...}``, ``{path, revision}``)
    as its string form ``path[@revision][+lora]``; anything else unchanged."""
    if isinstance(ref, dict):
        if "model" in ref:
            model, lora = _reference_string(ref["model"]), ref.get("lora")
            if isinstance(model, str) and lora is not None:
                lora = _reference_string(lora)
                return f"{model}+{lora}" if isinstance(lora, str) else ref
            return model
        if isinstance(ref.get("path"), str):
            return f"{ref['path']}@{ref['revision']}" if ref.get("revision") else ref["path"]
    return ref


def _source(ref: Any, loc: Loc, fail: Any) -> str:
    """mergekit model reference -> Alloy source: an existing local folder stays a path, ``org/name[@rev]`` is a
    Hub repository."""
    ref = _reference_string(ref)
    if not isinstance(ref, str) or not ref.strip():
        fail(loc, "a model reference must be a string")
        return ""
    ref = ref.strip()
    if "+" in ref:
        fail(
            loc, "mergekit 'model+lora' references are not supported yet; merge the LoRA into its model first"
        )
        return ref
    from merge_ops.mergekit_refs import alloy_source

    return alloy_source(ref)
