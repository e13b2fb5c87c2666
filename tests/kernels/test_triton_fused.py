"""``fused_sparse_merge`` (one-pass sparsify + consensus + aggregate) against the composition of reference ops:
``topk_mask`` (magnitude, Breadcrumbs band) / ``select_by_threshold`` (global-scope boundaries) /
``dare_keep_mask`` -> ``where`` -> ``disjoint_merge`` or the weighted sum/mean of ``merge_ops.methods.stages``.
K in {1, 2, 5, 8}, per-tensor (R = 1) and per-row scopes, inputs with many exact ties."""

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
pytestmark = pytest.mark.usefixtures("interpreter_env", "poison")


def _stack(k: int, rows: int, m: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    x = random_tensor((k, rows, m), dtype, generator=gen)
    if m > 8:
        x[..., ::4] = x[..., 5:6]  # ties at one magnitude per row, so tie quotas split
        x[..., ::8] = -x[..., ::8]
    return x


def _reference_merge(
    sparse: torch.Tensor, weights: torch.Tensor, *, consensus: bool, mean: bool
) -> torch.Tensor:
    if consensus:
        return reference.disjoint_merge(sparse, weights, mean=mean)[0]
    merged = (sparse * weights.reshape(-1, 1, 1)).sum(dim=0)
    divisor = float(weights.sum())
    return merged / (divisor if abs(divisor) >= 1e-8 else 1.0) if mean else merged


def _check(got: torch.Tensor, sparse: torch.Tensor, weights, consensus: bool, mean: bool) -> None:
    want = _reference_merge(sparse, weights, consensus=consensus, mean=mean)
    torch.testing.assert_close(got.cpu(), want.reshape(got.shape), rtol=1e-5, atol=1e-6)


CASES = [(k, 1, 1023) for k in (1, 2, 5, 8)] + [(2, 3, 129), (2, 1, 4097), (3, 1, 1)]


@pytest.mark.parametrize("consensus", (True, False))
@pytest.mark.parametrize(("k", "rows", "m"), CASES)
def test_triton_fused_magnitude_and_breadcrumbs(k, rows, m, consensus):
    gen = torch.Generator().manual_seed(k * 7 + rows)
    x = _stack(k, rows, m, torch.bfloat16 if k == 5 else torch.float32, gen)
    weights = torch.rand(k, generator=gen) + 0.2
    flat = x.cpu().reshape(k * rows, m)
    keep = torch.randint(1, m + 1, (k * rows,), generator=gen)
    skip = torch.randint(0, m // 3 + 1, (k * rows,), generator=gen)
    keep_band = torch.minimum(keep, m - skip)
    for mean in (False, True):
        sparse = torch.where(reference.topk_mask(flat, keep=keep), flat.float(), 0.0).view(k, rows, m)
        got = ops.fused_sparse_merge(x, weights, keep=keep, consensus=consensus, mean=mean)
        _check(got, sparse, weights, consensus, mean)
        band = reference.topk_mask(flat, keep=keep_band, skip=skip)
        sparse = torch.where(band, flat.float(), 0.0).view(k, rows, m)
        got = ops.fused_sparse_merge(x, weights, keep=keep_band, skip=skip, consensus=consensus, mean=mean)
        _check(got, sparse, weights, consensus, mean)


@pytest.mark.parametrize("k", (1, 2, 5, 8))
def test_triton_fused_global_boundaries(k):
    # global scope: thresholds from the streaming pass, this tensor's tie quota (split here on purpose)
    gen = torch.Generator().manual_seed(k)
    x = _stack(k, 1, 1023, torch.float32, gen)
    flat = x.cpu().reshape(k, -1)
    threshold = flat.abs()[:, 5].clone()  # the tied magnitude
    quota = torch.randint(0, 200, (k,), generator=gen)
    lower = (torch.full((k,), 2.5), torch.zeros(k, dtype=torch.int64))
    mask = reference.select_by_threshold(flat, threshold, quota) & ~reference.select_by_threshold(
        flat, *lower
    )
    sparse = torch.where(mask, flat, 0.0).view(k, 1, -1)
    weights = torch.ones(k)
    got = ops.fused_sparse_merge(
        x, weights, boundary=(threshold, quota), lower_boundary=lower, consensus=True, mean=True
    )
    _check(got, sparse, weights, True, True)


@pytest.mark.parametrize("consensus", (True, False))
@pytest.mark.parametrize("k", (1, 2, 5, 8))
def test_triton_fused_dare(k, consensus):
    gen = torch.Generator().manual_seed(k + 100)
    rows, m = 3, 341
    x = _stack(k, rows, m, torch.float16, gen)
    weights = torch.rand(k, generator=gen) + 0.2
    densities = [0.1 + 0.8 * t / max(k - 1, 1) for t in range(k)]
    keys = [reference.dare_key(seed=2**40 + 3, source_index=t, name="layers.1.w") for t in range(k)]
    sparse = torch.stack(
        [
            torch.where(
                reference.dare_keep_mask(
                    (rows, m), density=d, seed=2**40 + 3, source_index=t, name="layers.1.w"
                ),
                x[t].cpu().float(),
                0.0,
            )
            / d
            for t, d in enumerate(densities)
        ]
    )
    got = ops.fused_sparse_merge(
        x, weights, dare=(keys, densities, [1 / d for d in densities]), consensus=consensus, mean=True
    )
    _check(got, sparse, weights, consensus, True)


@pytest.mark.parametrize("marks", [pytest.param(None, marks=gpu_only)])
@pytest.mark.parametrize("k", (1, 2, 5, 8))
def test_triton_fused_full_size(marks, k):
    gen = torch.Generator().manual_seed(k)
    rows, m = 1, (1 << 22) + 3
    x = _stack(k, rows, m, torch.bfloat16, gen)
    weights = torch.rand(k, generator=gen) + 0.2
    keep = torch.full((k,), m // 5)
    sparse = torch.where(
        reference.topk_mask(x.cpu().reshape(k, m), keep=keep), x.cpu().reshape(k, m).float(), 0.0
    )
    got = ops.fused_sparse_merge(x, weights, keep=keep, consensus=True, mean=True)
    _check(got, sparse.view(k, rows, m), weights, True, True)
