"""Triton radix-select kernels against the torch reference: rank boundaries, selection with the lowest-index tie
rule, top-k and Breadcrumbs band masks, magnitude histograms. All exact (bit-equal thresholds, equal counts and
masks). Inputs carry many exact ties so partial tie quotas are exercised. Interpreted on the CPU at small
sizes; ``gpu``-marked variants run at full size on CUDA."""

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
# (rows, n): odd tails and a non-power-of-two row count
SHAPES = ((1, 1), (3, 1023), (2, 4097), (5, 129))
GPU_SHAPES = ((1, 1), (3, 1023), (8, 4097), (5, (1 << 20) + 3), (3001, 515))


def _inputs(shape, dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = random_tensor(shape, dtype, generator=gen)
    if shape[1] > 8:
        x[:, ::3] = x[:, 7:8]  # a third of each row ties at one magnitude, half of those negative
        x[:, ::6] = -x[:, ::6]
        x[:, 1::11] = 0
    rows, n = shape
    keep = torch.randint(0, n + 1, (rows,), generator=gen)
    skip = torch.randint(0, n // 2 + 1, (rows,), generator=gen)
    return x, keep, skip, gen


def _check_selection(shape, dtype, seed: int) -> None:
    x, keep, skip, gen = _inputs(shape, dtype, seed)
    rows, n = shape
    rank = torch.randint(0, n + 2, (rows,), generator=gen)  # rank > n selects everything
    got_t, got_q = ops.rank_boundary(x, rank)
    want_t, want_q = reference.rank_boundary(x.cpu(), rank)
    assert torch.equal(got_t.cpu(), want_t) and torch.equal(got_q.cpu(), want_q)
    assert torch.equal(
        ops.select_by_threshold(x, want_t, want_q).cpu(),
        reference.select_by_threshold(x.cpu(), want_t, want_q),
    )
    top = ops.topk_mask(x, keep=keep)
    assert torch.equal(top.cpu(), reference.topk_mask(x.cpu(), keep=keep))
    assert torch.equal(top.sum(dim=1).cpu(), keep.clamp(max=n))  # the kept count is exact
    keep_band = torch.minimum(keep, n - skip)
    band = ops.topk_mask(x, keep=keep_band, skip=skip)
    assert torch.equal(band.cpu(), reference.topk_mask(x.cpu(), keep=keep_band, skip=skip))
    assert torch.equal(band.sum(dim=1).cpu(), keep_band)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_selection_matches_reference_exactly(shape, dtype):
    _check_selection(shape, dtype, seed=shape[1])


def test_triton_topk_scalar_keep_and_no_ties_taken():
    x = torch.tensor([[3.0, -3.0, 1.0, 3.0, 2.0]], device=DEVICE)
    for keep in range(6):
        got = ops.topk_mask(x, keep=torch.tensor(keep))
        assert torch.equal(got.cpu(), reference.topk_mask(x.cpu(), keep=torch.tensor(keep)))
    # lowest flat index first among the three 3.0 ties
    assert ops.topk_mask(x, keep=torch.tensor(2)).cpu().tolist() == [[True, True, False, False, False]]


@pytest.mark.parametrize("digit_bits", (7, 11))
@pytest.mark.parametrize("shape", ((1, 1), (3, 1023), (2, 4097)))
def test_triton_magnitude_histogram(shape, digit_bits):
    x, _, _, gen = _inputs(shape, torch.float32, seed=digit_bits)
    # first pass (every element), then a pass inside the prefix of each row's largest element
    top = ops.magnitude_histogram(
        x,
        prefix=torch.zeros(shape[0], dtype=torch.int64),
        prefix_shift=31,
        digit_shift=31 - digit_bits,
        digit_bits=digit_bits,
    )
    assert torch.equal(
        top.cpu(),
        reference.magnitude_histogram(
            x.cpu(),
            prefix=torch.zeros(shape[0], dtype=torch.int64),
            prefix_shift=31,
            digit_shift=31 - digit_bits,
            digit_bits=digit_bits,
        ),
    )
    assert torch.equal(top.sum(dim=1).cpu(), torch.full((shape[0],), shape[1]))
    prefix = reference.magnitude_bits(x.cpu()).amax(dim=1).to(torch.int64) >> (31 - digit_bits)
    inner = dict(
        prefix=prefix, prefix_shift=31 - digit_bits, digit_shift=31 - 2 * digit_bits, digit_bits=digit_bits
    )
    want = reference.magnitude_histogram(x.cpu(), **inner)
    assert torch.equal(ops.magnitude_histogram(x, **inner).cpu(), want)
    # a pass over many tensors adds each one's counts into one histogram
    total = torch.zeros_like(top)
    for _ in range(2):
        assert ops.magnitude_histogram(x, **inner, out=total) is total
    assert torch.equal(total.cpu(), 2 * want)


# ---- full size on a GPU ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("marks", [pytest.param(None, marks=gpu_only)])
def test_triton_selection_full_size(marks, shape, dtype):
    _check_selection(shape, dtype, seed=7)
