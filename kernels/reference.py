"""Torch reference ops: the CPU path, the spec in code, and the oracle the Triton twins are tested against.

Every op is tensor-in / tensor-out with a fixed signature; ``kernels/triton_ops.py`` implements the same names
with the same signatures. Each docstring says what is exact. Nothing here casts the result to a storage dtype
except ``fused_task_arithmetic`` (whose contract is the cast), uses global RNG, or does I/O.

Selection ops work on ``|x|`` through its float32 bit pattern: for non-negative finite floats the int32 pattern
is monotonic in the value, so "k-th largest magnitude" is an integer search and results are bit-exact on any
device. Ties in magnitude are ranked by lowest flat index (row-major, within a row of a ``[R, n]`` view).
Inputs must be finite (the pipeline rejects NaN/Inf before any method runs).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch

Tensor = torch.Tensor

_MASK32 = 0xFFFFFFFF
# DARE: elements per chunk, so the int64 temporaries of a 100M-element tensor stay ~100 MB.
_CHUNK = 1 << 22


# --------------------------------------------------------------------------------------------------------------
# Fixed-signature ops (interfaces.md)
# --------------------------------------------------------------------------------------------------------------
def fused_task_arithmetic(
    base: Tensor,
    finetuned: Sequence[Tensor],
    weights: Sequence[float],
    *,
    scale: float = 1.0,
    out_dtype: torch.dtype,
) -> Tensor:
    """``(base.float() + scale·Σ_t w_t·(θ_t.float() − base.float())).to(out_dtype)``.

    Exact: float32 arithmetic in this order (deltas accumulated left to right), one cast at the end.
    """
    if len(finetuned) != len(weights):
        raise ValueError(f"{len(finetuned)} fine-tuned tensors for {len(weights)} weights")
    base32 = base.float()
    acc = torch.zeros_like(base32)
    delta = torch.empty_like(base32)  # one reused buffer: no allocation (and page faults) per model
    for theta, weight in zip(finetuned, weights, strict=True):
        if theta.shape != base.shape:
            raise ValueError(f"shape {tuple(theta.shape)} differs from the base's {tuple(base.shape)}")
        delta.copy_(theta).sub_(base32)  # convert, then subtract: much faster on CPU than a mixed-dtype sub
        acc.add_(delta, alpha=float(weight))
    return base32.add_(acc.mul_(scale)).to(out_dtype)


_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_bits(mask: Tensor) -> Tensor:
    """Flattened bool mask -> uint8[ceil(n/8)]; bit b of byte j is element 8j+b (LSB first, like
    ``numpy.packbits(bitorder="little")``); padding bits are 0. Exact."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = _BIT_WEIGHTS.to(flat.device)
    # each byte's bits are distinct powers of two, so the sum never carries past 255
    return (flat.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, n: int) -> Tensor:
    """uint8 packed by ``pack_bits`` -> BoolTensor[n]. Exact."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed bits must be uint8, got {packed.dtype}")
    if n > packed.numel() * 8 or n < 0:
        raise ValueError(f"{packed.numel()} bytes cannot hold {n} bits")
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.reshape(-1, 1) >> shifts) & 1
    return bits.reshape(-1)[:n].bool()


def _mul32(x: Tensor, constant: int) -> Tensor:
    """Low 32 bits of x·constant for int64 x in [0, 2^32): split the constant in 16-bit halves so no
    intermediate exceeds 2^48 (int64 overflow is undefined in spirit and differs between backends)."""
    low, high = constant & 0xFFFF, constant >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & _MASK32


def _mix32_tensor(x: Tensor) -> Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def mix32(x: int) -> int:
    """The 32-bit finaliser of ``dare_keep_mask`` on a Python int (the scalar oracle of the tensor version)."""
    x &= _MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def dare_key(*, seed: int, source_index: int, name: str) -> int:
    """Per-(job seed, source, tensor) 32-bit key: independent of processing order, worker and device."""
    name_hash = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=4).digest(), "little")
    inner = mix32((seed >> 32) ^ mix32((source_index & _MASK32) ^ mix32(name_hash)))
    return mix32((seed & _MASK32) ^ inner)


def dare_threshold(density: float) -> int:
    """keep iff (h >> 8) < floor(density·2^24); density 1 gives 2^24, which every 24-bit value is below."""
    return int(density * (1 << 24))


def dare_keep_mask(
    shape: Sequence[int] | torch.Size,
    *,
    density: float,
    seed: int,
    source_index: int,
    name: str,
    device: torch.device | str | None = None,
) -> Tensor:
    """Counter-based Bernoulli(density) keep mask of ``shape`` (interfaces.md): element i (flat) is kept iff
    ``(h_i >> 8) < floor(density·2^24)`` with ``h_i = mix32(mix32((i & 0xFFFFFFFF) ^ key) ^ (i >> 32))``.

    Exact and identical on every device; density 1 keeps everything; no RNG state is touched.
    """
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    numel = 1
    for dim in shape:
        numel *= int(dim)
    threshold = dare_threshold(density)
    if threshold >= 1 << 24:
        return torch.ones(tuple(shape), dtype=torch.bool, device=device)
    key = dare_key(seed=seed, source_index=source_index, name=name)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cpu":
        return torch.from_numpy(_dare_keep_numpy(numel, key=key, threshold=threshold)).view(tuple(shape))
    out = torch.empty(numel, dtype=torch.bool, device=device)
    for start in range(0, numel, _CHUNK):
        index = torch.arange(start, min(start + _CHUNK, numel), dtype=torch.int64, device=device)
        h = _mix32_tensor(_mix32_tensor((index & _MASK32) ^ key) ^ (index >> 32))
        out[start : start + index.numel()] = (h >> 8) < threshold
    return out.view(tuple(shape))


def _mix32_numpy(x: np.ndarray) -> np.ndarray:
    # uint32 arithmetic wraps modulo 2^32 by definition: the fast CPU twin of _mix32_tensor (~15x faster)
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846CA68B)
    x ^= x >> np.uint32(16)
    return x


def _dare_keep_numpy(numel: int, *, key: int, threshold: int) -> np.ndarray:
    out = np.empty(numel, dtype=np.bool_)
    for start in range(0, numel, _CHUNK):
        stop = min(start + _CHUNK, numel)
        low = np.arange(start, stop, dtype=np.uint64)
        high = (low >> np.uint64(32)).astype(np.uint32)
        x = low.astype(np.uint32)  # truncation keeps the low 32 bits
        x ^= np.uint32(key)
        x = _mix32_numpy(x)
        x ^= high
        x = _mix32_numpy(x)
        out[start:stop] = (x >> np.uint32(8)) < np.uint32(threshold)
    return out


# --------------------------------------------------------------------------------------------------------------
# Exact magnitude selection on a [R, n] view (rows are independent scope units)
# --------------------------------------------------------------------------------------------------------------
#: Bit pattern of +inf: the "threshold" of rank 0 (nothing is larger, so nothing is selected).
INF_BITS = 0x7F800000


def magnitude_bits(x: Tensor) -> Tensor:
    """int32 bit patterns of |x|: monotonic in |x| for finite floats (sign bit cleared, -0.0 -> 0). Exact."""
    return x.float().abs().view(torch.int32)


def rank_boundary(x: Tensor, rank: Tensor) -> tuple[Tensor, Tensor]:
    """Describe, per row of ``x[R, n]``, the set of the first ``rank[r]`` elements in the order
    (|x| desc, flat index asc) as ``(threshold[R] float32, tie_quota[R] int64)``: the set is every element with
    |x| > threshold plus the first ``tie_quota`` elements (by index) with |x| == threshold. rank 0 gives
    (+inf, 0), i.e. nothing; rank >= n selects everything. Exact (kthvalue on the magnitudes).
    """
    rows, n = x.shape
    rank = rank.to(device=x.device, dtype=torch.int64).clamp(0, n)
    magnitude = x.float().abs()
    threshold = torch.full((rows,), float("inf"), dtype=torch.float32, device=x.device)
    quota = torch.zeros(rows, dtype=torch.int64, device=x.device)
    # kthvalue takes one k per call: group rows by rank (usually one group; per-model densities give K)
    distinct = torch.unique(rank).tolist()
    for r in distinct:
        if r == 0:
            continue
        if len(distinct) == 1:  # the common case: no row copy
            sel, block = None, magnitude
        else:
            sel = (rank == r).nonzero().squeeze(1)
            block = magnitude.index_select(0, sel)
        value = torch.kthvalue(block, n - r + 1, dim=1).values  # the r-th largest magnitude
        greater = (block > value.unsqueeze(1)).sum(dim=1)
        if sel is None:
            threshold, quota = value, r - greater
        else:
            threshold[sel] = value
            quota[sel] = r - greater
    return threshold, quota


def select_by_threshold(x: Tensor, threshold: Tensor, tie_quota: Tensor) -> Tensor:
    """BoolTensor[R, n]: |x| > threshold[r], plus the first ``tie_quota[r]`` elements of the row (lowest flat
    index first) with |x| == threshold[r]. Exact."""
    magnitude = x.float().abs()
    thr = threshold.to(device=x.device, dtype=torch.float32).unsqueeze(1)
    quota = tie_quota.to(device=x.device, dtype=torch.int64).unsqueeze(1)
    selected = magnitude > thr
    ties = magnitude == thr
    tie_count = ties.sum(dim=1, keepdim=True)
    partial = (quota > 0) & (quota < tie_count)
    if bool(partial.any()):
        # only rows that take some but not all of their ties pay for the running count
        rows = partial.squeeze(1).nonzero().squeeze(1)
        running = ties.index_select(0, rows).cumsum(dim=1, dtype=torch.int64)
        part = ties.index_select(0, rows) & (running <= quota.index_select(0, rows))
        ties = ties & (quota >= tie_count)
        ties[rows] = part
    else:
        ties = ties & (quota >= tie_count) & (quota > 0)
    return selected | ties


def topk_mask(x: Tensor, *, keep: Tensor, skip: Tensor | None = None) -> Tensor:
    """BoolTensor[R, n] selecting, per row of ``x[R, n]``, the elements of rank in ``[skip, skip + keep)`` in the
    order (|x| desc, flat index asc): magnitude top-k when skip = 0, the Breadcrumbs band otherwise. Per-row
    counts allow per-model densities. Exact; never ``torch.quantile``."""
    rows = x.shape[0]
    keep = keep.to(device=x.device, dtype=torch.int64).expand(rows)
    skip = (torch.zeros_like(keep) if skip is None else skip.to(device=x.device, dtype=torch.int64)).expand(
        rows
    )
    upper = select_by_threshold(x, *rank_boundary(x, skip + keep))
    if bool((skip > 0).any()):
        upper &= ~select_by_threshold(x, *rank_boundary(x, skip))
    return upper


def magnitude_histogram(
    x: Tensor, *, prefix: Tensor, prefix_shift: int, digit_shift: int, digit_bits: int
) -> Tensor:
    """Radix histogram of |x| bit patterns for the global-scope selection (one pass of an MSB-first radix
    select). For each row r of ``x[R, n]``, counts the elements whose pattern b satisfies
    ``b >> prefix_shift == prefix[r]``, bucketed by ``(b >> digit_shift) & (2^digit_bits − 1)``.
    ``prefix_shift = 31`` with prefix 0 counts every element (bit 31 of |x| is 0). Returns int64
    [R, 2^digit_bits]. Exact."""
    rows = x.shape[0]
    buckets = 1 << digit_bits
    bits = magnitude_bits(x).reshape(rows, -1)
    digit = ((bits >> digit_shift) & (buckets - 1)).to(torch.int64)
    row_base = torch.arange(rows, device=x.device, dtype=torch.int64).unsqueeze(1) * buckets
    flat = digit + row_base
    in_prefix = (bits >> prefix_shift).to(torch.int64) == prefix.to(
        device=x.device, dtype=torch.int64
    ).unsqueeze(1)
    counts = torch.bincount(flat[in_prefix], minlength=rows * buckets)
    return counts.view(rows, buckets)


# --------------------------------------------------------------------------------------------------------------
# Consensus and aggregation over K task vectors
# --------------------------------------------------------------------------------------------------------------
def _broadcast_weights(weights: Tensor, like: Tensor) -> Tensor:
    return weights.to(device=like.device, dtype=torch.float32).reshape(-1, *([1] * (like.dim() - 1)))


def _weighted_sum(x: Tensor, w: list[float]) -> Tensor:
    """Σ_t w_t·x_t in float32, t = 0..K-1 in order; one [*S] accumulator instead of a weighted [K, *S] copy."""
    total = torch.zeros(x.shape[1:], dtype=torch.float32, device=x.device)
    for t, weight in enumerate(w):
        total.add_(x[t].float(), alpha=weight)
    return total


def elect_sign(x: Tensor, weights: Tensor) -> Tensor:
    """TIES sign election over ``x[K, *S]``: γ = sgn(Σ_t w_t·x_t) with a zero sum -> +1 (mergekit's rule).
    Returns float32 [*S] of ±1. Exact up to the float32 summation order (t = 0..K-1)."""
    total = _weighted_sum(x, weights.float().tolist())
    return torch.where(total >= 0, 1.0, -1.0).to(torch.float32)


def disjoint_merge(x: Tensor, weights: Tensor, *, mean: bool) -> tuple[Tensor, Tensor]:
    """TIES disjoint aggregation of ``x[K, *S]`` (already sparsified): elect γ (``elect_sign``), keep entry t
    iff sgn(w_t·x_t) == γ (so exact zeros never count), and return (Σ_kept w_t·x_t [÷ Σ_kept w_t when ``mean``;
    a zero divisor counts as 1], the number of contributors [*S] as int64). Agreement is on the weighted value,
    as in mergekit (a negative weight flips a model's vote). Sums run over t = 0..K-1 in order; temporaries
    are [*S]-sized (memory grows with one tensor, not K)."""
    w = weights.float().tolist()
    gamma = torch.where(_weighted_sum(x, w) >= 0, 1.0, -1.0)
    total = torch.zeros_like(gamma)
    contributors = torch.zeros(gamma.shape, dtype=torch.int64, device=x.device)
    divisor = torch.zeros_like(gamma) if mean else None
    for t, weight in enumerate(w):
        if weight == 0:
            continue  # w_t·x_t = 0 never agrees with γ = ±1
        # agreement on the weighted value: sgn(w_t·x_t) == γ  <=>  sgn(x_t) == γ·sgn(w_t)
        agree = torch.sign(x[t]) == (gamma if weight > 0 else -gamma)
        total.add_(torch.where(agree, x[t].float(), 0.0), alpha=weight)
        contributors.add_(agree)
        if divisor is not None:
            divisor.add_(agree, alpha=weight)
    if divisor is not None:
        total = total / torch.where(divisor == 0, 1.0, divisor)
    return total, contributors


def ternarize(x: Tensor, mask: Tensor, scale: Tensor) -> Tensor:
    """ComPEFT: ``scale[r]·sgn(x)`` where ``mask`` (on a ``[R, n]`` view), else 0. Values are exactly in
    {−scale, 0, +scale} (a kept exact zero stays 0). float32."""
    s = scale.to(device=x.device, dtype=torch.float32).unsqueeze(1)
    return torch.where(mask, torch.sign(x.float()) * s, 0.0)
