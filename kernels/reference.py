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
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from kernels import cpu_select

Tensor = torch.Tensor

_MASK32 = 0xFFFFFFFF
# DARE: elements per chunk, so the int64 temporaries of a 100M-element tensor stay ~100 MB.
_CHUNK = 1 << 22


# --------------------------------------------------------------------------------------------------------------
# Fixed-signature ops (the dispatcher's contract, kernels/dispatch.py)
# --------------------------------------------------------------------------------------------------------------
def fused_task_arithmetic(
    base: Tensor,
    finetuned: Sequence[Tensor],
    weights: Sequence[float],
    *,
    scale: float = 1.0,
    out_dtype: torch.dtype,
    gram: Tensor | None = None,
) -> Tensor:
    """``(base.float() + scale·Σ_t w_t·(θ_t.float() − base.float())).to(out_dtype)``.

    Exact: float32 arithmetic in this order (deltas accumulated left to right), one cast at the end.
    ``gram`` (float64 [K, K], optional) gains the task vectors' Gram matrix, ``task_vector_gram`` of the
    unweighted deltas θ_t − θ_0 (for the report's norms and cosines).
    """
    if len(finetuned) != len(weights):
        raise ValueError(f"{len(finetuned)} fine-tuned tensors for {len(weights)} weights")
    if gram is not None:
        for theta in finetuned:
            if theta.shape != base.shape:
                raise ValueError(f"shape {tuple(theta.shape)} differs from the base's {tuple(base.shape)}")
        gram += task_vector_gram(torch.stack([theta.float() - base.float() for theta in finetuned]))
    base32 = base.float()
    acc = torch.zeros_like(base32)
    delta = torch.empty_like(base32)  # one reused buffer: no allocation (and page faults) per model
    for theta, weight in zip(finetuned, weights, strict=True):
        if theta.shape != base.shape:
            raise ValueError(f"shape {tuple(theta.shape)} differs from the base's {tuple(base.shape)}")
        delta.copy_(theta).sub_(base32)  # convert, then subtract: much faster on CPU than a mixed-dtype sub
        acc.add_(delta, alpha=float(weight))
    # acc + base, not base.add_: for a float32 base, .float() is the base itself (an in-place add would overwrite
    # the caller's input, and a NaN in a fine-tune would then be found in the base). Addition commutes exactly.
    return acc.mul_(scale).add_(base32).to(out_dtype)


def all_finite(tensor: Tensor) -> bool:
    """True when no element is NaN/Inf: one ``aminmax`` read (NaN propagates into it, ±Inf is an extreme), exact
    with no overflow false alarm, and on CPU 10x faster for bf16/fp16 than a float32 sum (which converts)."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def apply_delta(base: Tensor | None, delta: Tensor, *, scale: float, out_dtype: torch.dtype) -> Tensor:
    """``(θ_0.float() + scale·delta).to(out_dtype)``, the merged tensor from the method's float32 delta (torch's
    ``add(alpha=scale)``: one fused multiply-add); ``base`` None is a zero reference (soups without normalize)."""
    if base is None:
        out = torch.zeros_like(delta).add_(delta, alpha=scale) if scale != 0 else torch.zeros_like(delta)
    else:
        # out of place: for a float32 base, .float() is the base itself
        out = torch.add(base.float(), delta, alpha=scale) if scale != 0 else base.float()
    return out.to(out_dtype)


def task_vectors(base: Tensor, finetuned: Sequence[Tensor], *, gram: Tensor | None = None) -> Tensor:
    """[K, *S] float32: τ_t = θ_t.float() − θ_0.float() (exact: one rounding each). ``gram`` (float64 [K, K],
    optional) gains their Gram matrix (``task_vector_gram``)."""
    base32 = base.float()
    taus = torch.empty((len(finetuned), *base.shape), dtype=torch.float32, device=base.device)
    for tau, theta in zip(taus, finetuned, strict=True):
        if theta.shape != base.shape:
            raise ValueError(f"shape {tuple(theta.shape)} differs from the base's {tuple(base.shape)}")
        tau.copy_(theta).sub_(base32)  # convert, then subtract (fast on CPU)
    if gram is not None:
        gram += task_vector_gram(taus).to(gram.device)
    return taus


#: columns per float32 product of ``task_vector_gram``: K × 512 KiB, summed in float64 across chunks
GRAM_CHUNK = 1 << 17


def checked_task_vectors(
    base: Tensor, finetuned: Sequence[Tensor], *, gram: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``task_vectors`` and how many of their entries are NaN or ±Inf (int64, 0-dim): the merge checks every task
    vector before a method sees it."""
    taus = task_vectors(base, finetuned, gram=gram)
    return taus, (~torch.isfinite(taus)).sum()


