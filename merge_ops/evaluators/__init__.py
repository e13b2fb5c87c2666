"""Held-out evaluators for greedy soup: score a candidate state dict, higher is better.

Importing this package is torch-free (the API imports ``EvaluatorSpec``); ``build_evaluator`` and the built-ins
import torch and transformers when first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from merge_ops.evaluators.spec import (
    BUILTIN_EVALUATORS,
    ENTRY_POINT_GROUP,
    EvaluatorSpec,
    available_evaluator_names,
)

if TYPE_CHECKING:
    from merge_ops.evaluators.base import Evaluator, build_evaluator

__all__ = [
    "BUILTIN_EVALUATORS",
    "ENTRY_POINT_GROUP",
    "Evaluator",
    "EvaluatorSpec",
    "available_evaluator_names",
    "build_evaluator",
]


def __getattr__(name: str) -> Any:
    if name in {"Evaluator", "build_evaluator"}:
        from merge_ops.evaluators import base

        return getattr(base, name)
    raise AttributeError(name)
