"""Pick the implementation of a kernel op: the Triton twin or the torch reference.

``ALLOY_KERNELS`` (read at every call, so tests can flip it): ``auto`` (default) uses Triton when any argument
tensor is on CUDA and ``kernels.triton_ops`` imports and defines the op, else the CPU twin in ``kernels.cpu_fused``
where there is one (bit-exact with the reference, cache-blocked and multithreaded), else the reference, silently;
``torch`` always uses the reference; ``triton`` uses Triton or raises ``KernelUnavailable`` saying why.

CPU tensors run on Triton only under its interpreter, and only when asked for: ``ALLOY_KERNELS=triton`` with
``TRITON_INTERPRET=1`` set both when triton is first imported (``@triton.jit`` picks the interpreter at
decoration time) and at the call (triton checks it again while a kernel runs). That is how CI runs the whole
Triton merge path without a GPU. ``auto`` never picks the interpreter: it is orders of magnitude slower than the
reference. Only ``kernels/triton_ops.py`` (and ``kernels/triton/``) import triton, lazily, on first use here.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

from kernels import cpu_fused, reference
from kernels.errors import KernelUnavailable

_MODES = ("auto", "torch", "triton")
#: ops with no Triton twin by design: one elementwise pass or a matmul, which torch on CUDA already runs at memory
#: speed; ``triton`` mode runs their reference instead of refusing (on CPU tensors ``auto`` runs their CPU twin)
REFERENCE_ON_TRITON = frozenset(
    {
        "task_vectors",
        "task_vector_gram",
        "apply_delta",
        "all_finite",
        "row_moments",
        "sum_l1",
        "task_vector_sum_l1",
        "checked_task_vectors",
        "slerp_moments",
        "slerp_delta",
        "magnitude_ranks",
        "counter_bits24",
        "magprune_mask",
    }
)
_triton_module: ModuleType | None = None
_triton_error: str | None = None
_tried_import = False


def _load_triton_ops() -> ModuleType | None:
    """Import ``kernels.triton_ops`` once; remember why it failed (no triton, no driver, ...)."""
    global _triton_module, _triton_error, _tried_import
    if not _tried_import:
        _tried_import = True
        try:
            _triton_module = importlib.import_module("kernels.triton_ops")
        except Exception as exc:  # ImportError, or triton failing to find a driver at import time
            _triton_error = f"{type(exc).__name__}: {exc}"
    return _triton_module


def kernel_mode() -> str:
    mode = os.environ.get("ALLOY_KERNELS", "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise KernelUnavailable(f"ALLOY_KERNELS={mode!r}; expected one of {', '.join(_MODES)}", mode=mode)
    return mode


def interpreting(module: ModuleType | None) -> bool:
    """Whether Triton kernels can run on CPU tensors now: compiled by the interpreter and still under it."""
    # the values triton itself reads as true (its C++ getenv_bool)
    flag = os.environ.get("TRITON_INTERPRET", "").strip().lower() in {"1", "true", "on"}
    return flag and bool(getattr(module, "INTERPRETED", False))


def kernel(op_name: str, *tensors: Any) -> Callable[..., Any]:
    """The implementation of ``op_name`` for these argument tensors (non-tensors among them are ignored)."""
    ref = getattr(reference, op_name, None)
    if ref is None:
        raise KeyError(f"unknown kernel op {op_name!r}")
    mode = kernel_mode()
    if mode == "torch":
        return ref
    on_cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in tensors)
    if mode == "auto" and not on_cuda:
        return getattr(cpu_fused, op_name, ref)
    if op_name in REFERENCE_ON_TRITON:
        return ref
    module = _load_triton_ops()
    triton_fn = getattr(module, op_name, None) if module is not None else None
    if triton_fn is not None and (on_cuda or interpreting(module)):
        return triton_fn
    if mode == "auto":
        return ref
    if module is None:
        why = f"kernels.triton_ops does not import ({_triton_error})"
    elif triton_fn is None:
        why = "kernels.triton_ops has no such op"
    else:
        why = (
            "its tensors are not on a CUDA device (CPU tensors run on Triton only under its interpreter: "
            "set TRITON_INTERPRET=1 before triton is first imported)"
        )
    raise KernelUnavailable(f"ALLOY_KERNELS=triton but op {op_name!r} can't run on Triton: {why}", op=op_name)
