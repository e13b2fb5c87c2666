"""Load ``kernels.triton_ops`` for the Triton kernel tests, and the shared test helpers.

Interpreter choice: triton decides between compiled and interpreted kernels when ``@triton.jit`` runs, i.e. when
``kernels/triton/*.py`` is imported, by reading ``TRITON_INTERPRET``. So without a GPU we set it only around
that import and restore it at once: nothing leaks into other test modules (or their subprocesses) in the same
pytest process, and the interpreted kernels are the only ones such a machine could run anyway. If the modules
were already imported compiled (e.g. by a dispatch test), they are reloaded interpreted. With CUDA the kernels
are compiled and every test runs on the GPU.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from types import ModuleType

import pytest
import torch

_KERNEL_MODULES = ("kernels.triton.elementwise", "kernels.triton.select", "kernels.triton.consensus")

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
gpu_only = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")]


def load_triton_ops() -> ModuleType:
    pytest.importorskip("triton", reason="triton is not installed (the gpu extra)")
    if CUDA:
        return importlib.import_module("kernels.triton_ops")
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        ops = importlib.import_module("kernels.triton_ops")
        probe = importlib.import_module("kernels.triton.elementwise")._task_arithmetic_kernel
        if type(probe).__name__ != "InterpretedFunction":
            for name in _KERNEL_MODULES:
                importlib.reload(importlib.import_module(name))
            ops = importlib.reload(ops)
        return ops
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


def _poisoned(shape, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    out = torch.empty(tuple(shape), dtype=dtype, device=device)
    if dtype.is_floating_point:
        return out.fill_(float("nan"))
    if dtype == torch.bool:
        return out.fill_(True)
    return out.fill_(-77 if dtype.is_signed else 0xAB)


@pytest.fixture
def poison(monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """Every output a launcher allocates starts as NaN (floats), True (masks) or a sentinel (integers), so an
    element a kernel forgets to write fails the comparison."""
    common = importlib.import_module("kernels.triton._common")
    monkeypatch.setattr(common, "new_output", _poisoned)
    return lambda: None


def random_tensor(shape, dtype: torch.dtype, *, generator: torch.Generator, device=DEVICE) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=generator).to(dtype=dtype, device=device)
