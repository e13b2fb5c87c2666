"""Load ``kernels.triton_ops`` for the Triton kernel tests, and the shared test helpers.

Interpreter choice: triton reads ``TRITON_INTERPRET`` when ``@triton.jit`` runs, both for our kernels and for the
jit-decorated parts of ``triton.language`` (``tl.zeros``, ...), i.e. at ``import triton``. So without a GPU the
variable is set only around the first import of triton and ``kernels.triton_ops`` and restored at once: nothing
leaks into other test modules (or their subprocesses) in the same pytest process, and interpreted kernels are
the only ones a machine without a GPU can run anyway. Triton also imports some modules lazily while a kernel
runs and checks the variable there, so the fixture ``interpreter_env`` sets it (monkeypatch, undone after
each test) around every test of the modules that import it. Test modules call ``load_triton_ops()`` at import, i.e. at
collection time, before any test body runs. If triton was already imported compiled (something imported it
before collection reached tests/kernels), it can't be re-imported (its native module refuses), so the module
is skipped with that reason; run ``python -m pytest tests/kernels -k triton``. With CUDA the kernels are
compiled and every test runs on the GPU.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
gpu_only = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")]


def load_triton_ops() -> ModuleType:
    if CUDA:
        pytest.importorskip("triton", reason="triton is not installed (the gpu extra)")
        return importlib.import_module("kernels.triton_ops")
    already_imported = "triton" in sys.modules
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        pytest.importorskip("triton", reason="triton is not installed (the gpu extra)")
        language = importlib.import_module("triton.language")
        if already_imported and type(language.zeros).__name__ != "InterpretedFunction":
            pytest.skip(
                "triton was imported in compiled mode before these tests; without a GPU they need the "
                "interpreter: run `python -m pytest tests/kernels -k triton`",
                allow_module_level=True,
            )
        return importlib.import_module("kernels.triton_ops")
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


@pytest.fixture
def interpreter_env(monkeypatch: pytest.MonkeyPatch) -> None:
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def _poisoned(shape, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    out = torch.empty(tuple(shape), dtype=dtype, device=device)
    if dtype.is_floating_point:
        return out.fill_(float("nan"))
    if dtype == torch.bool:
        return out.fill_(True)
    return out.fill_(-77 if dtype.is_signed else 0xAB)


@pytest.fixture
def poison(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every output a launcher allocates starts as NaN (floats), True (masks) or a sentinel (integers), so an
    element a kernel forgets to write fails the comparison."""
    common = importlib.import_module("kernels.triton._common")
    monkeypatch.setattr(common, "new_output", _poisoned)


def random_tensor(shape, dtype: torch.dtype, *, generator: torch.Generator, device=DEVICE) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=generator).to(dtype=dtype, device=device)