def task_vector_gram(taus: Tensor) -> Tensor:
    """G = T·Tᵀ, float64 [K, K], of the task vectors ``taus`` [K, *S] flattened to T [K, N]: float32 products
    (the task vectors' own precision) over chunks of ``GRAM_CHUNK`` columns, summed in float64. ‖τ_i‖ = √G_ii
    and cos(τ_i, τ_j) = G_ij / (‖τ_i‖‖τ_j‖); Gram matrices of different tensors add, so a layer's cosine is the
    exact cosine of its concatenated task vectors. Rounding: float32 per chunk, so relative error ~1e-6."""
    flat = taus.reshape(taus.shape[0], -1)
    gram = torch.zeros((flat.shape[0], flat.shape[0]), dtype=torch.float64, device=flat.device)
    for start in range(0, flat.shape[1], GRAM_CHUNK):
        part = flat[:, start : start + GRAM_CHUNK].float()
        gram += (part @ part.T).double()
    return gram


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
    """Counter-based Bernoulli(density) keep mask of ``shape`` (docs/spec.md, DARE: seeded by job seed, source and tensor): element i (flat) is kept iff
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
    return _dare_mask(numel, key=key, threshold=threshold, device=device).view(tuple(shape))


def counter_bits24(numel: int, *, key: int, device: torch.device | str | None = None) -> Tensor:
    """The 24-bit values ``h_i >> 8`` behind ``dare_keep_mask`` (int32 [numel], same stream for the same key):
    ``bits < floor(p_i·2^24)`` is a Bernoulli(p_i) keep mask with a probability per element (DELLA), and equals
    DARE's mask where every p_i is the same density. No RNG state is touched."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cpu":
        return torch.from_numpy(_counter_bits_numpy(numel, key=key))
    return _counter_bits_torch(numel, key=key, device=device)


def magnitude_ranks(x: Tensor) -> Tensor:
    """int64, shaped like ``x`` (at least 2-D): each element's 0-based position when its slice along dim 1 is
    sorted by |x| ascending, ties by lower index (a stable argsort, inverted with one scatter). Exact."""
    if x.dim() < 2:
        raise ValueError(f"magnitude_ranks ranks along dim 1; got {x.dim()} dims")
    n = x.shape[1]
    order = torch.argsort(x.abs(), dim=1, stable=True)
    positions = torch.arange(n, device=x.device).reshape(1, n, *([1] * (x.dim() - 2))).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)


def magprune_mask(tau: Tensor, *, density: float, epsilon: float, key: int) -> Tensor:
    """DELLA's MagPrune draw on ``tau`` (float32): τ where the counter hash ``counter_bits24(·, key)`` of the flat
    index is below ⌊p_i·2^24⌋, else +0, with p_i = (density − ε) + 2ε·(r_i − 1)/(n − 1) from the rank r_i
    (1 = smallest) of |τ_i| along dim 1 (1-D tensors: the whole tensor; rows of one element: p = density)."""
    rows = tau.reshape(1, -1) if tau.dim() < 2 else tau
    n = rows.shape[1]
    if n < 2:
        probs = torch.full(rows.shape, density, dtype=torch.float32, device=tau.device)
    else:
        ranks = magnitude_ranks(rows).to(torch.float32) + 1
        rank_norm = ((ranks - 1) / (n - 1)).clamp(0, 1)
        probs = (density - epsilon) + rank_norm * 2 * epsilon
    bits = counter_bits24(probs.numel(), key=key, device=tau.device)
    # exact in float32: p·2^24 is a power-of-two scaling and both sides are integers below 2^24
    keep = bits.to(torch.float32) < torch.floor(probs.reshape(-1) * (1 << 24))
    return torch.where(keep.reshape(tau.shape), tau, 0.0)


