"""Public kernel ops. Each call dispatches (``kernels.dispatch``) to the Triton twin or the torch reference,
which share names and signatures; see ``kernels/reference.py`` for the exact semantics of every op. A Triton op
that was asked for and can't run raises ``KernelUnavailable`` (``kernels.errors``)."""

from __future__ import annotations

import os
from collections.abc import Sequence

# Large CPU tensors on transparent huge pages (torch's own switch; numpy already does it for its arrays): a merge
# allocates several fresh float32 tensors per tensor merged, and on 4 KiB pages each first touch is a page fault
# (measured ~5 µs a page on the 2-core VM: a third of an 8-layer Breadcrumbs merge's system time). Read by torch
# at its first large allocation, so set before any; a value the user set is kept. Memory use is unchanged
# (only allocations of 2 MiB and more are rounded to 2 MiB pages).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
# torch's OpenMP threads wait without spinning, so they leave the cores to the compiled passes; read when torch
# loads libgomp: also set by ``merge_ops/__init__``, which the engine imports before torch (the reason is there)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402 (after the environment it reads)

from kernels.dispatch import kernel, kernel_mode
from kernels.errors import KernelUnavailable

Tensor = torch.Tensor


def fused_task_arithmetic(
    base: Tensor,
    finetuned: Sequence[Tensor],
    weights: Sequence[float],
    *,
    scale: float = 1.0,
    out_dtype: torch.dtype,
    gram: Tensor | None = None,
) -> Tensor:
    fn = kernel("fused_task_arithmetic", base, *finetuned)
    return fn(base, finetuned, weights, scale=scale, out_dtype=out_dtype, gram=gram)


def task_vector_gram(taus: Tensor) -> Tensor:
    """``reference.task_vector_gram``: float64 [K, K] Gram matrix of the task vectors [K, *S] (on CPU one
    compiled pass; on CUDA the reference's chunked matmul, already what a Triton twin would be)."""
    return kernel("task_vector_gram", taus)(taus)


def all_finite(tensor: Tensor) -> bool:
    """``reference.all_finite``: no NaN or ±Inf in ``tensor``."""
    return bool(kernel("all_finite", tensor)(tensor))


def apply_delta(base: Tensor | None, delta: Tensor, *, scale: float, out_dtype: torch.dtype) -> Tensor:
    """``reference.apply_delta``: (θ_0 + scale·delta) in float32, cast once to ``out_dtype``."""
    return kernel("apply_delta", delta, base)(base, delta, scale=scale, out_dtype=out_dtype)


def task_vectors(base: Tensor, finetuned: Sequence[Tensor], *, gram: Tensor | None = None) -> Tensor:
    """``reference.task_vectors``: [K, *S] float32 θ_t − θ_0; ``gram`` gains their Gram matrix."""
    return kernel("task_vectors", base, *finetuned)(base, finetuned, gram=gram)


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
    return kernel("fused_sparse_merge", x)(
        x,
        weights,
        consensus=consensus,
        mean=mean,
        keep=keep,
        skip=skip,
        boundary=boundary,
        lower_boundary=lower_boundary,
        dare=dare,
        scale=scale,
        ternary=ternary,
    )


def pack_bits(mask: Tensor) -> Tensor:
    return kernel("pack_bits", mask)(mask)


def unpack_bits(packed: Tensor, n: int) -> Tensor:
    return kernel("unpack_bits", packed)(packed, n)


def dare_keep_mask(
    shape: Sequence[int] | torch.Size,
    *,
    density: float,
    seed: int,
    source_index: int,
    name: str,
    device: torch.device | str | None = None,
) -> Tensor:
    probe = torch.empty(0, device=device)  # dispatch decides by device; the op itself takes no tensor
    fn = kernel("dare_keep_mask", probe)
    return fn(shape, density=density, seed=seed, source_index=source_index, name=name, device=device)


def rank_boundary(x: Tensor, rank: Tensor) -> tuple[Tensor, Tensor]:
    return kernel("rank_boundary", x)(x, rank)


def select_by_threshold(x: Tensor, threshold: Tensor, tie_quota: Tensor) -> Tensor:
    return kernel("select_by_threshold", x)(x, threshold, tie_quota)


def topk_mask(x: Tensor, *, keep: Tensor, skip: Tensor | None = None) -> Tensor:
    return kernel("topk_mask", x)(x, keep=keep, skip=skip)


def magnitude_histogram(
    x: Tensor,
    *,
    prefix: Tensor,
    prefix_shift: int,
    digit_shift: int,
    digit_bits: int,
    out: Tensor | None = None,
) -> Tensor:
    """``reference.magnitude_histogram``; with ``out`` the counts are added into it (and it is returned)."""
    fn = kernel("magnitude_histogram", x)
    return fn(
        x, prefix=prefix, prefix_shift=prefix_shift, digit_shift=digit_shift, digit_bits=digit_bits, out=out
    )


