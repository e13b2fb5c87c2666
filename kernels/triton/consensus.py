"""TIES consensus over K (already sparsified) task vectors ``x[K, *S]``: sign election and the disjoint merge, one
read of the K inputs per element block and one write per output (the second sweep over the K rows of a block
hits cache). Sums run over t = 0..K-1 in order, like the reference, so the elected signs and contributor
counts match it exactly. Twins of ``kernels.reference.elect_sign`` / ``disjoint_merge``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton import _common

Tensor = torch.Tensor
_BLOCK = 1024


@triton.jit
def _weighted(x_ptr, w_ptr, t, n, col, inside):
    x = tl.load(x_ptr + t * n + col, mask=inside, other=0.0).to(tl.float32)
    return x * tl.load(w_ptr + t)


@triton.jit
def _consensus_kernel(
    x_ptr,
    w_ptr,
    merged_ptr,
    contributors_ptr,
    n,
    K: tl.constexpr,
    ELECT_ONLY: tl.constexpr,
    MEAN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    col = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = col < n
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for t in tl.static_range(K):
        total += _weighted(x_ptr, w_ptr, t, n, col, inside)
    gamma_positive = total >= 0  # a zero sum elects +1 (mergekit)
    if ELECT_ONLY:
        tl.store(merged_ptr + col, tl.where(gamma_positive, 1.0, -1.0), mask=inside)
    else:
        kept = tl.zeros([BLOCK], dtype=tl.float32)
        divisor = tl.zeros([BLOCK], dtype=tl.float32)
        count = tl.zeros([BLOCK], dtype=tl.int64)
        for t in tl.static_range(K):
            value = _weighted(x_ptr, w_ptr, t, n, col, inside)
            # sgn(w_t·x_t) == γ: exact zeros never agree
            agree = tl.where(gamma_positive, value > 0, value < 0)
            kept += tl.where(agree, value, 0.0)
            divisor += tl.where(agree, tl.load(w_ptr + t), 0.0)
            count += agree.to(tl.int64)
        if MEAN:
            kept = kept / tl.where(divisor == 0, 1.0, divisor)
        tl.store(merged_ptr + col, kept, mask=inside)
        tl.store(contributors_ptr + col, count, mask=inside)


def _launch(x: Tensor, weights: Tensor, *, elect_only: bool, mean: bool) -> tuple[Tensor, Tensor | None]:
    if x.dim() < 1:
        raise ValueError("consensus ops take x[K, *S]")
    _common.check_float(x, "x")
    k = x.shape[0]
    w = weights.to(device=x.device, dtype=torch.float32).reshape(-1)
    if w.numel() != k:
        raise ValueError(f"{w.numel()} weights for {k} task vectors")
    inner = x.shape[1:]
    n = x[0].numel() if k else int(torch.Size(inner).numel())
    merged = _common.new_output(inner, dtype=torch.float32, device=x.device)
    contributors = None if elect_only else _common.new_output(inner, dtype=torch.int64, device=x.device)
    if n:
        _consensus_kernel[(triton.cdiv(n, _BLOCK),)](
            x.contiguous(),
            w.contiguous(),
            merged,
            contributors if contributors is not None else merged,
            n,
            K=k,
            ELECT_ONLY=elect_only,
            MEAN=mean,
            BLOCK=_BLOCK,
        )
    return merged, contributors


def elect_sign(x: Tensor, weights: Tensor) -> Tensor:
    """γ = sgn(Σ_t w_t·x_t) over ``x[K, *S]``, a zero sum -> +1; float32 [*S] of ±1."""
    return _launch(x, weights, elect_only=True, mean=False)[0]


def disjoint_merge(x: Tensor, weights: Tensor, *, mean: bool) -> tuple[Tensor, Tensor]:
    """(Σ_{t: sgn(w_t·x_t) = γ} w_t·x_t [÷ Σ of those w_t when ``mean``; 0 -> ÷1], contributor count int64)."""
    merged, contributors = _launch(x, weights, elect_only=False, mean=mean)
    assert contributors is not None
    return merged, contributors