def _counter_bits_torch(numel: int, *, key: int, device: torch.device) -> Tensor:
    """The accelerator path of ``counter_bits24`` (torch int64 ops; equal to the numpy path bit for bit)."""
    out = torch.empty(numel, dtype=torch.int32, device=device)
    for start in range(0, numel, _CHUNK):
        index = torch.arange(start, min(start + _CHUNK, numel), dtype=torch.int64, device=device)
        h = _mix32_tensor(_mix32_tensor((index & _MASK32) ^ key) ^ (index >> 32))
        out[start : start + index.numel()] = (h >> 8).to(torch.int32)
    return out


def _counter_bits_numpy(numel: int, *, key: int) -> np.ndarray:
    out = np.empty(numel, dtype=np.uint32)
    tmp = np.empty(min(numel, HASH_BLOCK), dtype=np.uint32)
    for start in range(0, numel, HASH_BLOCK):
        stop = min(start + HASH_BLOCK, numel)
        counter_hash24_into(out[start:stop], tmp[: stop - start], start=start, key=key)
    return out.view(np.int32)  # 24-bit values: the same numbers as int32


#: elements hashed per step by ``counter_hash24_into``: its two uint32 buffers (256 KiB each) stay in L2, so the
#: ~25 in-place passes of the two finalisers run from cache instead of memory (8x faster than whole-array ops)
HASH_BLOCK = 1 << 16
_IOTA = np.arange(HASH_BLOCK, dtype=np.uint32)
_IOTA.flags.writeable = False
_C1, _C2 = np.uint32(0x7FEB352D), np.uint32(0x846CA68B)


def _mix32_inplace(x: np.ndarray, tmp: np.ndarray) -> None:
    """``_mix32_tensor`` in place on uint32 buffers of one size (uint32 arithmetic wraps mod 2^32 by definition, so
    no 16-bit split is needed)."""
    for shift, constant in ((16, _C1), (15, _C2)):
        np.right_shift(x, shift, out=tmp)
        np.bitwise_xor(x, tmp, out=x)
        np.multiply(x, constant, out=x)
    np.right_shift(x, 16, out=tmp)
    np.bitwise_xor(x, tmp, out=x)


def counter_hash24_into(out: np.ndarray, tmp: np.ndarray, *, start: int, key: int) -> None:
    """``out[j] = h_{start+j} >> 8`` (the 24-bit values of ``counter_bits24``) for the flat indices
    start .. start + out.size − 1; ``out`` and ``tmp`` are uint32 buffers of one size, at most ``HASH_BLOCK``.
    Bit for bit the stream of ``_counter_bits_torch``, computed in place in the two buffers."""
    n = out.size
    if n > HASH_BLOCK or tmp.size != n:
        raise ValueError(f"hash buffers of {n} and {tmp.size} elements (at most {HASH_BLOCK}, equal)")
    if start + n <= 1 << 32:  # the high word is 0: x ^ 0 is x, and the low word is start + j without wrap
        np.add(_IOTA[:n], np.uint32(start), out=out)
        np.bitwise_xor(out, np.uint32(key), out=out)
        _mix32_inplace(out, tmp)
    else:
        index = np.arange(start, start + n, dtype=np.uint64)
        np.copyto(out, index, casting="unsafe")  # truncation keeps the low 32 bits
        np.bitwise_xor(out, np.uint32(key), out=out)
        _mix32_inplace(out, tmp)
        np.copyto(tmp, index >> np.uint64(32), casting="unsafe")
        np.bitwise_xor(out, tmp, out=out)
    _mix32_inplace(out, tmp)
    np.right_shift(out, 8, out=out)


