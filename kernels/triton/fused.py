"""Fused sparsify + consensus + aggregate: one read of the K task vectors, one write of the merged delta.

``fused_sparse_merge(x[K, R, m], weights[K], ...)``, the Triton twin of ``kernels.reference.fused_sparse_merge``:
per model t and scope row r it applies either a magnitude selection given as rank boundaries (``rank_boundary``'s
(threshold, tie_quota) for the top of the kept band and, for Breadcrumbs, for the removed top) or the DARE keep
mask (hashed in registers from the per-model key), scales the kept values (DARE rescale) or ternarizes them
(ComPEFT), then runs the TIES sign election and disjoint sum/mean (or a plain sum/mean), writes float32 [R, m],
and counts the non-zero τ̂ entries and the sign conflicts for the report (per program, summed on the host).
Passes over x: 4 radix-histogram reads per boundary set (``select._boundary``) + this one, instead of also
writing and re-reading the mask and the sparsified stack.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from kernels import reference
from kernels.triton import _common
from kernels.triton.elementwise import _mix32
from kernels.triton.select import _BLOCK, _Boundary, _boundary_chunked, _boundary_select

Tensor = torch.Tensor


@triton.jit
def _sparse_value(
    x_ptr,
    t,
    r,
    R,
    m,
    col,
    inside,
    blocks,
    b,
    hi_thr,
    hi_quota,
    hi_off,
    lo_thr,
    lo_quota,
    lo_off,
    dare_key,
    dare_thr,
    scale_ptr,
    MODE: tl.constexpr,
    HAS_LO: tl.constexpr,
    HI_PARTIAL: tl.constexpr,
    LO_PARTIAL: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    TERNARY: tl.constexpr,
):
    """τ̂[t, r, col], float32: x if selected (MODE 1: magnitude band, 2: DARE mask, 0: everything) else 0; kept
    values times scale[t·R + r] (HAS_SCALE), or ±scale by the sign of x (TERNARY)."""
    row = t * R + r
    offs = row * m + col
    x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    keep = inside
    if MODE == 1:
        bits = tl.abs(x).to(tl.int32, bitcast=True)
        pid = row * blocks + b
        keep = _boundary_select(bits, hi_thr, hi_quota, hi_off, row, pid, inside, HI_PARTIAL)
        if HAS_LO:
            drop = _boundary_select(bits, lo_thr, lo_quota, lo_off, row, pid, inside, LO_PARTIAL)
            keep = keep & (drop == 0)
    elif MODE == 2:
        element = r * m + col  # flat index inside the tensor, as dare_keep_mask counts it
        key = tl.load(dare_key + t).to(tl.uint32)
        h = _mix32(_mix32((element & 0xFFFFFFFF).to(tl.uint32) ^ key) ^ (element >> 32).to(tl.uint32))
        keep = (h >> 8) < tl.load(dare_thr + t).to(tl.uint32)
    if TERNARY:
        s = tl.load(scale_ptr + row)
        x = tl.where(x > 0, s, tl.where(x < 0, -s, 0.0))
    elif HAS_SCALE:
        x = x * tl.load(scale_ptr + row)
    return tl.where(keep, x, 0.0)


@triton.jit
def _fused_sparse_merge_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    counts_ptr,
    R,
    m,
    blocks,
    hi_thr,
    hi_quota,
    hi_off,
    lo_thr,
    lo_quota,
    lo_off,
    dare_key,
    dare_thr,
    scale_ptr,
    plain_divisor,
    K: tl.constexpr,
    MODE: tl.constexpr,
    HAS_LO: tl.constexpr,
    HI_PARTIAL: tl.constexpr,
    LO_PARTIAL: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    TERNARY: tl.constexpr,
    CONSENSUS: tl.constexpr,
    MEAN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    r = pid // blocks
    b = pid % blocks
    col = b * BLOCK + tl.arange(0, BLOCK)
    inside = col < m
    total = tl.zeros([BLOCK], dtype=tl.float32)
    kept = tl.zeros([BLOCK], dtype=tl.int32)
    for t in tl.static_range(K):
        value = _sparse_value(
            x_ptr,
            t,
            r,
            R,
            m,
            col,
            inside,
            blocks,
            b,
            hi_thr,
            hi_quota,
            hi_off,
            lo_thr,
            lo_quota,
            lo_off,
            dare_key,
            dare_thr,
            scale_ptr,
            MODE,
            HAS_LO,
            HI_PARTIAL,
            LO_PARTIAL,
            HAS_SCALE,
            TERNARY,
        )
        kept += (value != 0).to(tl.int32)
        total += value * tl.load(w_ptr + t)
    conflict = tl.zeros([BLOCK], dtype=tl.int1)
    if CONSENSUS:
        gamma_positive = total >= 0
        total = tl.zeros([BLOCK], dtype=tl.float32)
        divisor = tl.zeros([BLOCK], dtype=tl.float32)
        for t in tl.static_range(K):  # second sweep: the same K blocks, now from cache
            value = _sparse_value(
                x_ptr,
                t,
                r,
                R,
                m,
                col,
                inside,
                blocks,
                b,
                hi_thr,
                hi_quota,
                hi_off,
                lo_thr,
                lo_quota,
                lo_off,
                dare_key,
                dare_thr,
                scale_ptr,
                MODE,
                HAS_LO,
                HI_PARTIAL,
                LO_PARTIAL,
                HAS_SCALE,
                TERNARY,
            )
            weighted = value * tl.load(w_ptr + t)
            agree = tl.where(gamma_positive, weighted > 0, weighted < 0)
            conflict = conflict | ((value != 0) & (agree == 0))
            total += tl.where(agree, weighted, 0.0)
            divisor += tl.where(agree, tl.load(w_ptr + t), 0.0)
        if MEAN:
            total = total / tl.where(divisor == 0, 1.0, divisor)
    elif MEAN:
        total = total / plain_divisor
    tl.store(out_ptr + r * m + col, total, mask=inside)
    tl.store(counts_ptr + 2 * pid, tl.sum(kept, axis=0))
    tl.store(counts_ptr + 2 * pid + 1, tl.sum(conflict.to(tl.int32), axis=0))


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
    """(merged delta float32 [R, m], kept, conflicts) of task vectors ``x[K, R, m]``: the contract of
    ``kernels.reference.fused_sparse_merge`` (and ``sparse_task_vectors`` for the selection arguments).

    ``keep`` / ``skip`` run the radix passes here, which know the tie counts, so no tie-count pass is needed
    unless a row splits its ties; ``boundary`` / ``lower_boundary`` are precomputed cuts (global scope).
    """
    if x.dim() != 3:
        raise ValueError(f"fused_sparse_merge takes x[K, R, m], got shape {tuple(x.shape)}")
    if sum(v is not None for v in (keep, boundary, dare)) > 1:
        raise ValueError("pass one of keep (top-k), boundary (precomputed) or dare")
    if ternary and scale is None:
        raise ValueError("ternary needs the scale")
    _common.check_float(x, "x")
    k, rows, m = x.shape
    dev = x.device
    w = weights.to(device=dev, dtype=torch.float32).reshape(-1).contiguous()
    if w.numel() != k:
        raise ValueError(f"{w.numel()} weights for {k} task vectors")
    out = _common.new_output((rows, m), dtype=torch.float32, device=dev)
    zero = torch.zeros((), dtype=torch.int64, device=dev)
    if not (k and rows and m):
        return out.zero_(), zero, zero.clone()
    x = x.contiguous()
    flat = x.view(k * rows, m)
    hi = lo = None
    mode = 0
    if keep is not None:
        mode = 1
        keep_t = keep.to(device=dev, dtype=torch.int64).reshape(-1).expand(k * rows)
        skip_t = torch.zeros_like(keep_t) if skip is None else skip.to(device=dev, dtype=torch.int64)
        skip_t = skip_t.reshape(-1).expand(k * rows)
        hi = _Boundary(flat, *_boundary_chunked(flat, skip_t + keep_t))
        if skip is not None and bool((skip_t > 0).any()):
            lo = _Boundary(flat, *_boundary_chunked(flat, skip_t))
    elif boundary is not None:
        mode = 1
        hi = _Boundary(flat, boundary[0], boundary[1], None)
        if lower_boundary is not None:
            lo = _Boundary(flat, lower_boundary[0], lower_boundary[1], None)
    unused = torch.zeros(1, dtype=torch.int64, device=dev)
    keys = thresholds = unused
    if dare is not None:
        mode = 2
        key_list, densities = dare
        keys = torch.tensor([int(key) for key in key_list], dtype=torch.int64, device=dev)
        thresholds = torch.tensor(
            [reference.dare_threshold(float(d)) for d in densities], dtype=torch.int64, device=dev
        )
    scales = unused
    if scale is not None:
        scales = reference.scale_per_row(scale, k, rows).to(dev).contiguous()
    plain = float(w.sum())  # one host sync; the plain mean's divisor
    plain = plain if abs(plain) >= 1e-8 else 1.0
    low = lo if lo is not None else hi
    blocks = triton.cdiv(m, _BLOCK)
    counts = _common.new_output((rows * blocks, 2), dtype=torch.int32, device=dev)
    _fused_sparse_merge_kernel[(rows * blocks,)](
        flat,
        w,
        out,
        counts,
        rows,
        m,
        blocks,
        hi.threshold if hi else unused,
        hi.quota if hi else unused,
        hi.offsets if hi else unused,
        low.threshold if low else unused,
        low.quota if low else unused,
        low.offsets if low else unused,
        keys,
        thresholds,
        scales,
        plain,
        K=k,
        MODE=mode,
        HAS_LO=lo is not None,
        HI_PARTIAL=bool(hi and hi.partial),
        LO_PARTIAL=bool(lo and lo.partial),
        HAS_SCALE=scale is not None,
        TERNARY=ternary,
        CONSENSUS=consensus,
        MEAN=mean,
        BLOCK=_BLOCK,
    )
    totals = counts.sum(dim=0, dtype=torch.int64)
    return out, totals[0], totals[1]
