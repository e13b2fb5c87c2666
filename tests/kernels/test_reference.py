"""The torch reference ops against brute-force oracles written from interfaces.md and the spec."""

from __future__ import annotations

import hashlib
import pickle
import types

import numpy as np
import pytest
import torch

import kernels
import kernels.dispatch
from kernels import KernelUnavailable, cpu_select, reference

SIZES = [1, 7, 8, 9, 1023, 4097]


def _oracle_mix32(x: int) -> int:
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) % 2**32
    x ^= x >> 15
    x = (x * 0x846CA68B) % 2**32
    return x ^ (x >> 16)


def _oracle_keep(i: int, *, density: float, seed: int, source_index: int, name: str) -> bool:
    name_hash = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=4).digest(), "little")
    m = _oracle_mix32
    key = m((seed & 0xFFFFFFFF) ^ m((seed >> 32) ^ m(source_index ^ m(name_hash))))
    h = m(m((i & 0xFFFFFFFF) ^ key) ^ (i >> 32))
    return (h >> 8) < int(density * 2**24)


# -- fused task arithmetic --------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 5, 8])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_task_arithmetic_matches_float64_formula(k, out_dtype):
    g = torch.Generator().manual_seed(k)
    base = torch.randn(1023, generator=g).to(torch.bfloat16)
    fts = [(base.float() + 0.01 * torch.randn(1023, generator=g)).to(torch.bfloat16) for _ in range(k)]
    weights = torch.rand(k, generator=g).tolist()
    got = kernels.fused_task_arithmetic(base, fts, weights, scale=0.7, out_dtype=out_dtype)
    b64 = base.double()
    want = b64 + 0.7 * sum(w * (t.double() - b64) for w, t in zip(weights, fts, strict=True))
    assert got.dtype == out_dtype and got.shape == base.shape
    tol = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}[out_dtype]
    torch.testing.assert_close(got.double(), want.to(out_dtype).double(), atol=tol, rtol=tol)


def test_fused_task_arithmetic_one_model_scale_one_is_that_model():
    base = torch.randn(4, 5)
    ft = torch.randn(4, 5)
    got = kernels.fused_task_arithmetic(base, [ft], [1.0], out_dtype=torch.float32)
    torch.testing.assert_close(got, ft, atol=1e-6, rtol=0)


def test_fused_task_arithmetic_rejects_mismatched_weights():
    with pytest.raises(ValueError):
        kernels.fused_task_arithmetic(torch.zeros(3), [torch.zeros(3)], [1.0, 2.0], out_dtype=torch.float32)


# -- bit packing ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, *SIZES])
def test_pack_bits_matches_numpy_little_endian(n):
    mask = torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.4
    packed = kernels.pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 7) // 8
    assert np.array_equal(packed.numpy(), np.packbits(mask.numpy(), bitorder="little"))
    assert torch.equal(kernels.unpack_bits(packed, n), mask)


def test_pack_bits_flattens_any_shape():
    mask = torch.rand(3, 5, 7) < 0.5
    assert torch.equal(kernels.unpack_bits(kernels.pack_bits(mask), mask.numel()), mask.reshape(-1))


def test_unpack_bits_rejects_too_few_bytes():
    with pytest.raises(ValueError):
        kernels.unpack_bits(torch.zeros(1, dtype=torch.uint8), 9)


# -- DARE keep mask ---------------------------------------------------------------------------------------------
def test_mix32_tensor_matches_python_oracle():
    values = torch.randint(0, 2**32, (2000,), dtype=torch.int64, generator=torch.Generator().manual_seed(0))
    values[:3] = torch.tensor([0, 2**32 - 1, 0x7FEB352D])
    got = reference._mix32_tensor(values).tolist()
    assert got == [_oracle_mix32(v) for v in values.tolist()]
    assert [reference.mix32(v) for v in values.tolist()[:50]] == got[:50]


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_dare_keep_mask_matches_the_formula(density):
    args = dict(density=density, seed=(7 << 40) + 3, source_index=2, name="model.layers.0.mlp.weight")
    mask = kernels.dare_keep_mask((37, 29), **args).reshape(-1)
    assert mask.dtype == torch.bool
    assert mask.tolist() == [_oracle_keep(i, **args) for i in range(mask.numel())]