def _dare_keep_numpy(numel: int, *, key: int, threshold: int) -> np.ndarray:
    out = np.empty(numel, dtype=np.bool_)
    size = min(numel, HASH_BLOCK)
    bits, tmp = np.empty(size, dtype=np.uint32), np.empty(size, dtype=np.uint32)
    for start in range(0, numel, HASH_BLOCK):
        stop = min(start + HASH_BLOCK, numel)
        n = stop - start
        counter_hash24_into(bits[:n], tmp[:n], start=start, key=key)
        np.less(bits[:n], np.uint32(threshold), out=out[start:stop])
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
    if x.device.type == "cpu":  # the same values, several times faster (kernels.cpu_select)
        return cpu_select.rank_boundary(x, rank)
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
    if x.device.type == "cpu" and x.dim() == 2:
        return cpu_select.select_by_threshold(x, threshold, tie_quota)
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
    if x.device.type == "cpu" and x.dim() == 2:
        return cpu_select.topk_mask(x, keep, skip)
    upper = select_by_threshold(x, *rank_boundary(x, skip + keep))
    if bool((skip > 0).any()):
        upper &= ~select_by_threshold(x, *rank_boundary(x, skip))
    return upper


def magnitude_histogram(
    x: Tensor,
    *,
    prefix: Tensor,
    prefix_shift: int,
    digit_shift: int,
    digit_bits: int,
    out: Tensor | None = None,
) -> Tensor:
    """Radix histogram of |x| bit patterns for the global-scope selection (one pass of an MSB-first radix
    select). For each row r of ``x[R, n]``, counts the elements whose pattern b satisfies
    ``b >> prefix_shift == prefix[r]``, bucketed by ``(b >> digit_shift) & (2^digit_bits − 1)``.
    ``prefix_shift = 31`` with prefix 0 counts every element (bit 31 of |x| is 0). Returns int64
    [R, 2^digit_bits]; given ``out`` (that shape, int64, on x's device), adds the counts into it and returns it
    (a pass over many tensors then keeps one histogram). Exact."""
    rows = x.shape[0]
    buckets = 1 << digit_bits
    flat = x.reshape(rows, -1)
    prefixes = prefix.to(dtype=torch.int64).reshape(-1).expand(rows).tolist()
    counts = histogram_out(out, rows, digit_bits, x.device)
    step = max(1, (1 << 22) // max(1, rows))  # column chunks: the int32 patterns stay chunk-sized
    for start in range(0, flat.shape[1], step):
        bits = magnitude_bits(flat[:, start : start + step])
        for r in range(rows):  # filter on int32 first (every element matches on the first pass: no filter)
            if prefix_shift >= 31:  # bit 31 of |x| is 0
                row = bits[r] if prefixes[r] == 0 else bits[r][:0]
            else:
                row = bits[r][(bits[r] >> prefix_shift) == prefixes[r]]
            counts[r] += torch.bincount((row >> digit_shift) & (buckets - 1), minlength=buckets)
    return counts


def histogram_out(out: Tensor | None, rows: int, digit_bits: int, device: torch.device) -> Tensor:
    """``out`` checked as ``magnitude_histogram``'s accumulator, or a new zeroed histogram."""
    shape = (rows, 1 << digit_bits)
    if out is None:
        return torch.zeros(shape, dtype=torch.int64, device=device)
    if (
        tuple(out.shape) != shape
        or out.dtype != torch.int64
        or out.device != device
        or not out.is_contiguous()
    ):
        raise ValueError(
            f"out must be a contiguous int64 {list(shape)} tensor on {device}, got {out.dtype} {list(out.shape)} "
            f"on {out.device}"
        )
    return out


#: magnitude_histogram's digit splits for an exact radix select of the 31 magnitude bits: three passes of at
#: most 2^11 bins (what a GPU's on-chip histogram holds), or two of 2^16 and 2^15 (the compiled CPU loops)
RADIX_PASSES_SMALL = ((31, 20, 11), (20, 9, 11), (9, 0, 9))
RADIX_PASSES_WIDE = ((31, 15, 16), (15, 0, 15))


def row_moments(x: Tensor) -> Tensor:
    """float64 [3, R]: per row of ``x[R, n]``, Σx, Σx² and Σ|x| in float64 (column chunks keep temporaries small;
    within float64 rounding of any summation order)."""
    rows = x.reshape(x.shape[0], -1)
    out = torch.zeros(3, rows.shape[0], dtype=torch.float64, device=x.device)
    step = max(1, (1 << 22) // max(1, rows.shape[0]))
    for start in range(0, rows.shape[1], step):
        chunk = rows[:, start : start + step].to(torch.float64)
        out[0] += chunk.sum(dim=1)
        out[1] += chunk.square().sum(dim=1)
        out[2] += chunk.abs().sum(dim=1)
    return out


def sum_l1(x: Tensor, weights: Tensor) -> Tensor:
    """float64 [2]: ‖Σ_t x_t‖₁ and ‖Σ_t w_t·x_t‖₁ of ``x[K, *S]`` (each sum over t in float32, the norms in float64;
    LiNeS' automatic α). Column chunks keep temporaries small."""
    rows = x.reshape(x.shape[0], -1).float()
    w = weights.to(device=x.device, dtype=torch.float32).reshape(-1, 1)
    out = torch.zeros(2, dtype=torch.float64, device=x.device)
    step = max(1, (1 << 22) // max(1, rows.shape[0]))
    for start in range(0, rows.shape[1], step):
        chunk = rows[:, start : start + step]
        out[0] += chunk.sum(dim=0).abs().sum(dtype=torch.float64)
        out[1] += (chunk * w).sum(dim=0).abs().sum(dtype=torch.float64)
    return out


def task_vector_sum_l1(base: Tensor, finetuned: Sequence[Tensor], weights: Tensor) -> Tensor:
    """float64 [3]: ``sum_l1`` of ``task_vectors(base, finetuned)``, and how many of those task vectors' entries are
    NaN or ±Inf, from the stored tensors (LiNeS' α pass when the merge is a plain weighted sum)."""
    taus = task_vectors(base, finetuned)
    bad = (~torch.isfinite(taus)).sum().to(torch.float64).reshape(1)
    return torch.cat([sum_l1(taus, weights), bad])


def slerp_moments(v0: Tensor, tau: Tensor) -> Tensor:
    """float64 [3]: Σ v0², Σ v1², Σ v0·v1 over the whole tensors, v1 = τ + v0 in float32 (SLERP's two norms and
    its angle's dot product; column chunks keep the float64 temporaries small)."""
    a_all, t_all = v0.reshape(-1), tau.reshape(-1)
    out = torch.zeros(3, dtype=torch.float64, device=v0.device)
    step = 1 << 22
    for start in range(0, a_all.numel(), step):
        a = a_all[start : start + step].float()
        b = (t_all[start : start + step].float() + a).double()
        a = a.double()
        out += torch.stack([(a * a).sum(), (b * b).sum(), (a * b).sum()])
    return out


def slerp_delta(v0: Tensor, tau: Tensor, c0: float, c1: float) -> Tensor:
    """float32 (c0·v0 + c1·v1) − v0 elementwise, v1 = τ + v0: SLERP's (or its lerp fallback's) merged delta, each
    product, the sum and the difference rounded once, in that order."""
    a = v0.float()
    c0_, c1_ = (torch.tensor(c, dtype=torch.float32, device=v0.device) for c in (c0, c1))
    return (c0_ * a).add_(c1_ * (tau.float() + a)).sub_(a)


# --------------------------------------------------------------------------------------------------------------
# Consensus and aggregation over K task vectors
# --------------------------------------------------------------------------------------------------------------
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
    as in mergekit (a negative weight flips a model's vote). Sums run over t = 0..K-1 in order (with equal
    weights the divisor is contributors·w). Temporaries are [*S]-sized (memory grows with one tensor, not K)."""
    total, contributors = _disjoint(x, weights.float().tolist(), mean=mean)
    return total, contributors.to(torch.int64)


def _disjoint(x: Tensor, w: list[float], *, mean: bool) -> tuple[Tensor, Tensor]:
    """``disjoint_merge`` with the contributor count in a small integer type (uint8 for K < 256: adding bools to
    it is several times faster on the CPU than to int64)."""
    gamma = torch.where(_weighted_sum(x, w) >= 0, 1.0, -1.0)
    total = torch.zeros_like(gamma)
    small = torch.uint8 if len(w) < 256 else torch.int32
    contributors = torch.zeros(gamma.shape, dtype=small, device=x.device)
    equal_weights = len(set(w)) == 1
    divisor = torch.zeros_like(gamma) if mean and not equal_weights else None
    for t, weight in enumerate(w):
        if weight == 0:
            continue  # w_t·x_t = 0 never agrees with γ = ±1
        # agreement on the weighted value: sgn(w_t·x_t) == γ  <=>  sgn(x_t) == γ·sgn(w_t)
        agree = torch.sign(x[t]) == (gamma if weight > 0 else -gamma)
        total.add_(torch.where(agree, x[t].float(), 0.0), alpha=weight)
        contributors.add_(agree)
        if divisor is not None:
            divisor.add_(agree, alpha=weight)
    if mean:
        if divisor is None:
            divisor = contributors.to(torch.float32).mul_(w[0])
        total = total / torch.where(divisor == 0, 1.0, divisor)
    return total, contributors


def ternarize(x: Tensor, mask: Tensor, scale: Tensor) -> Tensor:
    """ComPEFT: ``scale[r]·sgn(x)`` where ``mask`` (on a ``[R, n]`` view), else 0. Values are exactly in
    {−scale, 0, +scale} (a kept exact zero stays 0). float32."""
    s = scale.to(device=x.device, dtype=torch.float32).unsqueeze(1)
    return torch.where(mask, torch.sign(x.float()) * s, 0.0)


# --------------------------------------------------------------------------------------------------------------
# Sparsify + consensus + aggregate in one op (the stages method's whole per-tensor step)
# --------------------------------------------------------------------------------------------------------------
#: rows selected together in ``sparse_task_vectors``: at least one row, about 4M elements, so the selection's
#: temporaries (magnitudes, masks) are the size of one chunk, not of the whole [K·R, m] stack
_SELECT_CHUNK = 1 << 22


def sparse_task_vectors(
    x: Tensor,
    *,
    keep: Tensor | None = None,
    skip: Tensor | None = None,
    boundary: tuple[Tensor, Tensor] | None = None,
    lower_boundary: tuple[Tensor, Tensor] | None = None,
    dare: tuple[Sequence[int], Sequence[float]] | None = None,
    scale: Tensor | None = None,
    ternary: bool = False,
) -> Tensor:
    """τ̂ float32 [K, R, m] of task vectors ``x[K, R, m]`` (R scope rows of m elements per model), one selection:

    - ``keep`` / ``skip`` ([K·R] or scalar): the elements of rank in [skip, skip + keep) per (model, row), as
      ``topk_mask``;
    - ``boundary`` / ``lower_boundary``: precomputed (threshold, tie_quota) per (model, row) ([K·R]), as
      ``select_by_threshold``: kept iff inside ``boundary`` and not inside ``lower_boundary`` (global scope);
    - ``dare``: (key per model from ``dare_key``, density per model): ``dare_keep_mask`` over the flat index
      r·m + col of each model's tensor;
    - none of them: everything is kept.

    Kept values are multiplied by ``scale`` ([K] or [K·R]: DARE rescale), or with ``ternary`` become ``scale·sgn(x)``
    (ComPEFT, as ``ternarize``). Exact apart from that one float32 multiply.
    """
    if x.dim() != 3:
        raise ValueError(f"task vectors must be x[K, R, m], got shape {tuple(x.shape)}")
    if sum(v is not None for v in (keep, boundary, dare)) > 1:
        raise ValueError("pass one of keep (top-k), boundary (precomputed) or dare")
    if ternary and scale is None:
        raise ValueError("ternary needs the scale")
    k, rows, m = x.shape
    flat = x.reshape(k * rows, m).float()
    row_scale = None if scale is None else scale_per_row(scale, k, rows).to(x.device).reshape(-1, 1)
    if dare is not None:
        keys, densities = dare
        out = torch.empty_like(flat)
        for t in range(k):
            model_rows = slice(t * rows, (t + 1) * rows)
            threshold = dare_threshold(float(densities[t]))
            if threshold >= 1 << 24:
                out[model_rows] = flat[model_rows]
            else:
                mask = _dare_mask(rows * m, key=int(keys[t]), threshold=threshold, device=x.device)
                out[model_rows] = torch.where(mask.view(rows, m), flat[model_rows], 0.0)
        if row_scale is not None:
            out.mul_(row_scale)
        return out.view(k, rows, m)
    if keep is None and boundary is None:
        out = flat if row_scale is None and not ternary else _keep_where(flat, None, row_scale, ternary)
        return out.view(k, rows, m)
    out = torch.empty_like(flat)
    for part, mask in selection_masks(
        flat, keep=keep, skip=skip, boundary=boundary, lower_boundary=lower_boundary
    ):
        out[part] = _keep_where(flat[part], mask, None if row_scale is None else row_scale[part], ternary)
    return out.view(k, rows, m)


def selection_masks(
    flat: Tensor,
    *,
    keep: Tensor | None = None,
    skip: Tensor | None = None,
    boundary: tuple[Tensor, Tensor] | None = None,
    lower_boundary: tuple[Tensor, Tensor] | None = None,
) -> Iterator[tuple[slice, Tensor]]:
    """The keep masks of ``sparse_task_vectors``' top-k / threshold selection on the float32 rows ``flat[K·R, m]``,
    as (row slice, BoolTensor of those rows), chunk by chunk (about ``_SELECT_CHUNK`` elements each)."""
    n_rows, m = flat.shape
    step = max(1, _SELECT_CHUNK // max(1, m))
    for start in range(0, n_rows, step):
        part = slice(start, start + step)
        block = flat[part]
        if keep is not None:
            mask = topk_mask(block, keep=_rows_of(keep, n_rows)[part], skip=_rows_or_none(skip, n_rows, part))
        else:
            assert boundary is not None
            mask = select_by_threshold(
                block, _rows_of(boundary[0], n_rows)[part], _rows_of(boundary[1], n_rows)[part]
            )
            if lower_boundary is not None:
                mask &= ~select_by_threshold(
                    block,
                    _rows_of(lower_boundary[0], n_rows)[part],
                    _rows_of(lower_boundary[1], n_rows)[part],
                )
        yield part, mask


def scale_per_row(scale: Tensor, k: int, rows: int) -> Tensor:
    """float32 [K·R] from a scale per model [K] or per (model, row) [K·R]."""
    flat = scale.to(torch.float32).reshape(-1)
    if flat.numel() == k and rows != 1:
        return flat.repeat_interleave(rows)
    if flat.numel() not in (1, k * rows):
        raise ValueError(f"scale has {flat.numel()} values for {k} models of {rows} rows")
    return flat.expand(k * rows)


def _rows_of(values: Tensor, n_rows: int) -> Tensor:
    return values.reshape(-1).expand(n_rows)


def _rows_or_none(values: Tensor | None, n_rows: int, part: slice) -> Tensor | None:
    return None if values is None else _rows_of(values, n_rows)[part]


def _keep_where(block: Tensor, mask: Tensor | None, row_scale: Tensor | None, ternary: bool) -> Tensor:
    if ternary:
        assert row_scale is not None
        kept = torch.sign(block) * row_scale
    else:
        kept = block if row_scale is None else block * row_scale
    return kept if mask is None else torch.where(mask, kept, 0.0)


def _dare_mask(numel: int, *, key: int, threshold: int, device: torch.device) -> Tensor:
    if device.type == "cpu":
        return torch.from_numpy(_dare_keep_numpy(numel, key=key, threshold=threshold))
    out = torch.empty(numel, dtype=torch.bool, device=device)
    for start in range(0, numel, _CHUNK):
        index = torch.arange(start, min(start + _CHUNK, numel), dtype=torch.int64, device=device)
        h = _mix32_tensor(_mix32_tensor((index & _MASK32) ^ key) ^ (index >> 32))
        out[start : start + index.numel()] = (h >> 8) < threshold
    return out


def fused_sparse_merge(
    x: Tensor,
    weights: Tensor,
    *,
    consensus: bool,
    mean: bool,
    keep: Tensor | None = None,
    skip: Tensor | None = None,
    boundary: tuple[Tensor, Tensor] | None = None,
    lower_boundary: tuple[Tensor, Tensor] | None = None,
    dare: tuple[Sequence[int], Sequence[float]] | None = None,
    scale: Tensor | None = None,
    ternary: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Sparsify (``sparse_task_vectors``, same selection arguments) then aggregate, for ``x[K, R, m]``.

    ``consensus``: TIES sign election + disjoint sum / mean (``disjoint_merge``); else Σ_t w_t·τ̂_t, with ``mean``
    ÷ Σ_t w_t (|Σ w| < 1e-8 -> ÷1). Returns (merged delta float32 [R, m], kept: number of non-zero τ̂ entries,
    conflicts: entries where some non-zero τ̂_t disagrees with the elected sign (0 without consensus)), the
    counts as int64 0-dim tensors. Sums run over t = 0..K-1 in order.
    """
    w = weights.to(device=x.device, dtype=torch.float32).reshape(-1)
    if w.numel() != x.shape[0]:
        raise ValueError(f"{w.numel()} weights for {x.shape[0]} task vectors")
    sparse = sparse_task_vectors(
        x,
        keep=keep,
        skip=skip,
        boundary=boundary,
        lower_boundary=lower_boundary,
        dare=dare,
        scale=scale,
        ternary=ternary,
    )
    if consensus:
        merged, contributors = _disjoint(sparse, w.tolist(), mean=mean)
        nonzero = _nonzero_per_entry(sparse)
        return merged, nonzero.sum(dtype=torch.int64), (nonzero > contributors).sum(dtype=torch.int64)
    merged = _weighted_sum(sparse, w.tolist())
    if mean:
        divisor = float(w.sum())
        merged = merged / (divisor if abs(divisor) >= 1e-8 else 1.0)
    kept = torch.count_nonzero(sparse).to(torch.int64)
    return merged, kept, torch.zeros((), dtype=torch.int64, device=sparse.device)


def _nonzero_per_entry(sparse: Tensor) -> Tensor:
    """How many of the K task vectors are non-zero at each entry (a small-int accumulator over K: several times
    faster on CPU than ``count_nonzero(dim=0)``)."""
    counts = torch.zeros(
        sparse.shape[1:], dtype=torch.uint8 if sparse.shape[0] < 256 else torch.int32, device=sparse.device
    )
    for t in range(sparse.shape[0]):
        counts.add_(sparse[t] != 0)
    return counts
