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
