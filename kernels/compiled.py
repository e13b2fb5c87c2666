"""Access to the compiled CPU loops (``kernels.cpu_jit``, numba): imported on first use, switchable off.

``ALLOY_JIT`` (read at every call, so tests can flip it): ``auto`` (default) uses the compiled loops where an op
has them; ``off`` keeps the blocked torch/numpy twins (``kernels.cpu_fused``, ``kernels.cpu_select``), which give
the same results, slower. A numba that can't load (missing, or built for another numpy) is the same as ``off``;
``jit_error()`` says why.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from types import ModuleType

import numpy as np
import torch

_module: ModuleType | None = None
_error: str | None = None


def jit() -> ModuleType | None:
    """``kernels.cpu_jit``, or None when ``ALLOY_JIT=off`` or numba can't load."""
    global _module, _error
    if os.environ.get("ALLOY_JIT", "auto").strip().lower() in {"0", "off", "false", "no"}:
        return None
    if _module is None and _error is None:
        try:
            with _no_scipy_blas_probe():
                from kernels import cpu_jit

                cpu_jit.start()
            _module = cpu_jit
        # numba missing or built for another numpy (ImportError), LLVM or its cache failing (OSError,
        # RuntimeError); anything else (a Celery time limit, an interrupt) goes through
        except (ImportError, OSError, RuntimeError) as exc:
            _error = f"{type(exc).__name__}: {exc}"
    return _module


@contextlib.contextmanager
def _no_scipy_blas_probe() -> Iterator[None]:
    """numba's CPU target, when it starts, imports scipy.linalg to see whether ``np.dot`` can call BLAS (0.5 s of
    a merge's start, measured); the loops here call no BLAS. While the target starts, scipy.linalg is made
    unimportable (numba then notes "no BLAS"), unless the process already imported it; afterwards it imports
    as usual."""
    if "scipy.linalg" in sys.modules:
        yield
        return
    sys.modules["scipy.linalg"] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if sys.modules.get("scipy.linalg", 0) is None:
            del sys.modules["scipy.linalg"]


def jit_error() -> str | None:
    """Why the compiled loops could not load, if they could not."""
    return _error


def storage(tensor: torch.Tensor) -> np.ndarray | None:
    """The numpy array a compiled loop reads or writes for a contiguous CPU tensor: float32 as is, bf16 as its
    uint16 bits; None for other dtypes (float16 stays on the blocked twins)."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        return None
    if tensor.dtype == torch.float32:
        return tensor.numpy()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return None
