"""Triton elementwise kernels against the torch reference: fused task arithmetic, bit pack/unpack, DARE masks,
ternarize. Without a GPU they run interpreted on the CPU at small sizes (see ``triton_support``); the
``gpu``-marked variants repeat them at full size on CUDA. Outputs are NaN-poisoned before every launch."""

from __future__ import annotations

import numpy as np
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
#: (rtol, atol) of the output dtype: ~1 ulp, since FMA contraction may round the fp32 sum differently
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1.6e-2, 1e-2), torch.float16: (2e-3, 2e-3)}
SIZES = (1, 1023, 4097)
GPU_SIZES = (1, 1023, 4097, (1 << 20) + 3, (3001, 4097))


def _check_task_arithmetic(size, k: int, out_dtype: torch.dtype, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    shape = size if isinstance(size, tuple) else (size,)
    base = random_tensor(shape, out_dtype, generator=gen)
    # any mix of input dtypes: model t is stored in DTYPES[(t + seed) % 3]
    thetas = [random_tensor(shape, DTYPES[(t + seed) % 3], generator=gen) for t in range(k)]
    weights = (torch.rand(k, generator=gen) * 2 - 0.5).tolist()
    got = ops.fused_task_arithmetic(base, thetas, weights, scale=0.37, out_dtype=out_dtype)
    want = reference.fused_task_arithmetic(base, thetas, weights, scale=0.37, out_dtype=out_dtype)
    assert got.dtype == out_dtype and got.shape == base.shape and got.device == base.device
    rtol, atol = TOLERANCE[out_dtype]
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("k", (1, 2, 5, 8))
@pytest.mark.parametrize("size", SIZES)
def test_triton_fused_task_arithmetic(size, k, out_dtype):
    _check_task_arithmetic(size, k, out_dtype, seed=size * 31 + k)


@pytest.mark.parametrize("k", (0, 9, 17))
def test_triton_fused_task_arithmetic_chains_past_eight_sources(k):
    _check_task_arithmetic(1023, k, torch.float32, seed=k)


def test_triton_fused_task_arithmetic_one_model_lambda_one_is_the_finetune():
    gen = torch.Generator().manual_seed(3)
    base, theta = (random_tensor((4097,), torch.float32, generator=gen) for _ in range(2))
    got = ops.fused_task_arithmetic(base, [theta], [1.0], out_dtype=torch.float32)
    torch.testing.assert_close(got, theta, rtol=0, atol=1e-6)


def test_triton_fused_task_arithmetic_rejects_bad_input():
    base = torch.zeros(4, device=DEVICE)
    with pytest.raises(ValueError, match="weights"):
        ops.fused_task_arithmetic(base, [base], [1.0, 2.0], out_dtype=torch.float32)
    with pytest.raises(ValueError, match="shape"):
        ops.fused_task_arithmetic(base, [torch.zeros(5, device=DEVICE)], [1.0], out_dtype=torch.float32)


@pytest.mark.parametrize("size", (1, 7, 8, 1023, 4097))
def test_triton_pack_unpack_bits(size):
    gen = torch.Generator().manual_seed(size)
    mask = (torch.rand(size, generator=gen) < 0.3).to(DEVICE)
    packed = ops.pack_bits(mask)
    assert torch.equal(packed, reference.pack_bits(mask))
    assert np.array_equal(packed.cpu().numpy(), np.packbits(mask.cpu().numpy(), bitorder="little"))
    assert torch.equal(ops.unpack_bits(packed, size), mask)
    assert torch.equal(ops.unpack_bits(packed, size), reference.unpack_bits(packed, size))


def test_triton_pack_bits_of_a_2d_mask_flattens():
    mask = torch.rand(3, 11, generator=torch.Generator().manual_seed(0)) < 0.5
    assert torch.equal(ops.pack_bits(mask.to(DEVICE)).cpu(), reference.pack_bits(mask))


def test_triton_unpack_bits_rejects_too_few_bytes():
    with pytest.raises(ValueError, match="cannot hold"):
        ops.unpack_bits(torch.zeros(1, dtype=torch.uint8, device=DEVICE), 9)


DARE_CASES = [
    # (shape, density, seed, source_index, name): seeds past 2^32 and at 2^64-1 exercise every key bit
    ((1,), 0.5, 0, 0, "w"),
    ((1023,), 0.1, 1234, 2, "model.layers.3.mlp.down_proj.weight"),
    ((7, 585), 0.9, (1 << 40) + 7, 5, "lm_head.weight"),
    ((4097,), 0.0, 99, 1, "x"),
    ((3, 5, 7), 1.0, 1, 0, "y"),
    ((4097,), 0.3, (1 << 64) - 1, 7, "z"),
]


@pytest.mark.parametrize(("shape", "density", "seed", "source", "name"), DARE_CASES)
def test_triton_dare_keep_mask_matches_reference_exactly(shape, density, seed, source, name):
    kwargs = dict(density=density, seed=seed, source_index=source, name=name)
    got = ops.dare_keep_mask(shape, device=DEVICE, **kwargs)
    want = reference.dare_keep_mask(shape, device="cpu", **kwargs)
    assert got.shape == want.shape and got.dtype == torch.bool
    assert torch.equal(got.cpu(), want)


def test_triton_dare_keep_mask_high_index_bits_match_the_scalar_hash():
    # elements past 2^32 can't be materialised here: check the kernel's index split on the scalar oracle instead
    key = reference.dare_key(seed=5, source_index=1, name="w")
    got = ops.dare_keep_mask((4097,), density=0.5, seed=5, source_index=1, name="w", device=DEVICE).cpu()
    for i in (0, 1, 4096):
        h = reference.mix32(reference.mix32((i & 0xFFFFFFFF) ^ key) ^ (i >> 32))
        assert bool(got[i]) == ((h >> 8) < reference.dare_threshold(0.5))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ((1, 1), (3, 1023), (2, 4097)))
def test_triton_ternarize_values_are_exact(shape, dtype):
    gen = torch.Generator().manual_seed(shape[1])
    x = random_tensor(shape, dtype, generator=gen)
    x.view(-1)[::5] = 0  # kept exact zeros stay 0
    mask = (torch.rand(shape, generator=gen) < 0.4).to(DEVICE)
    scale = (torch.rand(shape[0], generator=gen) + 0.1).to(DEVICE)
    got = ops.ternarize(x, mask, scale)
    assert torch.equal(got, reference.ternarize(x, mask, scale))


# ---- full size on a GPU ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("k", (1, 2, 5, 8))
@pytest.mark.parametrize("size", GPU_SIZES)
@pytest.mark.parametrize("marks", [pytest.param(None, marks=gpu_only)])
def test_triton_fused_task_arithmetic_full_size(marks, size, k, out_dtype):
    _check_task_arithmetic(size, k, out_dtype, seed=k)


@pytest.mark.parametrize("marks", [pytest.param(None, marks=gpu_only)])
def test_triton_bits_and_dare_full_size(marks):
    n = (1 << 24) + 5
    for density in (0.1, 0.5, 0.9):
        kwargs = dict(density=density, seed=2**33 + 1, source_index=3, name="model.embed_tokens.weight")
        mask = ops.dare_keep_mask((n,), device=DEVICE, **kwargs)
        assert torch.equal(mask.cpu(), reference.dare_keep_mask((n,), device="cpu", **kwargs))
        packed = ops.pack_bits(mask)
        assert torch.equal(packed.cpu(), reference.pack_bits(mask.cpu()))
        assert torch.equal(ops.unpack_bits(packed, n), mask)
