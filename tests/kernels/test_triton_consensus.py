"""Triton TIES consensus kernels against the torch reference: elected signs and contributor counts exactly,
merged values within float32 rounding (the reference's sum order over K may differ), NaN-poisoned outputs,
K in {1, 2, 5, 8}. Interpreted on the CPU at small sizes; ``gpu``-marked variants at full size on CUDA."""

from __future__ import annotations

import pytest
import torch

from kernels import reference
from tests.kernels.triton_support import (  # noqa: F401  (fixtures)
    DEVICE,
    gpu_only,
    interpreter_env,
    load_triton_ops,
    poison,
    random_tensor,
)

ops = load_triton_ops()
# every test: interpreter env (without a GPU) and NaN-poisoned outputs
pytestmark = pytest.mark.usefixtures("interpreter_env", "poison")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SIZES = ((1,), (1023,), (33, 31))
GPU_SIZES = ((1,), (4097,), (3001, 1031))


def _check_consensus(inner, k: int, dtype: torch.dtype, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = random_tensor((k, *inner), dtype, generator=gen)
    x[(torch.rand(x.shape, generator=gen) < 0.5).to(x.device)] = 0  # sparsified: exact zeros never vote
    weights = torch.rand(k, generator=gen) * 2 - 0.5  # a negative weight flips its model's vote
    assert torch.equal(ops.elect_sign(x, weights).cpu(), reference.elect_sign(x.cpu(), weights))
    for mean in (False, True):
        merged, contributors = ops.disjoint_merge(x, weights, mean=mean)
        want, want_count = reference.disjoint_merge(x.cpu(), weights, mean=mean)
        assert merged.shape == want.shape and merged.dtype == torch.float32
        assert torch.equal(contributors.cpu(), want_count)
        torch.testing.assert_close(merged.cpu(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", (1, 2, 5, 8))
@pytest.mark.parametrize("inner", SIZES)
def test_triton_disjoint_merge_matches_reference(inner, k, dtype):
    _check_consensus(inner, k, dtype, seed=k * 101 + len(inner))


def test_triton_disjoint_merge_of_identical_models_is_that_model():
    x = random_tensor((4097,), torch.float32, generator=torch.Generator().manual_seed(0))
    merged, contributors = ops.disjoint_merge(torch.stack([x, x, x]), torch.ones(3), mean=True)
    torch.testing.assert_close(merged, x, rtol=1e-6, atol=0)
    assert torch.equal(contributors.cpu(), (x != 0).cpu().long() * 3)


def test_triton_elect_sign_zero_sum_elects_plus_one():
    x = torch.tensor([[1.0, 0.0, -2.0], [-1.0, 0.0, 2.0]], device=DEVICE)
    assert ops.elect_sign(x, torch.ones(2)).cpu().tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", (1, 2, 5, 8))
@pytest.mark.parametrize("inner", GPU_SIZES)
@pytest.mark.parametrize("marks", [pytest.param(None, marks=gpu_only)])
def test_triton_disjoint_merge_full_size(marks, inner, k, dtype):
    _check_consensus(inner, k, dtype, seed=k)
