"""One-pass elementwise kernels: fused K-way task arithmetic, bit pack/unpack, the DARE keep mask, ternarize.

Each launcher has the name, signature and semantics of its twin in ``kernels.reference`` (read that for the
spec). Indices are int64 inside the kernels, so tensors past 2^31 elements are addressed correctly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from kernels import reference
from kernels.triton import _common

Tensor = torch.Tensor

#: fine-tuned tensors read per launch of the task-arithmetic kernel; more run as chained partial passes
MAX_SOURCES = 8
_BLOCK = 1024


# --------------------------------------------------------------------------------------------------------------
# fused task arithmetic
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _add_delta(acc, theta_ptr, weight, base, offs, mask):
    theta = tl.load(theta_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return acc + weight * (theta - base)


@triton.jit
def _task_arithmetic_kernel(
    out_ptr,
    base_ptr,
    acc_ptr,
    t0,
    t1,
    t2,
    t3,
    t4,
    t5,
    t6,
    t7,
    w0,
    w1,
    w2,
    w3,
    w4,
    w5,
    w6,
    w7,
    scale,
    n,
    K: tl.constexpr,
    HAS_ACC: tl.constexpr,
    FINAL: tl.constexpr,
    OUT_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    base = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_ACC:  # noqa: SIM108  (a constexpr branch: only one side is compiled)
        acc = tl.load(acc_ptr + offs, mask=mask, other=0.0)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
    # left to right, like the reference's accumulation; unused slots are compiled out (K is constexpr)
    if K > 0:
        acc = _add_delta(acc, t0, w0, base, offs, mask)
    if K > 1:
        acc = _add_delta(acc, t1, w1, base, offs, mask)
    if K > 2:
        acc = _add_delta(acc, t2, w2, base, offs, mask)
    if K > 3:
        acc = _add_delta(acc, t3, w3, base, offs, mask)
    if K > 4:
        acc = _add_delta(acc, t4, w4, base, offs, mask)
    if K > 5:
        acc = _add_delta(acc, t5, w5, base, offs, mask)
    if K > 6:
        acc = _add_delta(acc, t6, w6, base, offs, mask)
    if K > 7:
        acc = _add_delta(acc, t7, w7, base, offs, mask)
    if FINAL:
        result = base + acc * scale
        if OUT_BF16:
            # round to nearest even by hand: the CPU interpreter truncates fp32 -> bf16, the GPU rounds; the
            # integer form is the same everywhere and matches torch's .to(bfloat16) (out_ptr is an int16 view)
            bits = result.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            tl.store(out_ptr + offs, bits.to(tl.int16), mask=mask)
        else:
            tl.store(out_ptr + offs, result.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(acc_ptr + offs, acc, mask=mask)


def fused_task_arithmetic(
    base: Tensor,
    finetuned: Sequence[Tensor],
    weights: Sequence[float],
    *,
    scale: float = 1.0,
    out_dtype: torch.dtype,
    gram: Tensor | None = None,
) -> Tensor:
    """``(base.float() + scale·Σ_t w_t·(θ_t.float() − base.float())).to(out_dtype)`` in one pass over K+1
    inputs (K ≤ 8; larger K chains ⌈K/8⌉ passes through a float32 accumulator). ``scale`` carries λ·LiNeS.
    ``gram`` (the report's Gram matrix) is the reference's, in torch on the device: a GPU reads the inputs once
    more far faster than the merge's host I/O delivers them."""
    if len(finetuned) != len(weights):
        raise ValueError(f"{len(finetuned)} fine-tuned tensors for {len(weights)} weights")
    _common.check_float(base, "base")
    for theta in finetuned:
        if theta.shape != base.shape:
            raise ValueError(f"shape {tuple(theta.shape)} differs from the base's {tuple(base.shape)}")
        if theta.device != base.device:
            raise ValueError(f"fine-tuned tensor on {theta.device}, base on {base.device}")
        _common.check_float(theta, "fine-tuned tensor")
    if out_dtype not in _common.FLOAT_DTYPES:
        raise ValueError(f"out_dtype must be a floating dtype, got {out_dtype}")
    if gram is not None:
        gram += reference.task_vector_gram(torch.stack([theta.float() - base.float() for theta in finetuned]))
    out = _common.new_output(base.shape, dtype=out_dtype, device=base.device)
    n = base.numel()
    if n == 0:
        return out
    base_c = base.contiguous()
    thetas = [t.contiguous() for t in finetuned]
    grid = (triton.cdiv(n, _BLOCK),)
    groups = [range(i, min(i + MAX_SOURCES, len(thetas))) for i in range(0, len(thetas), MAX_SOURCES)] or [
        range(0)
    ]
    acc = torch.empty(n, dtype=torch.float32, device=base.device) if len(groups) > 1 else base_c
    out_bf16 = out_dtype == torch.bfloat16
    target = out.view(torch.int16) if out_bf16 else out
    for g, group in enumerate(groups):
        ptrs = [thetas[i] for i in group] + [base_c] * (MAX_SOURCES - len(group))
        ws = [float(weights[i]) for i in group] + [0.0] * (MAX_SOURCES - len(group))
        _task_arithmetic_kernel[grid](
            target,
            base_c,
            acc,
            *ptrs,
            *ws,
            float(scale),
            n,
            K=len(group),
            HAS_ACC=g > 0,
            FINAL=g == len(groups) - 1,
            OUT_BF16=out_bf16,
            BLOCK=_BLOCK,
        )
    return out


# --------------------------------------------------------------------------------------------------------------
# bit packing
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _pack_bits_kernel(mask_ptr, out_ptr, n, n_bytes, BLOCK_BYTES: tl.constexpr):
    byte = tl.program_id(0).to(tl.int64) * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    bit = tl.arange(0, 8)
    element = byte[:, None] * 8 + bit[None, :]
    value = tl.load(mask_ptr + element, mask=element < n, other=0)
    # distinct powers of two per byte: the sum is the OR
    packed = tl.sum((value != 0).to(tl.int32) << bit[None, :], axis=1)
    tl.store(out_ptr + byte, packed.to(tl.uint8), mask=byte < n_bytes)


@triton.jit
def _unpack_bits_kernel(packed_ptr, out_ptr, n, BLOCK: tl.constexpr):
    element = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = element < n
    byte = tl.load(packed_ptr + (element >> 3), mask=mask, other=0).to(tl.int32)
    bit = (byte >> (element & 7).to(tl.int32)) & 1
    tl.store(out_ptr + element, bit.to(tl.uint8), mask=mask)


def pack_bits(mask: Tensor) -> Tensor:
    """Flattened bool mask -> uint8[ceil(n/8)], LSB first (``numpy.packbits(bitorder="little")``). Exact."""
    flat = mask.reshape(-1).contiguous()
    if flat.dtype == torch.bool:
        flat = flat.view(torch.uint8)  # same bytes; triton loads bytes, not i1
    n = flat.numel()
    n_bytes = (n + 7) // 8
    out = _common.new_output((n_bytes,), dtype=torch.uint8, device=mask.device)
    if n_bytes:
        block = 256
        _pack_bits_kernel[(triton.cdiv(n_bytes, block),)](flat, out, n, n_bytes, BLOCK_BYTES=block)
    return out


def unpack_bits(packed: Tensor, n: int) -> Tensor:
    """uint8 packed by ``pack_bits`` -> BoolTensor[n]. Exact."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed bits must be uint8, got {packed.dtype}")
    if n > packed.numel() * 8 or n < 0:
        raise ValueError(f"{packed.numel()} bytes cannot hold {n} bits")
    out = _common.new_output((n,), dtype=torch.bool, device=packed.device)
    if n:
        flat = packed.reshape(-1).contiguous()
        _unpack_bits_kernel[(triton.cdiv(n, _BLOCK),)](flat, out.view(torch.uint8), n, BLOCK=_BLOCK)
    return out


# --------------------------------------------------------------------------------------------------------------
# DARE keep mask (the counter-based hash of kernels.reference.dare_keep_mask; uint32 arithmetic wraps modulo 2^32 by definition)
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _mix32(x):
    x ^= x >> 16
    x = x * tl.full(x.shape, 0x7FEB352D, tl.uint32)
    x ^= x >> 15
    x = x * tl.full(x.shape, 0x846CA68B, tl.uint32)
    x ^= x >> 16
    return x


@triton.jit(do_not_specialize=["key", "threshold"])
def _dare_keep_kernel(out_ptr, key, threshold, n, BLOCK: tl.constexpr):
    element = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = element < n
    low = (element & 0xFFFFFFFF).to(tl.uint32)
    high = (element >> 32).to(tl.uint32)
    h = _mix32(_mix32(low ^ key.to(tl.uint32)) ^ high)
    keep = (h >> 8) < threshold.to(tl.uint32)
    tl.store(out_ptr + element, keep.to(tl.uint8), mask=mask)


def dare_keep_mask(
    shape: Sequence[int] | torch.Size,
    *,
    density: float,
    seed: int,
    source_index: int,
    name: str,
    device: torch.device | str | None = None,
) -> Tensor:
    """Counter-based Bernoulli(density) keep mask, bit-identical to the reference on every device."""
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    numel = 1
    for dim in shape:
        numel *= int(dim)
    out = _common.new_output((numel,), dtype=torch.bool, device=device)
    threshold = reference.dare_threshold(density)
    if numel:
        key = reference.dare_key(seed=seed, source_index=source_index, name=name)
        # density 1 gives threshold 2^24, which every 24-bit hash is below: all kept, no special case needed
        _dare_keep_kernel[(triton.cdiv(numel, _BLOCK),)](
            out.view(torch.uint8), key, threshold, numel, BLOCK=_BLOCK
        )
    return out.view(tuple(shape))


# --------------------------------------------------------------------------------------------------------------
# ComPEFT ternarize
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _ternarize_kernel(x_ptr, mask_ptr, scale_ptr, out_ptr, n, blocks_per_row, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    row = pid // blocks_per_row
    col = (pid % blocks_per_row) * BLOCK + tl.arange(0, BLOCK)
    inside = col < n
    offs = row * n + col
    x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    keep = tl.load(mask_ptr + offs, mask=inside, other=0) != 0
    scale = tl.load(scale_ptr + row)
    sign = tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))
    tl.store(out_ptr + offs, tl.where(keep, sign * scale, 0.0), mask=inside)


def ternarize(x: Tensor, mask: Tensor, scale: Tensor) -> Tensor:
    """ComPEFT on ``x[R, n]``: ``scale[r]·sgn(x)`` where ``mask``, else 0; float32, exactly in {−s, 0, +s}."""
    if x.dim() != 2 or mask.shape != x.shape:
        raise ValueError(
            f"ternarize takes x[R, n] and a mask of the same shape, got {tuple(x.shape)}, {tuple(mask.shape)}"
        )
    _common.check_float(x, "x")
    rows, n = x.shape
    scale32 = scale.to(device=x.device, dtype=torch.float32).reshape(-1).expand(rows).contiguous()
    out = _common.new_output((rows, n), dtype=torch.float32, device=x.device)
    if rows and n:
        keep = mask.to(torch.bool).contiguous().view(torch.uint8)
        blocks = triton.cdiv(n, _BLOCK)
        _ternarize_kernel[(rows * blocks,)](x.contiguous(), keep, scale32, out, n, blocks, BLOCK=_BLOCK)
    return out