def radix_passes(x: Tensor) -> tuple[tuple[int, int, int], ...]:
    """The ``magnitude_histogram`` digit splits (prefix_shift, digit_shift, digit_bits) of an exact radix select
    that run fastest where ``x`` would go: two wide passes on the compiled CPU loops, else three of ≤ 2^11 bins."""
    from kernels import cpu_fused, reference
    from kernels.compiled import jit

    if kernel("magnitude_histogram", x) is cpu_fused.magnitude_histogram and jit() is not None:
        return reference.RADIX_PASSES_WIDE
    return reference.RADIX_PASSES_SMALL


def row_moments(x: Tensor) -> Tensor:
    """``reference.row_moments``: float64 [3, R] Σx, Σx², Σ|x| per row of ``x[R, n]``."""
    return kernel("row_moments", x)(x)


def sum_l1(x: Tensor, weights: Tensor) -> Tensor:
    """``reference.sum_l1``: float64 [2] ‖Σ_t x_t‖₁ and ‖Σ_t w_t·x_t‖₁ of ``x[K, *S]``."""
    return kernel("sum_l1", x)(x, weights)


def checked_task_vectors(
    base: Tensor, finetuned: Sequence[Tensor], *, gram: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``reference.checked_task_vectors``: ``task_vectors`` and their NaN/Inf count, from one pass on the CPU."""
    return kernel("checked_task_vectors", base, *finetuned)(base, finetuned, gram=gram)


def task_vector_sum_l1(base: Tensor, finetuned: Sequence[Tensor], weights: Tensor) -> Tensor:
    """``reference.task_vector_sum_l1``: float64 [3] ``sum_l1`` of the task vectors, and their NaN/Inf count."""
    return kernel("task_vector_sum_l1", base, *finetuned)(base, finetuned, weights)


def slerp_moments(v0: Tensor, tau: Tensor) -> Tensor:
    """``reference.slerp_moments``: float64 [3] Σv0², Σv1², Σv0·v1 with v1 = τ + v0."""
    return kernel("slerp_moments", v0, tau)(v0, tau)


def slerp_delta(v0: Tensor, tau: Tensor, c0: float, c1: float) -> Tensor:
    """``reference.slerp_delta``: (c0·v0 + c1·v1) − v0 with v1 = τ + v0, float32."""
    return kernel("slerp_delta", v0, tau)(v0, tau, c0, c1)


def magnitude_ranks(x: Tensor) -> Tensor:
    """``reference.magnitude_ranks``: each element's 0-based position in its dim-1 slice sorted by |x| (stable)."""
    return kernel("magnitude_ranks", x)(x)


def counter_bits24(numel: int, *, key: int, device: torch.device | str | None = None) -> Tensor:
    """``reference.counter_bits24``: the 24-bit counter hash stream behind DARE's and DELLA's keep masks."""
    probe = torch.empty(0, device=device)  # dispatch decides by device; the op itself takes no tensor
    return kernel("counter_bits24", probe)(numel, key=key, device=device)


def magprune_mask(tau: Tensor, *, density: float, epsilon: float, key: int) -> Tensor:
    """``reference.magprune_mask``: DELLA's rank-weighted keep draw applied to ``tau``."""
    return kernel("magprune_mask", tau)(tau, density=density, epsilon=epsilon, key=key)


def elect_sign(x: Tensor, weights: Tensor) -> Tensor:
    return kernel("elect_sign", x)(x, weights)


def disjoint_merge(x: Tensor, weights: Tensor, *, mean: bool) -> tuple[Tensor, Tensor]:
    return kernel("disjoint_merge", x)(x, weights, mean=mean)


def ternarize(x: Tensor, mask: Tensor, scale: Tensor) -> Tensor:
    return kernel("ternarize", x)(x, mask, scale)


__all__ = [
    "disjoint_merge",
    "elect_sign",
    "magnitude_histogram",
    "radix_passes",
    "row_moments",
    "magnitude_ranks",
    "counter_bits24",
    "magprune_mask",
    "sum_l1",
    "task_vector_sum_l1",
    "checked_task_vectors",
    "slerp_moments",
    "slerp_delta",
    "rank_boundary",
    "select_by_threshold",
    "ternarize",
    "topk_mask",
    "dare_keep_mask",
    "fused_sparse_merge",
    "KernelUnavailable",
    "fused_task_arithmetic",
    "task_vector_gram",
    "task_vectors",
    "apply_delta",
    "all_finite",
    "kernel",
    "kernel_mode",
    "pack_bits",
    "unpack_bits",
]
