"""The compiled CPU loops (``kernels.cpu_jit`` through ``kernels.cpu_fused`` / ``kernels.cpu_select``) against the
torch reference run with them switched off (``ALLOY_JIT=off``: the reference's own CPU selection then runs in
numpy), on fresh random inputs: bit-exact for merged values, selections and counts; within float32 rounding for
the Gram matrix. Also: the switch, the fallback for dtypes the loops don't compile, and the reused buffers."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import kernels
from kernels import buffers, compiled, cpu_fused, reference

pytestmark = pytest.mark.skipif(compiled.jit() is None, reason=f"numba unavailable: {compiled.jit_error()}")

LONG = (1 << 17) + 4099  # past the radix select's minimum row length and the parallel split, with a tail


@contextlib.contextmanager
def jit_off() -> Iterator[None]:
    before = os.environ.get("ALLOY_JIT")
    os.environ["ALLOY_JIT"] = "off"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("ALLOY_JIT")
        else:
            os.environ["ALLOY_JIT"] = before


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


def _models(n: int, k: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g)
    fts = [(base + 0.01 * (t + 1) * torch.randn(n, generator=g)).to(dtype) for t in range(k)]
    return base.to(dtype), fts


def test_the_switch_turns_the_loops_off_and_the_blocked_twin_gives_the_same_bits() -> None:
    base, fts = _models(LONG, 3, torch.bfloat16, seed=1)
    weights = [0.7, -0.4, 1.3]
    on = cpu_fused.fused_task_arithmetic(base, fts, weights, scale=0.37, out_dtype=torch.bfloat16).clone()
    with jit_off():
        assert compiled.jit() is None
        off = cpu_fused.fused_task_arithmetic(base, fts, weights, scale=0.37, out_dtype=torch.bfloat16)
    assert compiled.jit() is not None
    assert torch.equal(_bits(on), _bits(off))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("n", [1, 4097, LONG])
def test_task_vectors_are_the_reference_bit_for_bit(dtype: torch.dtype, n: int) -> None:
    base, fts = _models(n, 3, dtype, seed=n)
    got = cpu_fused.task_vectors(base, fts)
    want = reference.task_vectors(base, fts)
    assert got.dtype == torch.float32 and got.shape == (3, n)
    assert torch.equal(_bits(got), _bits(want))


@pytest.mark.parametrize("k", [1, 3])
def test_task_vectors_with_the_gram_matrix_from_the_same_pass(k: int) -> None:
    base, fts = _models(LONG, k, torch.bfloat16, seed=k)
    gram = torch.zeros((k, k), dtype=torch.float64)
    got = cpu_fused.task_vectors(base, fts, gram=gram)
    want = reference.task_vectors(base, fts)
    assert torch.equal(_bits(got), _bits(want))
    exact = want.double() @ want.double().T
    torch.testing.assert_close(gram, exact, rtol=1e-5, atol=1e-6)
    reference_gram = torch.zeros((k, k), dtype=torch.float64)
    reference.task_vectors(base, fts, gram=reference_gram)
    torch.testing.assert_close(reference_gram, exact, rtol=1e-5, atol=1e-6)


def test_task_vectors_refuse_a_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="shape"):
        cpu_fused.task_vectors(torch.zeros(4), [torch.zeros(5)])


@pytest.mark.parametrize("k", [1, 4])
def test_the_gram_matrix_is_float64_exact_up_to_float32_rounding(k: int) -> None:
    taus = torch.randn(k, 3, LONG // 3, generator=torch.Generator().manual_seed(k))
    want = taus.reshape(k, -1).double() @ taus.reshape(k, -1).double().T
    got = cpu_fused.task_vector_gram(taus)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-3)
    assert torch.equal(got, got.T)


@pytest.mark.parametrize("base_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("scale", [1.0, 0.37, -2.0, 0.0])
def test_apply_delta_is_the_reference_bit_for_bit(
    base_dtype: torch.dtype, out_dtype: torch.dtype, scale: float
) -> None:
    g = torch.Generator().manual_seed(3)
    base = torch.randn(LONG, generator=g).to(base_dtype)
    delta = 0.01 * torch.randn(LONG, generator=g)
    delta[::97] = 0.0
    got = cpu_fused.apply_delta(base, delta, scale=scale, out_dtype=out_dtype)
    want = reference.apply_delta(base, delta, scale=scale, out_dtype=out_dtype)
    assert got.dtype == out_dtype and torch.equal(_bits(got), _bits(want))
    zero_reference = cpu_fused.apply_delta(None, delta, scale=scale, out_dtype=out_dtype)
    assert torch.equal(
        _bits(zero_reference), _bits(reference.apply_delta(None, delta, scale=scale, out_dtype=out_dtype))
    )


def test_apply_delta_rounds_to_nearest_even_and_keeps_nan_and_overflow() -> None:
    base = torch.tensor([1.0, 1.0, 3.0e38, 0.0] * 1000, dtype=torch.float32)
    delta = torch.tensor([2.0**-8, 3 * 2.0**-8, 3.0e38, float("nan")] * 1000)  # ties to even, overflow, NaN
    got = cpu_fused.apply_delta(base, delta, scale=1.0, out_dtype=torch.bfloat16)
    want = reference.apply_delta(base, delta, scale=1.0, out_dtype=torch.bfloat16)
    assert torch.equal(_bits(got), _bits(want))
    assert torch.isinf(got[2]) and torch.isnan(got[3])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16, torch.int64])
def test_all_finite_finds_nan_and_inf_anywhere(dtype: torch.dtype) -> None:
    clean = torch.ones(LONG, dtype=dtype)
    assert cpu_fused.all_finite(clean)
    if not dtype.is_floating_point:
        return
    for where in (0, LONG // 2, LONG - 1):
        for bad in (float("nan"), float("inf"), float("-inf")):
            poisoned = clean.clone()
            poisoned[where] = bad
            assert not cpu_fused.all_finite(poisoned)
            assert not reference.all_finite(poisoned)
    assert cpu_fused.all_finite(torch.ones(0, dtype=dtype))
    assert cpu_fused.all_finite(torch.ones(64, 64, dtype=dtype).t())  # non-contiguous: the reference


def _task_vectors_with_ties(k: int, seed: int) -> torch.Tensor:
    """[K, 1, LONG]: differences of bf16 weights (few distinct magnitudes, exact zeros, many exact ties)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(k, 1, LONG, generator=g).bfloat16()
    fine = (base.float() + 0.003 * torch.randn(k, 1, LONG, generator=g)).bfloat16()
    return fine.float() - base.float()


