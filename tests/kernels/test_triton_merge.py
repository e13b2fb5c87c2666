"""The whole Triton merge path on CPU under the interpreter: every registered method merges a tiny model with
``ALLOY_KERNELS=torch`` and with ``ALLOY_KERNELS=triton`` (dispatch, fused ops, global statistics, report counts,
writer) and the two outputs agree: merged tensors within float32 rounding, the report's kept density and
sign-conflict rate (counts of the selections, masks and signs) exactly, ComPEFT artifacts (bit-packed masks and
signs) byte for byte. The merges run in one subprocess (``tests/kernels/interpreted_merge.py``) because
``TRITON_INTERPRET=1`` must be set before triton is first imported; on a GPU machine the ``gpu`` tests cover the
compiled kernels instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from kernels.dispatch import REFERENCE_ON_TRITON
from tests.kernels.interpreted_merge import merge_cases
from tests.utils.factories import load_all

pytest.importorskip("triton", reason="triton is not installed (the gpu extra)")

CASES = sorted(merge_cases())


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    workdir = tmp_path_factory.mktemp("interpreted")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("ALLOY_KERNELS", None)
    done = subprocess.run(
        [sys.executable, "-m", "tests.kernels.interpreted_merge", str(workdir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=280,  # inside pytest-timeout's 300 s for the first test, which pays for this fixture
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return workdir, json.loads((workdir / "results.json").read_text())


@pytest.mark.parametrize("case", CASES)
def test_triton_merge_equals_torch_merge(case: str, merged: tuple[Path, dict[str, Any]]) -> None:
    workdir, results = merged
    torch_run, triton_run = results[case]["torch"], results[case]["triton"]
    # the same ops were dispatched, every one of them to Triton in the triton run (but the ones that have no
    # Triton twin by design: one elementwise pass or a matmul, which torch runs at memory speed on a GPU)
    assert [op for op, _ in triton_run["ops"]] == [op for op, _ in torch_run["ops"]]
    assert {impl for op, impl in triton_run["ops"] if op not in REFERENCE_ON_TRITON} <= {"triton"}
    assert {impl for _, impl in torch_run["ops"]} <= {"torch"}
    assert triton_run["totals"] == torch_run["totals"]  # kept density and sign-conflict rate: exact counts
    want = load_all(workdir / "out" / case / "torch")
    got = load_all(workdir / "out" / case / "triton")
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        if tensor.is_floating_point():
            torch.testing.assert_close(got[name].float(), tensor.float(), rtol=1e-5, atol=1e-6, msg=name)
        else:
            assert torch.equal(got[name], tensor), name


def test_every_kernel_op_of_a_merge_ran_on_triton(merged: tuple[Path, dict[str, Any]]) -> None:
    _, results = merged
    ops = {op for runs in results.values() for op, impl in runs["triton"]["ops"] if impl == "triton"}
    merge_ops = {"fused_task_arithmetic", "fused_sparse_merge", "magnitude_histogram"}
    assert merge_ops | {"topk_mask", "pack_bits", "unpack_bits"} <= ops


def test_compressed_artifacts_are_identical(merged: tuple[Path, dict[str, Any]]) -> None:
    workdir, results = merged
    assert {impl for _, impl in results["compress"]["triton"]["ops"]} == {"triton"}
    for part in ("compressed", "restored"):
        want = load_all(workdir / "artifacts" / "torch" / part)
        got = load_all(workdir / "artifacts" / "triton" / part)
        assert set(got) == set(want) and want
        for name, tensor in want.items():
            assert torch.equal(got[name], tensor), f"{part}/{name}"


def test_explicit_triton_that_cannot_run_fails_the_merge_typed(monkeypatch, tmp_path: Path) -> None:
    """kernels raise their own ``KernelUnavailable``; merge_ops' entry points turn it into its typed error
    (same code, so the CLI line, the job row and the API's problem type are unchanged)."""
    import kernels.dispatch
    from merge_ops.errors import KernelUnavailableError, MergeError
    from merge_ops.pipeline import run_merge
    from merge_ops.recipe import load_recipe
    from tests.kernels.interpreted_merge import make_models

    paths = make_models(tmp_path / "models")
    monkeypatch.setattr(kernels.dispatch, "_load_triton_ops", lambda: None)  # as if triton were missing
    monkeypatch.setenv("ALLOY_KERNELS", "triton")
    recipe = load_recipe(
        {
            "method": "ties",
            "base": str(paths["base"]),
            "models": [{"source": str(paths["a"])}, {"source": str(paths["b"])}],
            "output": {"path": str(tmp_path / "out")},
        }
    )
    with pytest.raises(KernelUnavailableError) as raised:
        run_merge(recipe)
    assert isinstance(raised.value, MergeError) and raised.value.code == "kernel_unavailable"
    assert isinstance(raised.value.__cause__, kernels.KernelUnavailable)
    assert "can't run on Triton" in raised.value.detail and raised.value.context["op"]
    assert not (tmp_path / "out").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", CASES)
def test_compiled_triton_merge_on_cuda_equals_torch_on_cpu(case: str, monkeypatch, tmp_path: Path) -> None:
    """The same comparison with the compiled kernels: the merge on CUDA (``ALLOY_KERNELS=triton``) against the
    torch reference on the CPU."""
    from merge_ops.pipeline import run_merge
    from merge_ops.recipe import load_recipe
    from tests.kernels.interpreted_merge import fill_paths, make_models

    paths = make_models(tmp_path / "models")
    fields = fill_paths(merge_cases()[case], paths)
    reports = {}
    for mode, device in (("torch", "cpu"), ("triton", "cuda")):
        monkeypatch.setenv("ALLOY_KERNELS", mode)
        recipe = load_recipe({**fields, "output": {"path": str(tmp_path / mode)}})
        reports[mode] = run_merge(recipe, device=device)
    assert reports["triton"].totals == reports["torch"].totals
    want, got = load_all(tmp_path / "torch"), load_all(tmp_path / "triton")
    assert set(got) == set(want)
    for name, tensor in want.items():
        if tensor.is_floating_point():
            torch.testing.assert_close(got[name].float(), tensor.float(), rtol=1e-5, atol=1e-6, msg=name)
        else:
            assert torch.equal(got[name], tensor), name
