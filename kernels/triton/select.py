"""Exact magnitude selection on a ``[R, n]`` view by MSB-first radix select over the float32 bit patterns of |x|.

For finite floats, the int32 pattern of |x| (sign bit clear) is monotonic in the value, so the rank-th largest
magnitude is found digit by digit: 4 histogram passes (8+8+8+7 bits, bit 31 is always 0), each one read of x,
with the bucket descent done on the device (no host sync). The last pass also yields the number of elements
equal to the threshold, so the common case (take all ties or none) selects in one more pass; only rows that
take some but not all of their ties pay for a tie-count pass and an exclusive scan over blocks, which keeps
the lowest-flat-index tie rule exact. Twins of ``kernels.reference`` (same names, signatures, results).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.reference import INF_BITS, histogram_out
from kernels.triton import _common

Tensor = torch.Tensor

#: (prefix_shift, digit_shift, digit_bits) of the radix passes used by rank_boundary
_PASSES = ((31, 23, 8), (23, 15, 8), (15, 7, 8), (7, 0, 7))
_BLOCK = 1024
_HIST_BLOCK = 1024
#: cap on histogram bytes per rank_boundary chunk of rows (per_row scope can have millions of rows)
_CHUNK_BYTES = 1 << 26


@triton.jit
def _magnitude_bits(x_ptr, offs, mask):
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return tl.abs(x).to(tl.int32, bitcast=True)


@triton.jit
def _histogram_kernel(
    x_ptr,
    prefix_ptr,
    partial_ptr,
    n,
    programs_per_row,
    prefix_shift,
    digit_shift,
    NUM_BINS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """partial[row, program, :] = histogram of the digits of the row's elements whose pattern has the prefix.
    Grid-stride over the row; per-program int32 counts (each < 2^31), summed in int64 by the launcher."""
    pid = tl.program_id(0).to(tl.int64)
    row = pid // programs_per_row
    program = pid % programs_per_row
    prefix = tl.load(prefix_ptr + row)
    hist = tl.zeros([NUM_BINS], dtype=tl.int32)
    bins = tl.arange(0, NUM_BINS)
    for start in range(program * BLOCK, n, programs_per_row * BLOCK):
        col = start + tl.arange(0, BLOCK)
        inside = col < n
        bits = _magnitude_bits(x_ptr, row * n + col, inside)
        hit = inside & ((bits >> prefix_shift).to(tl.int64) == prefix)
        digit = tl.where(hit, (bits >> digit_shift) & (NUM_BINS - 1), 0)
        # misses were counted in bin 0: take them out (no reliance on a masked histogram)
        misses = BLOCK - tl.sum(hit.to(tl.int32), axis=0)
        hist += tl.histogram(digit, NUM_BINS) - tl.where(bins == 0, misses, 0)
    tl.store(partial_ptr + pid * NUM_BINS + bins, hist)


def _histogram(rows: Tensor, prefix: Tensor, prefix_shift: int, digit_shift: int, digit_bits: int) -> Tensor:
    r, n = rows.shape
    bins = 1 << digit_bits
    programs = max(1, min(triton.cdiv(n, _HIST_BLOCK), _common.persistent_programs(rows.device) // max(r, 1)))
    partial = torch.empty(r * programs * bins, dtype=torch.int32, device=rows.device)
    _histogram_kernel[(r * programs,)](
        rows,
        prefix,
        partial,
        n,
        programs,
        prefix_shift,
        digit_shift,
        NUM_BINS=bins,
        BLOCK=_HIST_BLOCK,
    )
    return partial.view(r, programs, bins).sum(dim=1, dtype=torch.int64)


def _as_rows(x: Tensor) -> Tensor:
    if x.dim() != 2:
        raise ValueError(f"selection ops take a [R, n] view, got shape {tuple(x.shape)}")
    _common.check_float(x, "x")
    return x.contiguous()


def magnitude_histogram(
    x: Tensor,
    *,
    prefix: Tensor,
    prefix_shift: int,
    digit_shift: int,
    digit_bits: int,
    out: Tensor | None = None,
) -> Tensor:
    """int64 [R, 2^digit_bits]: per row, the elements whose |x| pattern b has ``b >> prefix_shift == prefix[r]``,
    bucketed by ``(b >> digit_shift) & (2^digit_bits − 1)``; added into ``out`` when given. Exact."""
    rows = x.reshape(x.shape[0], -1)
    _common.check_float(rows, "x")
    r, n = rows.shape
    if out is not None:
        counts = histogram_out(out, r, digit_bits, x.device)
    else:
        counts = _common.new_output((r, 1 << digit_bits), dtype=torch.int64, device=x.device).zero_()
    if r == 0 or n == 0:
        return counts
    prefix64 = prefix.to(device=x.device, dtype=torch.int64).reshape(-1).expand(r).contiguous()
    counts += _histogram(rows.contiguous(), prefix64, prefix_shift, digit_shift, digit_bits)
    return counts


def _descend(hist: Tensor, remaining: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per row: the bucket holding the ``remaining``-th largest element counting from the top bucket, the number
    of elements in higher buckets, and the bucket's own count. On the device, no sync."""
    from_top = hist.flip(1).cumsum(1)
    steps = (from_top < remaining.unsqueeze(1)).sum(dim=1).clamp(max=hist.shape[1] - 1)
    bucket = hist.shape[1] - 1 - steps
    in_bucket = hist.gather(1, bucket.unsqueeze(1)).squeeze(1)
    above = from_top.gather(1, steps.unsqueeze(1)).squeeze(1) - in_bucket
    return bucket, above, in_bucket


