"""merge_ops.tensor_merge helpers: the finiteness check every output and task vector goes through, and the float32
reference weights handed to the methods that rebuild θ_t."""

from __future__ import annotations

import pytest
import torch

from kernels import buffers
from merge_ops.tensor_merge import _float32_reference, all_finite


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


def test_float32_reference_is_the_widened_base_in_one_reused_buffer() -> None:
    """Inside ``buffers.reuse()`` each tensor's float32 θ_0 lands in the same buffer, refilled (values equal to
    ``base.float()`` every time, also for a smaller tensor after a larger one); outside it, and for float32 bases,
    nothing is shared."""
    g = torch.Generator().manual_seed(11)
    first = torch.randn(64, 33, generator=g).bfloat16()
    second = torch.randn(17, 5, generator=g).to(torch.float16)
    with buffers.reuse():
        a = _float32_reference(first)
        assert a.dtype == torch.float32 and torch.equal(a, first.float())
        b = _float32_reference(second)
        assert b.shape == second.shape and torch.equal(b, second.float())
        assert b.untyped_storage().data_ptr() == a.untyped_storage().data_ptr()
    plain = torch.randn(8, generator=g)
    assert _float32_reference(plain) is plain
    outside = _float32_reference(first)
    assert torch.equal(outside, first.float()) and outside.untyped_storage().data_ptr() != first.data_ptr()
