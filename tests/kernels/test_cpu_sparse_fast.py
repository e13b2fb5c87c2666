"""The CPU fast paths against their torch oracles, on fresh random inputs: the in-place blocked DARE hash
(``reference.counter_hash24_into``) against the int64 torch stream; ``cpu_fused.fused_sparse_merge`` with DARE
hashed per block and with top-k / threshold masks applied in the pass, against ``reference.fused_sparse_merge``
bit for bit over block edges, the threaded split and odd weights; the task-arithmetic twin's unit-weight path."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from kernels import cpu_fused, reference


def _torch_bits(start: int, n: int, key: int) -> torch.Tensor:
    index = torch.arange(start, start + n, dtype=torch.int64)
    h = reference._mix32_tensor(reference._mix32_tensor((index & 0xFFFFFFFF) ^ key) ^ (index >> 32))
    return (h >> 8).to(torch.int32)


@pytest.mark.parametrize(
    ("start", "n"),
    [(0, 1), (0, reference.HASH_BLOCK), (12345, 4097), (2**32 - 3000, 5000), (2**32 + 7, 999), (2**33, 64)],
)
def test_blocked_hash_is_the_torch_stream(start: int, n: int) -> None:
    key = reference.dare_key(seed=int(np.random.default_rng().integers(2**62)), source_index=3, name="w")
    out, tmp = np.empty(n, dtype=np.uint32), np.empty(n, dtype=np.uint32)
    reference.counter_hash24_into(out, tmp, start=start, key=key)
    assert torch.equal(torch.from_numpy(out.view(np.int32)), _torch_bits(start, n, key))


def test_blocked_hash_refuses_oversized_buffers() -> None:
    big = np.empty(reference.HASH_BLOCK + 1, dtype=np.uint32)
    with pytest.raises(ValueError, match="hash buffers"):
        reference.counter_hash24_into(big, big, start=0, key=1)


def test_counter_bits_and_keep_mask_match_the_torch_path_over_blocks() -> None:
    n = 2 * reference.HASH_BLOCK + 17
    key = reference.dare_key(seed=99, source_index=1, name="layers.0.w")
    want = _torch_bits(0, n, key)
    assert torch.equal(reference.counter_bits24(n, key=key), want)
    threshold = reference.dare_threshold(0.3)
    mask = torch.from_numpy(reference._dare_keep_numpy(n, key=key, threshold=threshold))
    assert torch.equal(mask, want < threshold)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.int32)


def _task_vectors(k: int, rows: int, m: int) -> torch.Tensor:
    x = torch.randn(k, rows, m) * 0.02
    x[..., ::7] = 0.0  # exact zeros: never kept, never a conflict
    x[..., 1::5] = -x[..., 1::5]
    x[..., 2::9] = x[..., 2:3]  # exact ties
    return x


def _assert_same(x: torch.Tensor, w: torch.Tensor, **args: Any) -> None:
    want = reference.fused_sparse_merge(x, w, **args)
    got = cpu_fused.fused_sparse_merge(x, w, **args)
    assert got[0].shape == want[0].shape
    assert torch.equal(_bits(got[0]), _bits(want[0]))
    assert (int(got[1]), int(got[2])) == (int(want[1]), int(want[2]))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_fused_dare_is_bit_exact_over_blocks_and_threads(threads: int) -> None:
    k, rows, m = 3, 2, cpu_fused.SPARSE_BLOCK + 4099  # spans of every thread, several blocks, odd tails
    x = _task_vectors(k, rows, m)
    seed = int(torch.randint(0, 2**62, ()).item())
    keys = [reference.dare_key(seed=seed, source_index=t, name="model.w") for t in range(k)]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for densities in ([0.2, 0.5, 0.9], [1.0, 0.1, 1.0]):
            for scale in (torch.tensor([1 / d for d in densities]), torch.tensor([1.3, 0.7, 1.0])):
                for w in (torch.ones(k), torch.tensor([0.7, -1.2, 0.0])):
                    for consensus, mean in [(True, True), (True, False), (False, True), (False, False)]:
                        _assert_same(
                            x, w, consensus=consensus, mean=mean, dare=(keys, densities), scale=scale
                        )
    finally:
        torch.set_num_threads(previous)


def test_fused_dare_with_a_scale_per_row_takes_the_general_path_and_stays_exact() -> None:
    k, rows, m = 2, 3, 5000
    x = _task_vectors(k, rows, m)
    keys = [reference.dare_key(seed=5, source_index=t, name="w") for t in range(k)]
    scale = torch.rand(k * rows) + 0.5  # one ratio per (model, row): not the fused DARE pass
    for consensus in (True, False):
        _assert_same(
            x, torch.tensor([1.0, 0.5]), consensus=consensus, mean=True, dare=(keys, [0.4, 0.6]), scale=scale
        )


def test_fused_dare_without_a_scale_matches_the_reference() -> None:
    x = _task_vectors(2, 1, 70000)
    keys = [reference.dare_key(seed=8, source_index=t, name="w") for t in range(2)]
    _assert_same(x, torch.ones(2), consensus=True, mean=True, dare=(keys, [0.3, 0.3]))


def test_fused_dare_refuses_what_the_reference_refuses() -> None:
    x = torch.zeros(2, 1, 8)
    with pytest.raises(ValueError, match="one of"):
        cpu_fused.fused_sparse_merge(
            x, torch.ones(2), consensus=False, mean=False, keep=torch.tensor(1), dare=([1, 2], [0.5, 0.5])
        )
    with pytest.raises(ValueError, match="weights"):
        cpu_fused.fused_sparse_merge(x, torch.ones(3), consensus=True, mean=True, dare=([1, 2], [0.5, 0.5]))


@pytest.mark.parametrize("lower", [False, True])
def test_fused_threshold_selection_is_bit_exact(lower: bool) -> None:
    """Global scope hands over precomputed (threshold, tie quota) pairs: the mask is built by the reference's
    selection and applied inside the pass (ties at the threshold cut by index)."""
    k, rows, m = 3, 2, 40000
    x = _task_vectors(k, rows, m)
    flat = x.reshape(k * rows, m)
    upper = reference.rank_boundary(flat, torch.randint(1, m, (k * rows,)))
    args: dict[str, Any] = {"boundary": upper}
    if lower:
        args["lower_boundary"] = reference.rank_boundary(flat, torch.randint(0, 200, (k * rows,)))
    for w in (torch.ones(k), torch.tensor([0.5, -1.0, 2.0])):
        for consensus, mean in [(True, True), (False, True), (True, False)]:
            _assert_same(x, w, consensus=consensus, mean=mean, **args)


def test_fused_top_k_over_the_threaded_split_is_bit_exact() -> None:
    k, rows, m = 2, 1, 3 * cpu_fused.SPARSE_BLOCK + 11
    x = _task_vectors(k, rows, m)
    for skip in (None, torch.tensor([5, 100])):
        keep = torch.tensor([m // 5, m // 3])
        _assert_same(x, torch.tensor([1.0, 0.6]), consensus=True, mean=True, keep=keep, skip=skip)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_task_arithmetic_twin_with_unit_weights_and_scale_is_bit_exact(dtype: torch.dtype) -> None:
    """w = 1 and λ = 1 skip their multiplies in the twin (1·x is exact): still the reference's bits."""
    base = torch.randn(cpu_fused.BLOCK * 2 + 3) * 2
    fts = [(base + 0.03 * torch.randn(base.shape)).to(dtype) for _ in range(3)]
    for weights, scale in [([1.0, 1.0, 1.0], 1.0), ([1.0, 0.3, -1.0], 1.0), ([1.0, 1.0, 2.0], 0.7)]:
        want = reference.fused_task_arithmetic(base.to(dtype), fts, weights, scale=scale, out_dtype=dtype)
        got = cpu_fused.fused_task_arithmetic(base.to(dtype), fts, weights, scale=scale, out_dtype=dtype)
        assert torch.equal(got.view(-1).view(torch.uint8), want.view(-1).view(torch.uint8))