def _boundary(rows: Tensor, rank: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(threshold f32, tie_quota i64, ties i64) per row for ``rank`` (already clamped to [0, n])."""
    r, n = rows.shape
    active = rank > 0
    remaining = rank.clamp(min=1)
    prefix = torch.zeros(r, dtype=torch.int64, device=rows.device)
    ties = torch.zeros(r, dtype=torch.int64, device=rows.device)
    for prefix_shift, digit_shift, digit_bits in _PASSES:
        hist = _histogram(rows, prefix, prefix_shift, digit_shift, digit_bits)
        bucket, above, ties = _descend(hist, remaining)
        prefix = (prefix << digit_bits) | bucket
        remaining = remaining - above
    threshold_bits = torch.where(active, prefix, INF_BITS).to(torch.int32)
    quota = torch.where(active, remaining, 0)
    return threshold_bits.view(torch.float32), quota, torch.where(active, ties, 0)


def _boundary_chunked(rows: Tensor, rank: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r, n = rows.shape
    rank = rank.to(device=rows.device, dtype=torch.int64).reshape(-1).expand(r).clamp(0, n)
    if n == 0 or r == 0:
        inf = torch.full((r,), float("inf"), dtype=torch.float32, device=rows.device)
        zero = torch.zeros(r, dtype=torch.int64, device=rows.device)
        return inf, zero, zero.clone()
    programs = min(triton.cdiv(n, _HIST_BLOCK), _common.persistent_programs(rows.device))
    chunk = max(1, _CHUNK_BYTES // (programs * 256 * 4 + 256 * 8 * 4))
    parts = [_boundary(rows[i : i + chunk], rank[i : i + chunk]) for i in range(0, r, chunk)]
    if len(parts) == 1:
        return parts[0]
    return tuple(torch.cat(p) for p in zip(*parts, strict=True))  # type: ignore[return-value]


def rank_boundary(x: Tensor, rank: Tensor) -> tuple[Tensor, Tensor]:
    """Per row of ``x[R, n]``: (threshold float32, tie_quota int64) describing the first ``rank[r]`` elements in
    the order (|x| desc, flat index asc). rank 0 -> (+inf, 0); rank >= n selects everything. Exact."""
    threshold, quota, _ = _boundary_chunked(_as_rows(x), rank)
    return threshold, quota


# --------------------------------------------------------------------------------------------------------------
# selection by (threshold, tie quota): one pass, plus a tie-count pass only for rows that split their ties
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _tie_count_kernel(x_ptr, threshold_ptr, counts_ptr, n, blocks_per_row, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    row = pid // blocks_per_row
    col = (pid % blocks_per_row) * BLOCK + tl.arange(0, BLOCK)
    inside = col < n
    bits = _magnitude_bits(x_ptr, row * n + col, inside)
    threshold = tl.load(threshold_ptr + row).to(tl.int32, bitcast=True)
    tl.store(counts_ptr + pid, tl.sum((inside & (bits == threshold)).to(tl.int32), axis=0))


@triton.jit
def _boundary_select(bits, threshold_ptr, quota_ptr, offsets_ptr, row, pid, inside, PARTIAL: tl.constexpr):
    threshold = tl.load(threshold_ptr + row).to(tl.int32, bitcast=True)
    quota = tl.load(quota_ptr + row)
    tie = inside & (bits == threshold)
    if PARTIAL:
        # rank of each tie among the row's ties in index order: ties in earlier blocks + inclusive in-block count
        before = tl.load(offsets_ptr + pid)
        take = tie & ((before + tl.cumsum(tie.to(tl.int32), axis=0)).to(tl.int64) <= quota)
    else:
        take = tie & (quota > 0)  # every row here takes all of its ties or none
    return (inside & (bits > threshold)) | take


@triton.jit
def _select_kernel(
    x_ptr,
    out_ptr,
    hi_threshold,
    hi_quota,
    hi_offsets,
    lo_threshold,
    lo_quota,
    lo_offsets,
    n,
    blocks_per_row,
    HAS_LO: tl.constexpr,
    HI_PARTIAL: tl.constexpr,
    LO_PARTIAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """out = selected(hi boundary) and not selected(lo boundary): top-k when HAS_LO is false, else a band."""
    pid = tl.program_id(0).to(tl.int64)
    row = pid // blocks_per_row
    col = (pid % blocks_per_row) * BLOCK + tl.arange(0, BLOCK)
    inside = col < n
    bits = _magnitude_bits(x_ptr, row * n + col, inside)
    keep = _boundary_select(bits, hi_threshold, hi_quota, hi_offsets, row, pid, inside, HI_PARTIAL)
    if HAS_LO:
        drop = _boundary_select(bits, lo_threshold, lo_quota, lo_offsets, row, pid, inside, LO_PARTIAL)
        keep = keep & (drop == 0)
    tl.store(out_ptr + row * n + col, keep.to(tl.uint8), mask=inside)


class _Boundary:
    """A row boundary prepared for ``_select_kernel``: partial rows get exclusive tie offsets per block."""

    def __init__(self, rows: Tensor, threshold: Tensor, quota: Tensor, ties: Tensor | None) -> None:
        r, n = rows.shape
        self.threshold = (
            threshold.to(device=rows.device, dtype=torch.float32).reshape(-1).expand(r).contiguous()
        )
        self.quota = quota.to(device=rows.device, dtype=torch.int64).reshape(-1).expand(r).contiguous()
        blocks = triton.cdiv(n, _BLOCK)
        # one host sync decides the path; without known tie counts any positive quota may split its ties
        split = (self.quota > 0) if ties is None else (self.quota > 0) & (self.quota < ties)
        self.partial = bool(split.any())
        self.offsets = self.quota
        if self.partial:
            counts = torch.empty(r * blocks, dtype=torch.int32, device=rows.device)
            _tie_count_kernel[(r * blocks,)](rows, self.threshold, counts, n, blocks, BLOCK=_BLOCK)
            per_block = counts.view(r, blocks).to(torch.int64)
            self.offsets = (per_block.cumsum(dim=1) - per_block).reshape(-1).contiguous()


def _select(rows: Tensor, hi: _Boundary, lo: _Boundary | None) -> Tensor:
    r, n = rows.shape
    out = _common.new_output((r, n), dtype=torch.bool, device=rows.device)
    if r and n:
        blocks = triton.cdiv(n, _BLOCK)
        low = lo if lo is not None else hi
        _select_kernel[(r * blocks,)](
            rows,
            out.view(torch.uint8),
            hi.threshold,
            hi.quota,
            hi.offsets,
            low.threshold,
            low.quota,
            low.offsets,
            n,
            blocks,
            HAS_LO=lo is not None,
            HI_PARTIAL=hi.partial,
            LO_PARTIAL=low.partial,
            BLOCK=_BLOCK,
        )
    return out


def select_by_threshold(x: Tensor, threshold: Tensor, tie_quota: Tensor) -> Tensor:
    """BoolTensor[R, n]: |x| > threshold[r], plus the first ``tie_quota[r]`` elements of the row (lowest flat
    index first) with |x| == threshold[r]. Exact."""
    rows = _as_rows(x)
    return _select(rows, _Boundary(rows, threshold, tie_quota, None), None)


def topk_mask(x: Tensor, *, keep: Tensor, skip: Tensor | None = None) -> Tensor:
    """Per row of ``x[R, n]``, the elements of rank in ``[skip, skip + keep)`` in the order (|x| desc, flat index
    asc): magnitude top-k when skip is 0, the Breadcrumbs band otherwise. Exact."""
    rows = _as_rows(x)
    r, n = rows.shape
    keep = keep.to(device=rows.device, dtype=torch.int64).reshape(-1).expand(r)
    skip_t = torch.zeros_like(keep) if skip is None else skip.to(device=rows.device, dtype=torch.int64)
    skip_t = skip_t.reshape(-1).expand(r)
    hi = _Boundary(rows, *_boundary_chunked(rows, skip_t + keep))
    lo = None
    if skip is not None and bool((skip_t > 0).any()):
        lo = _Boundary(rows, *_boundary_chunked(rows, skip_t))
    return _select(rows, hi, lo)