def test_dare_counter_above_2_32_uses_the_high_word():
    # the int64 tensor path handles flat indices beyond 2^32 without allocating them
    key = reference.dare_key(seed=1, source_index=0, name="w")
    index = torch.tensor([2**32 + 5, 2**33 + 7, 5], dtype=torch.int64)
    h = reference._mix32_tensor(reference._mix32_tensor((index & 0xFFFFFFFF) ^ key) ^ (index >> 32))
    for i, value in zip(index.tolist(), h.tolist(), strict=True):
        assert value == _oracle_mix32(_oracle_mix32((i & 0xFFFFFFFF) ^ key) ^ (i >> 32))


def test_dare_numpy_and_torch_paths_agree():
    key = reference.dare_key(seed=11, source_index=4, name="x")
    threshold = reference.dare_threshold(0.3)
    fast = torch.from_numpy(reference._dare_keep_numpy(5000, key=key, threshold=threshold))
    index = torch.arange(5000, dtype=torch.int64)
    slow = (reference._mix32_tensor(reference._mix32_tensor(index ^ key) ^ (index >> 32)) >> 8) < threshold
    assert torch.equal(fast, slow)


def test_dare_keep_mask_density_one_keeps_all_and_rate_is_binomial():
    assert bool(kernels.dare_keep_mask((100, 3), density=1.0, seed=0, source_index=0, name="a").all())
    n, p = 200_000, 0.1
    kept = int(kernels.dare_keep_mask((n,), density=p, seed=5, source_index=1, name="b").sum())
    assert abs(kept - n * p) < 5 * (n * p * (1 - p)) ** 0.5


def test_dare_keep_mask_is_keyed_by_seed_source_and_name():
    base = dict(density=0.5, seed=1, source_index=0, name="a")
    mask = kernels.dare_keep_mask((4096,), **base)
    assert torch.equal(mask, kernels.dare_keep_mask((4096,), **base))
    for change in ({"seed": 2}, {"source_index": 1}, {"name": "b"}):
        assert not torch.equal(mask, kernels.dare_keep_mask((4096,), **{**base, **change}))


# -- exact selection --------------------------------------------------------------------------------------------
def _oracle_band(x: torch.Tensor, keep: list[int], skip: list[int]) -> torch.Tensor:
    """Sort each row by (|x| desc, index asc) and take ranks [skip, skip + keep)."""
    out = torch.zeros_like(x, dtype=torch.bool)
    for r, row in enumerate(x.double()):
        order = sorted(range(row.numel()), key=lambda i: (-abs(row[i].item()), i))
        for i in order[skip[r] : skip[r] + keep[r]]:
            out[r, i] = True
    return out


@pytest.mark.parametrize("seed", range(6))
def test_topk_mask_exact_tie_rule(seed):
    g = torch.Generator().manual_seed(seed)
    rows, n = 4, 53
    # small integers force many ties, including ±equal magnitudes and zeros
    x = torch.randint(-4, 5, (rows, n), generator=g).float()
    keep = torch.randint(0, n + 1, (rows,), generator=g)
    skip = torch.randint(0, n + 1, (rows,), generator=g).minimum(n - keep)
    got = kernels.topk_mask(x, keep=keep, skip=skip)
    assert torch.equal(got, _oracle_band(x, keep.tolist(), skip.tolist()))
    assert got.sum(dim=1).tolist() == keep.tolist()


def test_topk_mask_continuous_values_and_single_count():
    x = torch.randn(3, 1000, generator=torch.Generator().manual_seed(1))
    got = kernels.topk_mask(x, keep=torch.tensor(200))
    assert got.sum(dim=1).tolist() == [200, 200, 200]
    assert torch.equal(got, _oracle_band(x, [200] * 3, [0] * 3))


def test_rank_boundary_and_select_by_threshold_roundtrip():
    x = torch.tensor([[1.0, -2.0, 2.0, 0.0, 2.0, -0.0]])
    threshold, quota = kernels.rank_boundary(x, torch.tensor([2]))
    assert threshold.item() == 2.0 and quota.item() == 2
    assert kernels.select_by_threshold(x, threshold, quota).tolist() == [
        [False, True, True, False, False, False]
    ]
    threshold, quota = kernels.rank_boundary(x, torch.tensor([0]))
    assert not kernels.select_by_threshold(x, threshold, quota).any()
    threshold, quota = kernels.rank_boundary(x, torch.tensor([6]))
    assert kernels.select_by_threshold(x, threshold, quota).all()


