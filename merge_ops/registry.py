"""One registry of merge methods, one per-tensor signature.

A method is a pure function ``(task_vectors[K, *S], ctx, params) -> delta[*S]``: float32 in, float32 out, no I/O,
no global RNG, no dtype casting. The pipeline adds ``λ·LiNeS(ℓ)·delta`` to the base and casts once (the spec's
*scale* stage is the pipeline's, so every method returns the unscaled aggregate). Metadata and params live in
``params.CATALOG`` (torch-free, for the API); ``register_method`` attaches an implementation to a catalog entry.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from merge_ops.params import CATALOG, MethodInfo, Params, Scope, method_info

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class TensorContext:
    """What a method may know about the tensor it merges."""

    name: str
    #: Per-model weights w_t, float32 [K], on the compute device.
    weights: torch.Tensor
    #: Job seed; DARE keys its counter-based generator on (seed, source index, tensor name).
    seed: int
    #: Index of each of the K task vectors among the recipe's models (stable under filtering).
    source_indices: tuple[int, ...]
    scope: Scope
    #: Per-model densities when the recipe sets them per model (else None: use params.density).
    densities: tuple[float, ...] | None = None
    #: Statistics of a first streaming pass, for ``scope=global`` (see ``merge_ops.global_stats``).
    global_stats: Any = None
    #: Method statistics for the job report (kept density, sign-conflict rate, σ...). Methods add
    #: plain floats here; it is the one mutable part of the context.
    report: dict[str, float | list[float]] = field(default_factory=dict)
    #: θ_0 of this tensor (float32, compute device) for methods that interpolate weights rather than sum task
    #: vectors (slerp, karcher, ...); None unless the method's catalog entry asks for it.
    base: torch.Tensor | None = None
    #: True when the recipe has no base and ``base`` is the first model (whose task vector is then zero); methods
    #: that treat a given base as one more input (karcher) or as the origin (nuslerp, multislerp) need to know.
    reference_is_input: bool = False
    #: Per task vector, the per-model parameters resolved for this tensor (mergekit's per-model ``parameters``:
    #: gamma, epsilon, t, ...); empty when the recipe sets none. Read them with ``per_model``.
    model_params: tuple[Mapping[str, Any], ...] = ()

    def per_model(self, key: str, default: float) -> list[float]:
        """``key`` for each of the K task vectors: the model's own value, else ``default`` (the method-level
        value of this tensor)."""
        k = int(self.weights.shape[0])
        if not self.model_params:
            return [float(default)] * k
        return [float(p.get(key, default)) for p in self.model_params]


MethodFn = Callable[["torch.Tensor", TensorContext, Any], "torch.Tensor"]


@dataclass(frozen=True)
class RegisteredMethod:
    info: MethodInfo
    fn: MethodFn

    @property
    def params_model(self) -> type[Params]:
        return self.info.params


_IMPLEMENTATIONS: dict[str, MethodFn] = {}


def register_method(*names: str) -> Callable[[MethodFn], MethodFn]:
    """Attach the decorated function to the catalog entries ``names`` (which must exist)."""

    def decorate(fn: MethodFn) -> MethodFn:
        for name in names:
            if name not in CATALOG:
                raise KeyError(f"{name!r} is not declared in merge_ops.params.CATALOG")
            if name in _IMPLEMENTATIONS:
                raise KeyError(f"method {name!r} is registered twice")
            _IMPLEMENTATIONS[name] = fn
        return fn

    return decorate


def get_method(name: str) -> RegisteredMethod:
    """The implementation of ``name`` (imports ``merge_ops.methods``, hence torch, on first use)."""
    info = method_info(name)
    importlib.import_module("merge_ops.methods")
    try:
        return RegisteredMethod(info, _IMPLEMENTATIONS[name])
    except KeyError:
        raise NotImplementedError(f"method {name!r} is declared but has no implementation") from None


def registered_names() -> list[str]:
    importlib.import_module("merge_ops.methods")
    return sorted(_IMPLEMENTATIONS)
