"""mergekit 0.1.5's merge methods as facts: each method's parameters (name, type, default, where mergekit reads
it) and how it treats ``base_model``. ``merge_ops.mergekit_compat`` translates configs with this table; Alloy
never imports mergekit at run time.

Where mergekit reads a parameter (``mergekit.parameter_resolver``): a *shared* parameter comes from the slice,
module and top-level ``parameters`` only (a model's own ``parameters`` never set it); an *input* parameter is
resolved per model from the model's own ``parameters`` first, then the top-level ones; a *non_base* one is the
same but the base model never needs it. Values are coerced by pydantic in lax mode (``1.0`` is ``true``, ``"0.5"``
is 0.5); names mergekit does not declare are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

REQUIRED: Any = object()


@dataclass(frozen=True)
class MkParam:
    name: str
    kind: type
    default: Any = REQUIRED
    scope: Literal["shared", "input", "non_base"] = "shared"

    @property
    def per_model(self) -> bool:
        return self.scope != "shared"


@dataclass(frozen=True)
class MkMethod:
    name: str
    params: tuple[MkParam, ...]
    #: required: base_model is θ_0; optional: θ_0 when set; ignored: base_model is one more input model
    base: Literal["required", "optional", "ignored"]
    #: mergekit's count of inputs (the base included when it is an input)
    min_inputs: int = 1

    def param(self, name: str) -> MkParam | None:
        return next((p for p in self.params if p.name == name), None)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.params]


def _gta(name: str, *, normalize: bool, rescale: bool, extra: tuple[MkParam, ...] = ()) -> MkMethod:
    """mergekit's GeneralizedTaskArithmeticMerge family."""
    return MkMethod(
        name,
        (
            MkParam("int8_mask", bool, False),
            MkParam("normalize", bool, normalize),
            MkParam("rescale", bool, rescale),
            MkParam("lambda", float, 1.0),
            MkParam("weight", float, REQUIRED, "non_base"),
            MkParam("density", float, 1.0, "non_base"),
            *extra,
        ),
        "required",
    )


_GAMMA = (MkParam("gamma", float, 0.01, "non_base"),)
_EPSILON = (MkParam("epsilon", float, 0.15, "non_base"),)

MERGEKIT_METHODS: dict[str, MkMethod] = {
    m.name: m
    for m in [
        MkMethod(
            "linear",
            (MkParam("weight", float, REQUIRED, "input"), MkParam("normalize", bool, True)),
            "ignored",
        ),
        _gta("task_arithmetic", normalize=False, rescale=False),
        _gta("ties", normalize=True, rescale=False),
        _gta("dare_ties", normalize=False, rescale=True),
        _gta("dare_linear", normalize=False, rescale=True),
        _gta("breadcrumbs", normalize=False, rescale=False, extra=_GAMMA),
        _gta("breadcrumbs_ties", normalize=False, rescale=False, extra=_GAMMA),
        _gta("della", normalize=True, rescale=True, extra=_EPSILON),
        _gta("della_linear", normalize=False, rescale=True, extra=_EPSILON),
        MkMethod("model_stock", (MkParam("filter_wise", bool, False),), "required", min_inputs=3),
        MkMethod("slerp", (MkParam("t", float),), "required", min_inputs=2),
        MkMethod("nearswap", (MkParam("t", float),), "required", min_inputs=2),
        MkMethod(
            "multislerp",
            (
                MkParam("weight", float, REQUIRED, "non_base"),
                MkParam("normalize_weights", bool, True),
                MkParam("eps", float, 1e-8),
            ),
            "optional",
        ),
        MkMethod(
            "nuslerp",
            (
                MkParam("weight", float, REQUIRED, "non_base"),
                MkParam("nuslerp_row_wise", bool, False),
                MkParam("nuslerp_flatten", bool, True),
            ),
            "optional",
        ),
        MkMethod("karcher", (MkParam("max_iter", int, 10), MkParam("tol", float, 1e-5)), "ignored"),
        MkMethod("sce", (MkParam("int8_mask", bool, False), MkParam("select_topk", float, 1.0)), "required"),
        MkMethod("ram", (MkParam("epsilon", float, 1e-5),), "required"),
        MkMethod(
            "ramplus_tl",
            (MkParam("r", float, 0.1), MkParam("alpha", float, 0.2), MkParam("epsilon", float, 1e-5)),
            "required",
        ),
        MkMethod("arcee_fusion", (), "required", min_inputs=2),
        MkMethod("passthrough", (MkParam("scale", float, None, "input"),), "ignored"),
    ]
}

#: MergeConfiguration's fields (anything else at the top level mergekit ignores)
CONFIG_FIELDS = (
    "merge_method",
    "models",
    "slices",
    "modules",
    "base_model",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
    "parameters",
)
#: InputModelDefinition's fields
MODEL_FIELDS = ("model", "parameters")
