"""merge_ops.tensor_merge helpers: the finiteness check every output and task vector goes through."""

from __future__ import annotations

import pytest
import torch

from merge_ops.tensor_merge import all_finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_all_finite_finds_every_nan_and_inf(dtype: torch.dtype) -> None:
    x = torch.randn(4097).to(dtype)
    assert all_finite(x) and all_finite(x.reshape(17, 241))
    for pos in (0, 1, 2048, 4096):
        for bad in (float("nan"), float("inf"), float("-inf")):
            y = x.clone()
            y[pos] = bad
            assert not all_finite(y), (pos, bad)


def test_all_finite_large_finite_values_are_no_false_alarm() -> None:
    # a float16 sum of these would overflow; the values themselves are finite
    assert all_finite(torch.full((1000,), 65504.0, dtype=torch.float16))
    assert all_finite(torch.full((1000,), 3e38, dtype=torch.float32))


def test_all_finite_of_empty_and_integer_tensors() -> None:
    assert all_finite(torch.zeros(0, 3))
    assert all_finite(torch.arange(10))
