"""``fused_sparse_merge`` (one-pass sparsify + consensus + aggregate) against its torch reference twin, for every
selection family: top-k / Breadcrumbs band (``keep``/``skip``), precomputed global-scope boundaries, the DARE
mask with a rescale, ComPEFT ternarization, and no selection. K in {1, 2, 5, 8}, per-tensor (R = 1) and per-row
scopes, inputs with many exact ties; merged deltas within float32 rounding, kept/conflict counts exact."""

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


def _check(x: torch.Tensor, weights: torch.Tensor, **kwargs) -> None:
    got = ops.fused_sparse_merge(x, weights, **kwargs)
    cpu = {key: _to_cpu(value) for key, value in kwargs.items()}
    want = reference.fused_sparse_merge(x.cpu(), weights, **cpu)
    torch.testing.assert_close(got[0].cpu(), want[0], rtol=1e-5, atol=1e-6)
    assert int(got[1]) == int(want[1]), "kept count"
    assert int(got[2]) == int(want[2]), "sign-conflict count"


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, tuple):
        return tuple(_to_cpu(v) for v in value)
    return value


CASES = [(k, 1, 1023) for k in (1, 2, 5, 8)] + [(2, 3, 129), (2, 1, 4097), (3, 1, 1)]


@pytest.mark.parametrize("consensus", (True, False))
@pytest.mark.parametrize(("k", "rows", "m"), CASES)
def test_triton_fused_magnitude_breadcrumbs_and_ternary(k, rows, m, consensus):
    gen = torch.Generator().manual_seed(k * 7 + rows)
    x = _stack(k, rows, m, torch.bfloat16 if k == 5 else torch.float32, gen)
    weights = torch.rand(k, generator=gen) + 0.2
    keep = torch.randint(1, m + 1, (k * rows,), generator=gen)
    skip = torch.randint(0, m // 3 + 1, (k * rows,), generator=gen)
    band = torch.minimum(keep, m - skip)
    scale = torch.rand(k * rows, generator=gen) + 0.1
    for mean in (False, True):
        _check(x, weights, keep=keep, consensus=consensus, mean=mean)
        _check(x, weights, keep=band, skip=skip, consensus=consensus, mean=mean)
        _check(x, weights, keep=keep, scale=scale.to(DEVICE), ternary=True, consensus=consensus, mean=mean)


@pytest.mark.parametrize("k", (1, 2, 5, 8))
def test_triton_fused_global_boundaries(k):
    # global scope: thresholds from the streaming pass, this tensor's tie quota (split here on purpose)
    gen = torch.Generator().manual_seed(k)
    x = _stack(k, 1, 1023, torch.float32, gen)
    threshold = x.cpu().reshape(k, -1).abs()[:, 5].clone()  # the tied magnitude
    quota = torch.randint(0, 200, (k,), generator=gen)
    lower = (torch.full((k,), 2.5), torch.zeros(k, dtype=torch.int64))
    sigma = torch.rand(k, generator=gen) + 0.5
    weights = torch.ones(k)
    _check(x, weights, boundary=(threshold, quota), lower_boundary=lower, consensus=True, mean=True)
    _check(x, weights, boundary=(threshold, quota), scale=sigma, ternary=True, consensus=False, mean=False)


@pytest.mark.parametrize("consensus", (True, False))
@pytest.mark.parametrize("k", (1, 2, 5, 8))
def test_triton_fused_dare(k, consensus):
    gen = torch.Generator().manual_seed(k + 100)
    x = _stack(k, 3, 341, torch.float16, gen)
    weights = torch.rand(k, generator=gen) + 0.2
    densities = [0.1 + 0.9 * t / max(k - 1, 1) for t in range(k)]  # the last one is 1: keeps everything
    keys = [reference.dare_key(seed=2**40 + 3, source_index=t, name="layers.1.w") for t in range(k)]
    inverse = torch.tensor([1 / d for d in densities])
    _check(x, weights, dare=(keys, densities), scale=inverse, consensus=consensus, mean=True)
    _check(x, weights, dare=(keys, densities), consensus=consensus, mean=False)


@pytest.mark.parametrize("k", (1, 2, 5))
def test_triton_fused_without_selection(k):
    gen = torch.Generator().manual_seed(k + 200)
    x = _stack(k, 2, 777, torch.float32, gen)
    x[x.abs() < 0.5] = 0.0  # already sparse (DARE with a per-unit L1 rescale arrives like this)
    weights = torch.tensor([1.0, -0.5, 0.0, 2.0, 0.3][:k])
    for consensus in (True, False):
        _check(x, weights, consensus=consensus, mean=True)


@pytest.mark.parametrize("marks", [pytest.param(None, marks=gpu_only)])
@pytest.mark.parametrize("k", (1, 2, 5, 8))
def test_triton_fused_full_size(marks, k):
    gen = torch.Generator().manual_seed(k)
    x = _stack(k, 1, (1 << 22) + 3, torch.bfloat16, gen)
    weights = torch.rand(k, generator=gen) + 0.2
    _check(x, weights, keep=torch.full((k,), ((1 << 22) + 3) // 5), consensus=True, mean=True)
