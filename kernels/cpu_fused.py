"""CPU twins of reference ops that are one elementwise pass: cache-blocked, multithreaded, bit-exact.

Eager torch runs each op of ``reference.fused_task_arithmetic`` over the whole tensor, so a merge of K bf16 inputs
streams about 4K+4 float32 tensors through memory (convert, subtract, accumulate, scale, add, cast: each a full
pass, each a DRAM round trip). Here the same ops, in the same order, run on blocks of ``BLOCK`` elements whose
float32 temporaries (a few × 64 KiB) stay in the core's L2 cache; only the inputs are read from memory and only
the output is written. Each element goes through exactly the reference's float32 operations, so the result is
bit-identical to it (tested in ``tests/kernels/test_cpu_fused.py``).

Parallelism: the flat tensor is split into one contiguous span per thread (``torch.get_num_threads()``); a block
is below ATen's intra-op grain (32768), so each op runs on the calling thread and the threads don't contend for
ATen's own pool. torch releases the GIL inside each op. ``dispatch.kernel`` picks these for CPU tensors unless
``ALLOY_KERNELS=torch`` (then the reference runs: it is the oracle and the fallback).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

Tensor = torch.Tensor

#: elements per block: 64 KiB of float32 per temporary; three temporaries stay in a 512 KiB+ L2
BLOCK = 1 << 14
#: below this many elements one thread does it all (thread hand-off costs more than it saves)
_PARALLEL_MIN = 1 << 18
_pool: ThreadPoolExecutor | None = None


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _run_spans(numel: int, work: Callable[[int, int], None]) -> None:
    """``work(lo, hi)`` over contiguous spans covering [0, numel), one per thread, block-aligned."""
    global _pool
    threads = _threads() if numel >= _PARALLEL_MIN else 1
    if threads == 1:
        work(0, numel)
        return
    if _pool is None or _pool._max_workers != threads:  # noqa: SLF001 (torch's thread count can change)
        _pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="alloy-cpu")
    step = -(-numel // threads)
    step += -step % BLOCK
    futures = [_pool.submit(work, lo, min(lo + step, numel)) for lo in range(0, numel, step)]
    for future in futures:
        future.result()  # re-raises a worker's exception here


def fused_task_arithmetic(
    base: Tensor,
    finetuned: Sequence[Tensor],
    weights: Sequence[float],
    *,
    scale: float = 1.0,
    out_dtype: torch.dtype,
) -> Tensor:
    """``reference.fused_task_arithmetic``, bit-exact: per element, in float32, acc = Σ_t w_t·(θ_t − θ_0) left to
    right, then θ_0 + scale·acc, then one cast to ``out_dtype``. Never writes to its inputs."""
    if len(finetuned) != len(weights):
        raise ValueError(f"{len(finetuned)} fine-tuned tensors for {len(weights)} weights")
    for theta in finetuned:
        if theta.shape != base.shape:
            raise ValueError(f"shape {tuple(theta.shape)} differs from the base's {tuple(base.shape)}")
    flat_base = base.contiguous().reshape(-1)
    flat_inputs = [t.contiguous().reshape(-1) for t in finetuned]
    ws = [float(w) for w in weights]
    out = torch.empty(flat_base.shape, dtype=out_dtype)

    def work(lo: int, hi: int) -> None:
        size = min(BLOCK, hi - lo)
        base32, acc, delta = (torch.empty(size, dtype=torch.float32) for _ in range(3))
        for start in range(lo, hi, BLOCK):
            end = min(start + BLOCK, hi)
            n = end - start
            b, a, d = base32[:n], acc[:n], delta[:n]
            b.copy_(flat_base[start:end])
            a.zero_()
            for theta, weight in zip(flat_inputs, ws, strict=True):
                d.copy_(theta[start:end]).sub_(b)
                a.add_(d, alpha=weight)
            out[start:end].copy_(b.add_(a.mul_(scale)))

    if flat_base.numel():
        _run_spans(flat_base.numel(), work)
    return out.view(base.shape)


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
    """``reference.fused_sparse_merge``, bit-exact: the same selection (``reference.sparse_task_vectors``), then
    the aggregation and the report counts in one cache-blocked pass over the K sparse task vectors, per element
    the reference's float32 operations in its order (sign election Σ_t w_t·τ̂_t, agreement on the weighted
    value, disjoint sum, the mean's divisor; or the plain weighted sum)."""
    from kernels.reference import sparse_task_vectors

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
    k = sparse.shape[0]
    rows = sparse.reshape(k, -1)
    numel = rows.shape[1]
    ws = w.tolist()
    equal_weights = len(set(ws)) == 1
    total_w = float(w.sum())
    plain_divisor = total_w if abs(total_w) >= 1e-8 else 1.0
    merged = torch.empty(numel, dtype=torch.float32)
    counts: list[tuple[int, int]] = []

    def work(lo: int, hi: int) -> None:
        kept = conflicts = 0
        for start in range(lo, hi, BLOCK):
            end = min(start + BLOCK, hi)
            xs = [rows[t, start:end] for t in range(k)]
            nonzero = torch.zeros(end - start, dtype=torch.uint8 if k < 256 else torch.int32)
            for xt in xs:
                nonzero.add_(xt != 0)
            kept += int(nonzero.sum(dtype=torch.int64))
            summed = torch.zeros(end - start, dtype=torch.float32)
            for xt, weight in zip(xs, ws, strict=True):
                summed.add_(xt, alpha=weight)
            if not consensus:
                merged[start:end].copy_(summed / plain_divisor if mean else summed)
                continue
            gamma = torch.where(summed >= 0, 1.0, -1.0)
            total = torch.zeros_like(gamma)
            contributors = torch.zeros(gamma.shape, dtype=nonzero.dtype)
            divisor = torch.zeros_like(gamma) if mean and not equal_weights else None
            for xt, weight in zip(xs, ws, strict=True):
                if weight == 0:
                    continue  # w_t·x_t = 0 never agrees with γ = ±1
                agree = torch.sign(xt) == (gamma if weight > 0 else -gamma)
                total.add_(torch.where(agree, xt, 0.0), alpha=weight)
                contributors.add_(agree)
                if divisor is not None:
                    divisor.add_(agree, alpha=weight)
            conflicts += int((nonzero > contributors).sum(dtype=torch.int64))
            if mean:
                if divisor is None:
                    divisor = contributors.to(torch.float32).mul_(ws[0])
                total = total / torch.where(divisor == 0, 1.0, divisor)
            merged[start:end].copy_(total)
        counts.append((kept, conflicts))  # list.append is atomic under the GIL

    if numel:
        _run_spans(numel, work)
    kept = sum(c[0] for c in counts)
    conflicts = sum(c[1] for c in counts)
    return (
        merged.view(sparse.shape[1:]),
        torch.tensor(kept, dtype=torch.int64),
        torch.tensor(conflicts, dtype=torch.int64),
    )
