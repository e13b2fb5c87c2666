"""Fused sparsify + consensus + aggregate: one read of the K task vectors, one write of the merged delta.

``fused_sparse_merge(x[K, R, m], weights[K], ...)`` applies, per model t and scope row r, either a magnitude
selection given as rank boundaries (``rank_boundary``'s (threshold, tie_quota) for the top of the kept band and,
for Breadcrumbs, for the removed top), or the DARE keep mask (hashed in registers from the per-model key, with a
per-model rescale), then the TIES sign election and disjoint sum/mean (or a plain sum/mean), and writes float32
[R, m]. Equal to composing the reference ops ``select_by_threshold`` / ``dare_keep_mask`` -> ``where`` ->
``disjoint_merge`` (or the weighted sum), which is what its tests check. It has no reference twin yet, so the
dispatcher does not route to it: see the report to the lead (the pipeline would call it after the radix passes).
Passes over x: 4 radix-histogram reads per boundary set (``select._boundary``) + this one, instead of also
writing and re-reading the mask and the sparsified stack.
"""

from __future__ import annotations

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
    dare_scale,
    MODE: tl.constexpr,
    HAS_LO: tl.constexpr,
    HI_PARTIAL: tl.constexpr,
    LO_PARTIAL: tl.constexpr,
):
    """x[t, r, col] if selected (MODE 1: magnitude band, 2: DARE with rescale, 0: everything), else 0; float32."""
    row = t * R + r
    offs = row * m + col
    x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    if MODE == 1:
        bits = tl.abs(x).to(tl.int32, bitcast=True)
        pid = row * blocks + b
        keep = _boundary_select(bits, hi_thr, hi_quota, hi_off, row, pid, inside, HI_PARTIAL)
        if HAS_LO:
            drop = _boundary_select(bits, lo_thr, lo_quota, lo_off, row, pid, inside, LO_PARTIAL)
            keep = keep & (drop == 0)
        x = tl.where(keep, x, 0.0)
    elif MODE == 2:
        element = r * m + col  # flat index inside the tensor, as dare_keep_mask counts it
        key = tl.load(dare_key + t).to(tl.uint32)
        h = _mix32(_mix32((element & 0xFFFFFFFF).to(tl.uint32) ^ key) ^ (element >> 32).to(tl.uint32))
        keep = (h >> 8) < tl.load(dare_thr + t).to(tl.uint32)
        x = tl.where(keep, x, 0.0) * tl.load(dare_scale + t)
    return x


@triton.jit
def _fused_sparse_merge_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
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
    dare_scale,
    plain_divisor,
    K: tl.constexpr,
    MODE: tl.constexpr,
    HAS_LO: tl.constexpr,
    HI_PARTIAL: tl.constexpr,
    LO_PARTIAL: tl.constexpr,
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
            dare_scale,
            MODE,
            HAS_LO,
            HI_PARTIAL,
            LO_PARTIAL,
        )
        total += value * tl.load(w_ptr + t)
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
                dare_scale,
                MODE,
                HAS_LO,
                HI_PARTIAL,
                LO_PARTIAL,
            ) * tl.load(w_ptr + t)
            agree = tl.where(gamma_positive, value > 0, value < 0)
            total += tl.where(agree, value, 0.0)
            divisor += tl.where(agree, tl.load(w_ptr + t), 0.0)
        if MEAN:
            total = total / tl.where(divisor == 0, 1.0, divisor)
    elif MEAN:
        total = total / plain_divisor
    tl.store(out_ptr + r * m + col, total, mask=inside)


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
    dare: tuple[list[int], list[float], list[float]] | None = None,
) -> Tensor:
    """Merged delta float32 [R, m] of task vectors ``x[K, R, m]`` (R scope rows of m elements; R = 1 per tensor).

    ``keep`` / ``skip`` (``[K·R]`` or scalar): keep the elements of rank in [skip, skip + keep) per (model, row),
    as ``topk_mask`` (the radix passes run here, and know the tie counts, so no tie-count pass is needed unless a
    row splits its ties). ``boundary`` / ``lower_boundary`` instead (global scope): (threshold, tie_quota) per (model, row) as ``[K·R]``, from
    ``rank_boundary`` on the ``[K·R, m]`` view (top of the kept band / the removed top); an element is kept iff
    inside ``boundary`` and not inside ``lower_boundary``. ``dare``: (key per model from
    ``reference.dare_key``, density per model, rescale factor per model). Neither: no sparsification.
    ``consensus``: TIES sign election + disjoint sum / mean (÷ Σ agreeing w_t, 0 -> ÷1); else Σ_t w_t·τ̂_t, and
    with ``mean`` ÷ Σ_t w_t (|Σ w| < 1e-8 -> ÷1), like ``merge_ops.methods.stages``.
    """
    if x.dim() != 3:
        raise ValueError(f"fused_sparse_merge takes x[K, R, m], got shape {tuple(x.shape)}")
    if sum(v is not None for v in (keep, boundary, dare)) > 1:
        raise ValueError("pass one of keep (top-k), boundary (precomputed) or dare")
    _common.check_float(x, "x")
    k, rows, m = x.shape
    dev = x.device
    w = weights.to(device=dev, dtype=torch.float32).reshape(-1).contiguous()
    if w.numel() != k:
        raise ValueError(f"{w.numel()} weights for {k} task vectors")
    out = _common.new_output((rows, m), dtype=torch.float32, device=dev)
    if not (k and rows and m):
        return out.zero_()
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
    keys = thresholds = scales = unused
    if dare is not None:
        mode = 2
        key_list, densities, rescale = dare
        keys = torch.tensor(key_list, dtype=torch.int64, device=dev)
        thresholds = torch.tensor(
            [reference.dare_threshold(d) for d in densities], dtype=torch.int64, device=dev
        )
        scales = torch.tensor(rescale, dtype=torch.float32, device=dev)
    plain = float(w.sum())  # one host sync; the plain mean's divisor
    plain = plain if abs(plain) >= 1e-8 else 1.0
    low = lo if lo is not None else hi
    blocks = triton.cdiv(m, _BLOCK)
    _fused_sparse_merge_kernel[(rows * blocks,)](
        flat,
        w,
        out,
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
        CONSENSUS=consensus,
        MEAN=mean,
        BLOCK=_BLOCK,
    )
    return out