# -- exact selection on the CPU (numpy partition / sampled band) against a sort oracle ----------------------------
def _sort_oracle(x: torch.Tensor, rank: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: the first rank[r] elements in the order (|x| desc, index asc) by a stable argsort, as
    (threshold, tie_quota, mask); (+inf, 0, nothing) for rank 0."""
    mag = x.float().abs().numpy()
    rows, n = mag.shape
    threshold = np.full(rows, np.inf, dtype=np.float32)
    quota = np.zeros(rows, dtype=np.int64)
    mask = np.zeros((rows, n), dtype=bool)
    for r in range(rows):
        order = np.argsort(-mag[r], kind="stable")
        k = min(max(rank[r], 0), n)
        if k > 0:
            threshold[r] = mag[r, order[k - 1]]
            quota[r] = k - int(np.count_nonzero(mag[r] > threshold[r]))
            mask[r, order[:k]] = True
    return torch.from_numpy(threshold), torch.from_numpy(quota), torch.from_numpy(mask)


def _selection_input(kind: str, rows: int, n: int, g: torch.Generator) -> torch.Tensor:
    if kind == "small_ints":  # many exact ties, ±equal magnitudes, +0.0 and -0.0
        x = torch.randint(-3, 4, (rows, n), generator=g).float()
        return torch.where(torch.rand(rows, n, generator=g) < 0.5, x, -x)
    if kind == "bf16_diff":  # differences of bf16 weights: few distinct magnitudes, many exact zeros
        base = torch.randn(rows, n, generator=g).bfloat16()
        return (base.float() + 0.003 * torch.randn(rows, n, generator=g)).bfloat16().float() - base.float()
    if kind == "zeros":
        x = torch.randn(rows, n, generator=g)
        return torch.where(torch.rand(rows, n, generator=g) < 0.8, torch.zeros(()), x)
    return torch.randn(rows, n, generator=g)


_SELECTION_SHAPES = [(1, 1), (3, 1), (2, 2), (5, 37), (4, 4097), (2, (1 << 17) + 3), (1, (1 << 20) + 5)]


def _ranks(rows: int, n: int, g: torch.Generator) -> list[torch.Tensor]:
    per_row = torch.randint(0, n + 1, (rows,), generator=g)
    edges = torch.tensor([0, n, 1, n - 1, n + 5, -2][:rows] + [n // 5] * max(0, rows - 6))
    return [torch.full((rows,), max(1, n // 5)), per_row, edges]


@pytest.mark.parametrize("kind", ["small_ints", "bf16_diff", "zeros", "randn"])
@pytest.mark.parametrize(("rows", "n"), _SELECTION_SHAPES)
def test_cpu_selection_matches_sort_oracle(kind, rows, n):
    g = torch.Generator().manual_seed(rows * 1000 + n + len(kind))
    x = _selection_input(kind, rows, n, g)
    for rank in _ranks(rows, n, g):
        threshold, quota = reference.rank_boundary(x, rank)
        want_t, want_q, want_mask = _sort_oracle(x, rank.tolist())
        assert threshold.dtype == torch.float32 and quota.dtype == torch.int64
        assert torch.equal(threshold.view(torch.int32), want_t.view(torch.int32))  # bit-identical
        assert torch.equal(quota, want_q)
        assert torch.equal(reference.select_by_threshold(x, threshold, quota), want_mask)
        assert torch.equal(reference.topk_mask(x, keep=rank), want_mask)
        # a Breadcrumbs band: ranks [skip, skip + keep)
        skip = torch.randint(0, n + 1, (rows,), generator=g)
        keep = torch.minimum(rank.clamp(min=0), n - skip)
        upper = _sort_oracle(x, (skip + keep).tolist())[2]
        lower = _sort_oracle(x, skip.tolist())[2]
        assert torch.equal(reference.topk_mask(x, keep=keep, skip=skip), upper & ~lower)


@pytest.mark.parametrize("threads", [1, 3])
def test_cpu_selection_same_with_any_thread_count(threads):
    g = torch.Generator().manual_seed(7)
    x = _selection_input("bf16_diff", 2, (1 << 20) + 17, g)
    keep, skip = torch.tensor([200_000, 5]), torch.tensor([1000, 0])
    want = _sort_oracle(x, (skip + keep).tolist())[2] & ~_sort_oracle(x, skip.tolist())[2]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        assert torch.equal(reference.topk_mask(x, keep=keep, skip=skip), want)
    finally:
        torch.set_num_threads(before)


def test_cpu_selection_without_the_sampled_band(monkeypatch):
    """The full search on long rows (taken when the sample's band misses) and sampling on short rows."""
    g = torch.Generator().manual_seed(11)
    x = _selection_input("small_ints", 3, 300_001, g)
    rank = torch.tensor([1, 150_000, 300_001])
    want = _sort_oracle(x, rank.tolist())
    monkeypatch.setattr(cpu_select, "_kth_largest_sampled", lambda row, r: None)
    got = reference.rank_boundary(x, rank)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    monkeypatch.undo()
    monkeypatch.setattr(cpu_select, "_SAMPLE_MIN_N", 1 << 12)
    monkeypatch.setattr(cpu_select, "_SAMPLE", 1 << 10)
    y = _selection_input("bf16_diff", 3, 5000, g)
    rank = torch.tensor([1, 2500, 4999])
    assert torch.equal(reference.topk_mask(y, keep=rank), _sort_oracle(y, rank.tolist())[2])


@pytest.mark.parametrize("dominant", [0.0, 0.3, 0.9])
def test_kth_largest_with_a_dominant_value(dominant):
    rng = np.random.default_rng(int(dominant * 10))
    values = np.abs(rng.standard_normal(50_000)).astype(np.float32)
    values[rng.random(values.size) < dominant] = np.float32(0.5)
    ordered = np.sort(values)[::-1]
    for r in [1, 7, 15_000, 25_000, 40_000, 50_000]:
        value, greater = cpu_select._kth_largest_1d(values, r, owned=False)
        assert value == ordered[r - 1] and greater == int(np.count_nonzero(values > ordered[r - 1]))


def test_select_by_threshold_any_quota_matches_oracle():
    """Quotas from elsewhere (the global scope's cut): 0, fewer than the ties, more than the ties, negative."""
    g = torch.Generator().manual_seed(5)
    for n in [9, 4097, (1 << 17) + 1]:
        x = _selection_input("small_ints", 4, n, g)
        threshold = torch.tensor([2.0, 1.0, 0.0, 3.0])
        quota = torch.tensor([0, 3, n, -1])
        mag = x.abs()
        want = mag > threshold[:, None]
        for r in range(4):
            ties = (mag[r] == threshold[r]).nonzero().squeeze(1)[: max(int(quota[r]), 0)]
            want[r, ties] = True
        assert torch.equal(reference.select_by_threshold(x, threshold, quota), want)


def test_rank_boundary_empty_shapes():
    for rows, n in [(0, 5), (3, 0)]:
        x = torch.zeros(rows, n)
        threshold, quota = reference.rank_boundary(x, torch.full((rows,), 2))
        assert threshold.tolist() == [float("inf")] * rows and quota.tolist() == [0] * rows
        assert reference.topk_mask(x, keep=torch.tensor(2)).shape == (rows, n)


def test_magnitude_histogram_matches_bit_counting():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 777, generator=g) * 10.0 ** torch.randint(-6, 6, (2, 777), generator=g)
    bits = x.abs().view(torch.int32).long()
    prefix = (bits[:, 0] >> 20).clone()
    got = kernels.magnitude_histogram(x, prefix=prefix, prefix_shift=20, digit_shift=9, digit_bits=11)
    for r in range(2):
        want = torch.zeros(2048, dtype=torch.int64)
        for b in bits[r].tolist():
            if b >> 20 == prefix[r].item():
                want[(b >> 9) & 2047] += 1
        assert torch.equal(got[r], want)
    everything = kernels.magnitude_histogram(
        x, prefix=torch.zeros(2, dtype=torch.int64), prefix_shift=31, digit_shift=20, digit_bits=11
    )
    assert everything.sum(dim=1).tolist() == [777, 777]


# -- consensus --------------------------------------------------------------------------------------------------
def test_elect_sign_zero_sum_is_positive():
    x = torch.tensor([[1.0, -1.0, 0.0, -3.0], [-1.0, 1.0, 0.0, 1.0]])
    assert kernels.elect_sign(x, torch.tensor([1.0, 1.0])).tolist() == [1.0, 1.0, 1.0, -1.0]
    # weights vote: the heavier model wins
    assert kernels.elect_sign(x, torch.tensor([1.0, 3.0])).tolist() == [-1.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("mean", [True, False])
def test_disjoint_merge_matches_elementwise_reference(mean):
    g = torch.Generator().manual_seed(4)
    x = torch.randint(-3, 4, (5, 64), generator=g).float()
    w = torch.tensor([1.0, 0.5, 2.0, -1.0, 0.25])
    got, contributors = kernels.disjoint_merge(x, w, mean=mean)
    for j in range(64):
        weighted = [w[t].item() * x[t, j].item() for t in range(5)]
        gamma = 1.0 if sum(weighted) >= 0 else -1.0
        agree = [t for t in range(5) if weighted[t] != 0 and (weighted[t] > 0) == (gamma > 0)]
        total = sum(weighted[t] for t in agree)
        if mean:
            divisor = sum(w[t].item() for t in agree)
            total = total / (divisor if divisor != 0 else 1.0)
        assert got[j].item() == pytest.approx(total, rel=1e-6, abs=1e-6)
        assert contributors[j].item() == len(agree)


def test_ternarize_values():
    x = torch.tensor([[0.5, -2.0, 0.0, 3.0]])
    mask = torch.tensor([[True, True, True, False]])
    assert kernels.ternarize(x, mask, torch.tensor([0.25])).tolist() == [[0.25, -0.25, 0.0, 0.0]]


# -- dispatch ---------------------------------------------------------------------------------------------------
def test_dispatch_modes(monkeypatch):
    x = torch.zeros(3)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("ALLOY_KERNELS", "torch")
    assert kernels.kernel("pack_bits", x) is reference.pack_bits
    monkeypatch.setenv("ALLOY_KERNELS", "auto")
    assert kernels.kernel("pack_bits", x) is reference.pack_bits  # CPU tensors: the reference, silently
    monkeypatch.setenv("ALLOY_KERNELS", "triton")
    with pytest.raises(KernelUnavailable):
        kernels.kernel("pack_bits", x)
    monkeypatch.setenv("ALLOY_KERNELS", "cuda-please")
    with pytest.raises(KernelUnavailable):
        kernels.kernel("pack_bits", x)
    monkeypatch.delenv("ALLOY_KERNELS")
    with pytest.raises(KeyError):
        kernels.kernel("no_such_op", x)


def _fake_triton_ops(*, interpreted: bool):
    def pack_bits(mask):  # stands in for the Triton twin; never called here
        raise AssertionError

    pack_bits.__module__ = "kernels.triton.elementwise"
    return types.SimpleNamespace(INTERPRETED=interpreted, pack_bits=pack_bits)


def test_dispatch_cpu_tensors_run_on_triton_only_under_the_interpreter(monkeypatch):
    x = torch.zeros(3)
    interpreted = _fake_triton_ops(interpreted=True)
    monkeypatch.setattr(kernels.dispatch, "_load_triton_ops", lambda: interpreted)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("ALLOY_KERNELS", "triton")
    assert kernels.kernel("pack_bits", x) is interpreted.pack_bits
    monkeypatch.setenv("ALLOY_KERNELS", "auto")  # auto never picks the (slow) interpreter
    assert kernels.kernel("pack_bits", x) is reference.pack_bits
    monkeypatch.setenv("ALLOY_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET")  # the interpreter's kernels run only while the variable is set
    with pytest.raises(KernelUnavailable, match="TRITON_INTERPRET=1"):
        kernels.kernel("pack_bits", x)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    compiled = _fake_triton_ops(interpreted=False)  # triton imported before the variable was set
    monkeypatch.setattr(kernels.dispatch, "_load_triton_ops", lambda: compiled)
    with pytest.raises(KernelUnavailable, match="not on a CUDA device") as raised:
        kernels.kernel("pack_bits", x)
    assert raised.value.code == "kernel_unavailable" and raised.value.context == {"op": "pack_bits"}
    with pytest.raises(KernelUnavailable, match="has no such op"):
        kernels.kernel("topk_mask", x)
    monkeypatch.setattr(kernels.dispatch, "_load_triton_ops", lambda: None)
    with pytest.raises(KernelUnavailable, match="does not import"):
        kernels.kernel("pack_bits", x)


def test_kernel_unavailable_pickles():
    error = KernelUnavailable("no triton", op="pack_bits")
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is KernelUnavailable and again.detail == "no triton" and again.context == error.context