def _band_selections(k: int) -> list[dict]:
    g = torch.Generator().manual_seed(k)
    keep = torch.randint(1, LONG // 2, (k,), generator=g)
    skip = torch.randint(0, LONG // 50, (k,), generator=g)
    x = _task_vectors_with_ties(k, seed=k + 100)
    with jit_off():
        threshold, quota = reference.rank_boundary(x.reshape(k, -1), torch.full((k,), LONG // 5))
        lower = reference.rank_boundary(x.reshape(k, -1), torch.full((k,), LONG // 100))
    return [
        {"keep": keep},
        {"keep": keep, "skip": skip},
        {"keep": torch.tensor(LONG // 5)},  # one count for every model
        {"boundary": (threshold, quota)},
        {"boundary": (threshold, quota), "lower_boundary": lower},
        {"boundary": (threshold, torch.zeros_like(quota))},  # strict: no tie kept
        # ComPEFT: the kept entries become ±α·σ per model (BAND_TERNARY), local top-k and global boundary
        {"keep": keep, "scale": torch.rand(k, generator=g) + 0.1, "ternary": True},
        {"boundary": (threshold, quota), "scale": torch.rand(k, generator=g) * 1e-3, "ternary": True},
        {"keep": keep, "skip": skip, "scale": torch.rand(k, generator=g) + 0.5},  # scaled, not ternary
    ]


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("weights", ["equal", "signed"])
def test_the_in_pass_band_selection_is_the_reference_bit_for_bit(k: int, weights: str) -> None:
    x = _task_vectors_with_ties(k, seed=k + 100)
    w = torch.ones(k) if weights == "equal" else torch.tensor([(-1.0) ** t * (t + 1) * 0.5 for t in range(k)])
    for selection in _band_selections(k):
        for consensus, mean in [(True, True), (True, False), (False, True), (False, False)]:
            args = {"consensus": consensus, "mean": mean, **selection}
            got = [t.clone() for t in cpu_fused.fused_sparse_merge(x, w, **args)]
            with jit_off():
                want = reference.fused_sparse_merge(x, w, **args)
            assert torch.equal(_bits(got[0]), _bits(want[0])), (list(selection), consensus, mean)
            assert (int(got[1]), int(got[2])) == (int(want[1]), int(want[2]))


def test_the_compiled_selection_is_the_same_with_one_thread() -> None:
    x = _task_vectors_with_ties(3, seed=7).reshape(3, -1)
    keep, skip = torch.tensor([40_000, 7, 90_000]), torch.tensor([1000, 0, 5])
    want = reference.topk_mask(x, keep=keep, skip=skip)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(reference.topk_mask(x, keep=keep, skip=skip), want)
    finally:
        torch.set_num_threads(before)
    with jit_off():
        assert torch.equal(reference.topk_mask(x, keep=keep, skip=skip), want)


def test_buffers_are_reused_only_inside_the_scope() -> None:
    outside = buffers.take("role", (4, 5), torch.float32)
    assert (
        buffers.take("role", (4, 5), torch.float32).data_ptr() != outside.data_ptr() or outside.numel() == 0
    )
    with buffers.reuse():
        first = buffers.take("role", (1000,), torch.float32)
        again = buffers.take("role", (10, 10), torch.float32)
        assert again.data_ptr() == first.data_ptr() and again.shape == (10, 10)
        other = buffers.take("other", (1000,), torch.float32)
        assert other.data_ptr() != first.data_ptr()
        grown = buffers.take("role", (5000,), torch.float32)
        assert grown.numel() == 5000
        assert buffers.take("role", (5000,), torch.bfloat16).dtype == torch.bfloat16
    assert buffers.take("role", (10,), torch.float32).data_ptr() != grown.data_ptr()


def test_a_lent_buffer_is_handed_out_again_only_when_its_borrower_is_done() -> None:
    """The pipeline writes tensor i's output in a thread while tensor i+1 computes: ``lend`` makes the next
    ``take`` of that buffer wait for the write (its error stays the writer's); other buffers are not held up."""
    gate = threading.Event()
    with ThreadPoolExecutor(max_workers=1) as pool, buffers.reuse():
        out = buffers.take("output", (100,), torch.bfloat16)
        scratch = buffers.take("task_vectors", (3, 100), torch.float32)
        busy = pool.submit(lambda: gate.wait(5) and 1 // 0)
        buffers.lend(out[10:], busy)  # a view of the buffer counts as the buffer
        buffers.lend(torch.empty(4), busy)  # not a reused buffer: nothing to wait for
        assert buffers.take("task_vectors", (3, 100), torch.float32).data_ptr() == scratch.data_ptr()
        threading.Timer(0.2, gate.set).start()
        started = time.perf_counter()
        again = buffers.take("output", (100,), torch.bfloat16)
        assert busy.done() and time.perf_counter() - started >= 0.15
        assert again.data_ptr() == out.data_ptr()
        assert isinstance(busy.exception(), ZeroDivisionError)  # not raised by take
        buffers.take("output", (100,), torch.bfloat16)  # no longer lent
    buffers.lend(torch.empty(3), busy)  # outside a scope: nothing to do


@pytest.mark.parametrize("rows", [1, 3])
def test_the_wide_radix_histograms_are_the_reference_exactly(rows: int) -> None:
    x = _task_vectors_with_ties(rows, seed=40 + rows).reshape(rows, -1)
    high_pass, low_pass = reference.RADIX_PASSES_WIDE
    zero = torch.zeros(rows, dtype=torch.int64)
    with jit_off():
        want_high = reference.magnitude_histogram(
            x, prefix=zero, prefix_shift=31, digit_shift=15, digit_bits=16
        )
    got_high = cpu_fused.magnitude_histogram(x, prefix=zero, prefix_shift=31, digit_shift=15, digit_bits=16)
    assert high_pass == (31, 15, 16) and torch.equal(got_high, want_high)
    assert int(got_high.sum()) == x.numel()
    busiest = got_high.argmax(dim=1)  # the low digits inside each row's fullest bin
    with jit_off():
        want_low = reference.magnitude_histogram(
            x, prefix=busiest, prefix_shift=15, digit_shift=0, digit_bits=15
        )
    got_low = cpu_fused.magnitude_histogram(x, prefix=busiest, prefix_shift=15, digit_shift=0, digit_bits=15)
    assert low_pass == (15, 0, 15) and torch.equal(got_low, want_low)
    assert got_low.sum(dim=1).tolist() == got_high.gather(1, busiest[:, None]).squeeze(1).tolist()


@pytest.mark.parametrize("split", reference.RADIX_PASSES_WIDE)
def test_radix_histograms_add_into_out_as_a_sum_of_fresh_ones(split: tuple[int, int, int]) -> None:
    """A pass over many tensors keeps one histogram (``out``): after two tensors it holds the sum of their own
    histograms, on the compiled loops and on the reference alike; a mis-shaped accumulator is refused."""
    prefix_shift, digit_shift, digit_bits = split
    first, second = (_task_vectors_with_ties(3, seed=60 + i).reshape(3, -1) for i in range(2))
    second = second[:, : second.shape[1] // 2 + 5].contiguous()  # another tensor, another length
    high = split == reference.RADIX_PASSES_WIDE[0]
    prefix = torch.zeros(3, dtype=torch.int64)
    if not high:  # the low digits inside each row's fullest bin of the first tensor
        top = cpu_fused.magnitude_histogram(
            first, prefix=prefix, prefix_shift=31, digit_shift=15, digit_bits=16
        )
        prefix = top.argmax(dim=1)
    digits = {
        "prefix": prefix,
        "prefix_shift": prefix_shift,
        "digit_shift": digit_shift,
        "digit_bits": digit_bits,
    }
    with jit_off():
        want = reference.magnitude_histogram(first, **digits) + reference.magnitude_histogram(
            second, **digits
        )
        on_reference = torch.zeros(3, 1 << digit_bits, dtype=torch.int64)
        for x in (first, second):
            assert reference.magnitude_histogram(x, **digits, out=on_reference) is on_reference
    compiled = torch.zeros(3, 1 << digit_bits, dtype=torch.int64)
    for x in (first, second):
        assert cpu_fused.magnitude_histogram(x, **digits, out=compiled) is compiled
    assert torch.equal(on_reference, want) and torch.equal(compiled, want) and int(want.sum()) > 0
    for bad in (
        torch.zeros(3, 1 << digit_bits, dtype=torch.int32),
        torch.zeros(2, 1 << digit_bits, dtype=torch.int64),
    ):
        with pytest.raises(ValueError, match="out must be"):
            cpu_fused.magnitude_histogram(first, **digits, out=bad)


def test_row_moments_match_float64_and_the_radix_plan_follows_the_loops() -> None:
    x = _task_vectors_with_ties(3, seed=9).reshape(3, -1)
    x[1] *= -7.5
    want = torch.stack([x.double().sum(1), x.double().square().sum(1), x.double().abs().sum(1)])
    torch.testing.assert_close(cpu_fused.row_moments(x), want, rtol=1e-12, atol=0)
    torch.testing.assert_close(reference.row_moments(x), want, rtol=1e-12, atol=0)
    assert kernels.radix_passes(x) == reference.RADIX_PASSES_WIDE
    with jit_off():
        assert kernels.radix_passes(x) == reference.RADIX_PASSES_SMALL


@pytest.mark.parametrize("k", [1, 3])
def test_sum_l1_is_the_reference_within_float32_rounding(k: int) -> None:
    x = _task_vectors_with_ties(k, seed=60 + k).reshape(k, -1)
    weights = torch.tensor([0.8, -0.3, 1.7][:k])
    got = cpu_fused.sum_l1(x, weights)
    with jit_off():
        want = reference.sum_l1(x, weights)
    exact = torch.tensor(
        [
            float(x.double().sum(0).abs().sum()),
            float((x.double() * weights.double()[:, None]).sum(0).abs().sum()),
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    torch.testing.assert_close(got, exact, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="weights"):
        cpu_fused.sum_l1(x, torch.ones(k + 1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_checked_task_vectors_count_what_all_finite_would_find(dtype: torch.dtype) -> None:
    """The task vectors bit for bit, the NaN/Inf count exactly: a NaN, an Inf, and finite values whose difference
    overflows float32; the Gram matrix as before."""
    g = torch.Generator().manual_seed(5)
    n = (1 << 18) + 77
    base = torch.randn(n, generator=g).to(dtype)
    fine = [(base.float() + 0.01 * torch.randn(n, generator=g)).to(dtype) for _ in range(3)]
    taus, bad = cpu_fused.checked_task_vectors(base, fine)
    want = reference.task_vectors(base, fine)
    assert torch.equal(taus.view(torch.int32), want.view(torch.int32)) and int(bad) == 0
    fine[1][9] = float("nan")
    fine[2][n - 1] = float("-inf")
    base[3], fine[0][3] = -3e38, 3e38
    gram = torch.zeros(3, 3, dtype=torch.float64)
    taus, bad = cpu_fused.checked_task_vectors(base, fine, gram=gram)
    want_taus, want_bad = reference.checked_task_vectors(base, fine)
    assert torch.equal(taus.view(torch.int32), want_taus.view(torch.int32))
    assert int(bad) == int(want_bad) == 3  # τ_1 and τ_2 at index 3 are ≈ 3e38: finite
    assert not cpu_fused.all_finite(taus)
    with jit_off():
        off_taus, off_bad = cpu_fused.checked_task_vectors(base, fine)
    assert int(off_bad) == int(bad) and torch.equal(off_taus.view(torch.int32), taus.view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("k", [1, 3, 4])
def test_task_vector_sum_l1_is_the_reference_from_the_stored_tensors(k: int, dtype: torch.dtype) -> None:
    """LiNeS' α pass from bf16/float32 storage: the norms of the task vectors within float rounding, the NaN/Inf
    count exactly (a NaN input, an Inf, and a difference of finite bf16 values that overflows float32)."""
    g = torch.Generator().manual_seed(70 + k)
    n = (1 << 18) + 4099  # two spans, an odd tail
    base = torch.randn(n, generator=g).to(dtype)
    fine = [(base.float() + 0.01 * torch.randn(n, generator=g)).to(dtype) for _ in range(k)]
    weights = torch.tensor([0.8, -0.3, 1.7, 0.5][:k])
    got = cpu_fused.task_vector_sum_l1(base, fine, weights)
    with jit_off():
        want = reference.task_vector_sum_l1(base, fine, weights)
        fallback = cpu_fused.task_vector_sum_l1(base, fine, weights)
    taus = torch.stack([t.double() - base.double() for t in fine])
    exact = [float(taus.sum(0).abs().sum()), float((taus * weights.double()[:, None]).sum(0).abs().sum())]
    torch.testing.assert_close(got[:2], want[:2], rtol=1e-6, atol=0)
    torch.testing.assert_close(got[:2], torch.tensor(exact, dtype=torch.float64), rtol=1e-6, atol=0)
    assert got[2] == want[2] == fallback[2] == 0
    fine[-1][5] = float("nan")
    fine[0][n - 1] = float("inf")
    base[7], fine[0][7] = -3e38, 3e38  # finite, and so is bf16's nearest value; their difference is not
    got, want = (
        cpu_fused.task_vector_sum_l1(base, fine, weights),
        reference.task_vector_sum_l1(base, fine, weights),
    )
    assert (
        float(got[2])
        == float(want[2])
        == float((~torch.isfinite(torch.stack([t.float() - base.float() for t in fine]))).sum())
    )
    assert float(got[2]) >= 2 + (k > 1)
    with pytest.raises(ValueError, match="weights"):
        cpu_fused.task_vector_sum_l1(base, fine, torch.ones(k + 1))


@pytest.mark.parametrize(("rows", "n"), [(1, 1), (3, 2), (5, 700), (40, 5000)])
def test_magnitude_ranks_are_the_stable_argsort_exactly(rows: int, n: int) -> None:
    g = torch.Generator().manual_seed(rows * n)
    x = (torch.randn(rows, n, generator=g) * 4).round() / 4  # few distinct magnitudes: ties everywhere
    x[:, ::7] = -x[:, ::7]
    x[:, ::11] = -0.0
    x[0, -1] = 3e38  # the top digit differs too
    got = cpu_fused.magnitude_ranks(x)
    with jit_off():
        want = reference.magnitude_ranks(x)
    assert got.dtype == want.dtype == torch.int64 and torch.equal(got, want)
    assert torch.equal(got.sort(dim=1).values, torch.arange(n).expand(rows, n))  # a permutation per row


def test_magnitude_ranks_keep_the_reference_for_other_shapes() -> None:
    x = torch.randn(2, 3, 4)
    assert torch.equal(cpu_fused.magnitude_ranks(x), reference.magnitude_ranks(x))
    with pytest.raises(ValueError, match="dim 1"):
        reference.magnitude_ranks(torch.randn(5))


@pytest.mark.parametrize("numel", [0, 1, 4099, (1 << 17) + 3])
def test_counter_bits_are_the_reference_stream(numel: int) -> None:
    for key in (0, 1, 0xDEADBEEF):
        got = cpu_fused.counter_bits24(numel, key=key)
        with jit_off():
            want = reference.counter_bits24(numel, key=key)
        assert got.dtype == want.dtype and torch.equal(got, want)
        assert numel == 0 or int(got.max()) < 1 << 24


@pytest.mark.parametrize("shape", [(1,), (5,), (3, 700), (40, 5000), (1 << 17,), (4, 3, 5)])
def test_magprune_mask_is_the_reference_bit_for_bit(shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(len(shape) * 1000 + shape[0])
    tau = (torch.randn(shape, generator=g) * 8).round() / 8  # ties in the ranks
    tau.view(-1)[::13] = 0.0
    for density, epsilon in [(0.5, 0.1), (0.2, 0.15), (0.9, 0.05), (0.33, 0.01)]:
        key = reference.dare_key(seed=3, source_index=1, name=f"w{shape}")
        got = cpu_fused.magprune_mask(tau, density=density, epsilon=epsilon, key=key)
        with jit_off():
            want = reference.magprune_mask(tau, density=density, epsilon=epsilon, key=key)
        assert got.shape == tau.shape and torch.equal(_bits(got), _bits(want)), (density, epsilon)
        if tau.numel() > 1000:  # the draw keeps about `density` of the entries
            kept = float((got != 0).sum()) / float((tau != 0).sum())
            assert abs(kept - density) < 0.02


def test_spans_cover_the_range_once_and_every_error_reaches_the_caller() -> None:
    """``_run_spans``: the calling thread takes the first span, the pool the rest; all of them end before an
    error (from either) is raised."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        numel = (1 << 18) + 12345
        seen = np.zeros(numel, dtype=np.int64)
        cpu_fused._run_spans(numel, lambda lo, hi: seen.__setitem__(slice(lo, hi), seen[lo:hi] + 1))
        assert (seen == 1).all()
        ended: list[int] = []

        def failing(lo: int, hi: int) -> None:
            if lo == 0:
                raise ValueError("first span")
            time.sleep(0.05)
            ended.append(lo)

        with pytest.raises(ValueError, match="first span"):
            cpu_fused._run_spans(numel, failing)
        assert len(ended) == 1  # the pool's span ended before the error was raised
        with pytest.raises(ZeroDivisionError):
            cpu_fused._run_spans(numel, lambda lo, hi: 1 // 0 if lo else None)
    finally:
        torch.set_num_threads(before)


def test_histogram_descend_is_the_cumulative_search_it_replaces() -> None:
    """The digit holding the wanted-th largest element, and the count above it, for fresh random histograms
    (sparse, dense, empty rows, wanted beyond the row's total), against a cumulative sum over the reversed digits
    and a left search (what ``cpu_select._digit`` computed before)."""
    jitted = compiled.jit()
    assert jitted is not None
    rng = np.random.default_rng(17)
    hist = rng.integers(0, 4, size=(5, 64)) * (rng.random((5, 64)) < 0.3)
    hist[2] = 0
    hist[3, 0] = 1000
    row_of = rng.integers(0, 5, size=40).astype(np.int64)
    totals = hist.sum(axis=1)
    wanted = np.maximum(1, (rng.random(40) * (totals[row_of] + 3)).astype(np.int64))
    digit, higher = np.empty(40, np.int64), np.empty(40, np.int64)
    jitted.histogram_descend(hist, row_of, wanted, digit, higher)
    for e, (r, w) in enumerate(zip(row_of.tolist(), wanted.tolist(), strict=True)):
        above = np.cumsum(hist[r, ::-1])
        index = min(int(np.searchsorted(above, w)), hist.shape[1] - 1)
        assert digit[e] == hist.shape[1] - 1 - index, e
        assert higher[e] == (above[index - 1] if index > 0 else 0), e
