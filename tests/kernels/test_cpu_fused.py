"""The CPU twins (``kernels.cpu_fused``) against the torch reference they replace: bit-exact over odd tails,
K in {1, 2, 5, 8}, every storage dtype, the multithreaded split, NaN/Inf propagation; inputs never written; the
``ALLOY_KERNELS`` switch picks the twin (auto) or the reference (torch)."""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels import cpu_fused, reference
from kernels.dispatch import kernel

SIZES = [0, 1, 1023, 4097, cpu_fused.BLOCK * 3 + 5, (1 << 18) + 12345]  # the last one runs on every thread
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _inputs(numel: int, k: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(numel, generator=g) * 3
    fts = [(base + 0.05 * torch.randn(numel, generator=g) * (t + 1)).to(dtype) for t in range(k)]
    return base.to(dtype), fts


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


# the threaded split (the largest size) at K <= 2 only: keeps the suite fast on 2 cores
CASES = [(n, k) for n in SIZES for k in (1, 2, 5, 8) if n <= 1 << 18 or k <= 2]


@pytest.mark.parametrize(("numel", "k"), CASES)
def test_fused_task_arithmetic_is_bit_exact(numel: int, k: int) -> None:
    for i, (dtype, out_dtype) in enumerate([(d, o) for d in DTYPES for o in DTYPES]):
        base, fts = _inputs(numel, k, dtype, seed=numel + k + i)
        weights = [0.5 - 0.3 * t for t in range(k)]
        for scale in (1.0, 0.37):
            want = reference.fused_task_arithmetic(base, fts, weights, scale=scale, out_dtype=out_dtype)
            got = cpu_fused.fused_task_arithmetic(base, fts, weights, scale=scale, out_dtype=out_dtype)
            assert got.dtype == out_dtype and got.shape == base.shape
            assert torch.equal(_bits(got), _bits(want)), (dtype, out_dtype, scale)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_result_does_not_depend_on_the_thread_count(threads: int) -> None:
    base, fts = _inputs((1 << 19) + 7, 3, torch.bfloat16, seed=1)
    want = reference.fused_task_arithmetic(base, fts, [1, 1, 1], scale=0.5, out_dtype=torch.bfloat16)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = cpu_fused.fused_task_arithmetic(base, fts, [1, 1, 1], scale=0.5, out_dtype=torch.bfloat16)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(_bits(got), _bits(want))


def test_shapes_are_kept_and_non_contiguous_inputs_are_read_right() -> None:
    base = torch.randn(64, 48)
    fts = [torch.randn(48, 64).t(), torch.randn(64, 48)]  # a transposed view
    want = reference.fused_task_arithmetic(base, fts, [1.0, 2.0], scale=1.0, out_dtype=torch.float16)
    got = cpu_fused.fused_task_arithmetic(base, fts, [1.0, 2.0], scale=1.0, out_dtype=torch.float16)
    assert got.shape == (64, 48) and torch.equal(_bits(got), _bits(want))


@pytest.mark.parametrize("fn", [cpu_fused.fused_task_arithmetic, reference.fused_task_arithmetic])
def test_inputs_are_never_written_and_nan_reaches_the_output(fn) -> None:
    base = torch.randn(5000)  # float32: .float() is the base itself, the case that used to be overwritten
    fts = [base + 1, base + 2]
    fts[1][17] = float("nan")
    fts[0][4000] = float("inf")
    before = [t.clone() for t in (base, *fts)]
    out = fn(base, fts, [1.0, 1.0], scale=1.0, out_dtype=torch.float32)
    assert torch.isnan(out[17]) and torch.isinf(out[4000])
    for t, b in zip((base, *fts), before, strict=True):
        assert torch.equal(t, b) or torch.equal(torch.isnan(t), torch.isnan(b))


def test_fp16_overflow_is_inf_in_the_cast_output() -> None:
    base = torch.full((10,), 60000.0, dtype=torch.float16)
    fts = [torch.full((10,), 64000.0, dtype=torch.float16), torch.full((10,), 65000.0, dtype=torch.float16)]
    out = cpu_fused.fused_task_arithmetic(base, fts, [1.0, 1.0], scale=3.0, out_dtype=torch.float16)
    assert torch.isinf(out).all()  # the pipeline's check after the cast catches this


def test_errors_match_the_reference() -> None:
    with pytest.raises(ValueError, match="weights"):
        cpu_fused.fused_task_arithmetic(torch.zeros(3), [torch.zeros(3)], [1, 2], out_dtype=torch.float32)
    with pytest.raises(ValueError, match="shape"):
        cpu_fused.fused_task_arithmetic(torch.zeros(3), [torch.zeros(4)], [1], out_dtype=torch.float32)


def test_dispatch_picks_the_twin_on_cpu_and_the_reference_when_asked(monkeypatch) -> None:
    monkeypatch.setenv("ALLOY_KERNELS", "auto")
    assert kernel("fused_task_arithmetic", torch.zeros(1)) is cpu_fused.fused_task_arithmetic
    assert kernel("fused_sparse_merge", torch.zeros(1)) is cpu_fused.fused_sparse_merge
    assert kernel("disjoint_merge", torch.zeros(1)) is reference.disjoint_merge  # no twin: the reference
    monkeypatch.setenv("ALLOY_KERNELS", "torch")
    assert kernel("fused_task_arithmetic", torch.zeros(1)) is reference.fused_task_arithmetic
    out = kernels.fused_task_arithmetic(torch.ones(4), [torch.ones(4) * 3], [0.5], out_dtype=torch.float32)
    assert torch.equal(out, torch.full((4,), 2.0))


def _stack(k: int, rows: int, m: int, seed: int) -> torch.Tensor:
    x = torch.randn(k, rows, m, generator=torch.Generator().manual_seed(seed))
    x[..., ::4] = x[..., 5:6]  # many exact ties
    x[..., ::8] = -x[..., ::8]
    x[..., 3] = 0.0  # exact zeros never count as kept or as conflicts
    return x


def _selections(k: int, rows: int, m: int) -> list[dict]:
    g = torch.Generator().manual_seed(k * 7 + m)
    keep = torch.randint(1, max(2, m // 2), (k * rows,), generator=g)
    skip = torch.randint(0, max(1, m // 4), (k * rows,), generator=g)
    densities = [0.3 + 0.6 * t / max(1, k - 1) for t in range(k)]
    keys = [reference.dare_key(seed=11, source_index=t, name="w") for t in range(k)]
    return [
        {},
        {"keep": keep},
        {"keep": keep, "skip": skip},
        {"keep": keep, "scale": torch.rand(k * rows) + 0.1, "ternary": True},
        {"dare": (keys, densities), "scale": torch.tensor([1 / d for d in densities])},
    ]


WEIGHTS = {
    "equal": lambda k: torch.ones(k),
    "ramp": lambda k: torch.linspace(0.5, 1.5, k),
    "signed": lambda k: torch.tensor([(-1.0) ** t * (t + 1) * 0.5 for t in range(k)]),
    "with_zero": lambda k: torch.tensor([0.0] + [1.0] * (k - 1)),
}


@pytest.mark.parametrize(("k", "rows", "m"), [(1, 1, 1023), (2, 3, 4097), (5, 2, 129), (8, 1, 700)])
@pytest.mark.parametrize("weights", list(WEIGHTS))
def test_fused_sparse_merge_is_bit_exact(k: int, rows: int, m: int, weights: str) -> None:
    x = _stack(k, rows, m, seed=k + rows + m)
    w = WEIGHTS[weights](k)
    for selection in _selections(k, rows, m):
        for consensus in (True, False):
            for mean in (True, False):
                args = {"consensus": consensus, "mean": mean, **selection}
                want = reference.fused_sparse_merge(x, w, **args)
                got = cpu_fused.fused_sparse_merge(x, w, **args)
                assert got[0].shape == want[0].shape
                assert torch.equal(_bits(got[0]), _bits(want[0])), (selection.keys(), consensus, mean)
                assert (int(got[1]), int(got[2])) == (int(want[1]), int(want[2]))


def test_fused_sparse_merge_threaded_split_is_bit_exact() -> None:
    x = _stack(3, 4, (1 << 16) + 17, seed=5)  # over the parallel threshold: every thread takes a span
    w = torch.tensor([0.7, 1.0, 1.3])
    keep = torch.full((12,), 20000)
    for consensus, mean in [(True, True), (True, False), (False, True)]:
        want = reference.fused_sparse_merge(x, w, consensus=consensus, mean=mean, keep=keep)
        got = cpu_fused.fused_sparse_merge(x, w, consensus=consensus, mean=mean, keep=keep)
        assert torch.equal(_bits(got[0]), _bits(want[0]))
        assert (int(got[1]), int(got[2])) == (int(want[1]), int(want[2]))


def test_fused_sparse_merge_weight_count_is_checked() -> None:
    with pytest.raises(ValueError, match="weights"):
        cpu_fused.fused_sparse_merge(torch.zeros(2, 1, 4), torch.ones(3), consensus=True, mean=True)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_the_in_pass_gram_matrix_matches_float64_and_leaves_the_output_bit_identical(k: int) -> None:
    gen = torch.Generator().manual_seed(100 + k)
    n = cpu_fused._PARALLEL_MIN + 3 * cpu_fused.BLOCK + 123  # spans on every thread, blocks, an odd tail
    base = torch.randn(n, generator=gen).to(torch.bfloat16)
    fts = [(base.float() + 0.01 * torch.randn(n, generator=gen)).to(torch.bfloat16) for _ in range(k)]
    weights = [0.5 + i for i in range(k)]
    taus = torch.stack([t.double() - base.double() for t in fts])
    want_gram = taus @ taus.T
    for impl in (cpu_fused, reference):
        gram = torch.zeros((k, k), dtype=torch.float64)
        out = impl.fused_task_arithmetic(base, fts, weights, scale=0.7, out_dtype=torch.bfloat16, gram=gram)
        plain = reference.fused_task_arithmetic(base, fts, weights, scale=0.7, out_dtype=torch.bfloat16)
        assert torch.equal(out, plain)
        torch.testing.assert_close(gram, want_gram, rtol=1e-5, atol=0)
    torch.testing.assert_close(
        reference.task_vector_gram(taus.float().reshape(k, 1, -1)), want_gram, rtol=1e-5, atol=0
    )
