"""CPU twins of reference ops that are one elementwise pass: cache-blocked, multithreaded, bit-exact.

Eager torch runs each op of ``reference.fused_task_arithmetic`` over the whole tensor, so a merge of K bf16 inputs
streams about 4K+4 float32 tensors through memory (convert, subtract, accumulate, scale, add, cast: each a full
pass, each a DRAM round trip). Here the same ops, in the same order, run on blocks of ``BLOCK`` elements whose
float32 temporaries (a few × 128 KiB) stay in the core's L2 cache; only the inputs are read from memory and only
the output is written. Each element goes through exactly the reference's float32 operations, so the result is
bit-identical to it (tested in ``tests/kernels/test_cpu_fused.py``).

``fused_sparse_merge`` (TIES, DARE, Breadcrumbs, ...) is one such pass too: per block of ``SPARSE_BLOCK`` columns
it applies the selection (a DARE mask hashed in place, or a precomputed top-k bool mask), elects the sign, takes
the disjoint sum / mean and counts, in per-thread buffers, with numpy steps and torch's fused multiply-add where
a weight is not 1; bit-identical to ``reference.fused_sparse_merge`` (``tests/kernels/test_cpu_sparse_fast.py``).

Parallelism: the flat tensor is split into one contiguous span per thread (``torch.get_num_threads()``); a block
is below ATen's intra-op grain (32768), so each op runs on the calling thread and the threads don't contend for
ATen's own pool. torch and numpy release the GIL inside each op. ``dispatch.kernel`` picks these for CPU tensors
unless ``ALLOY_KERNELS=torch`` (then the reference runs: it is the oracle and the fallback).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kernels import buffers, reference
from kernels.compiled import jit, storage
from kernels.reference import HASH_BLOCK

Tensor = torch.Tensor

#: elements per block: 128 KiB of float32 per temporary; the three temporaries (384 KiB) stay in a 512 KiB+ L2.
#: Each block costs ~13 torch calls of a few µs of dispatch each, so larger blocks pay off until the temporaries
#: leave L2 (measured, K=3 bf16 task arithmetic on the 2-core VM, ns an element: 16 Ki 4.5 → 32 Ki 3.4 on one
#: thread, 6.1 → 5.3 wall on two; 64 Ki was slower on two threads)
BLOCK = 1 << 15
#: below this many elements one thread does it all (thread hand-off costs more than it saves)
_PARALLEL_MIN = 1 << 18
#: columns per block of ``fused_sparse_merge``: its steps are numpy calls (~1 µs of overhead each, ~40 per
#: model and block), so larger blocks than ``BLOCK`` pay off there even though the buffers then live in L3
#: (measured, 2 threads, K=3 DARE-TIES: 4K 26 ns, 16K 13 ns, 64K 9 ns per element and model)
SPARSE_BLOCK = 1 << 16
_pool: ThreadPoolExecutor | None = None


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _spans(numel: int) -> list[tuple[int, int]]:
    """The contiguous spans covering [0, numel) that ``_run_spans`` hands out: one per thread, block-aligned."""
    threads = _threads() if numel >= _PARALLEL_MIN else 1
    step = -(-numel // threads)
    step += -step % BLOCK
    return [(lo, min(lo + step, numel)) for lo in range(0, numel, step)] if numel else []


def _run_spans(numel: int, work: Callable[[int, int], None]) -> None:
    """``work(lo, hi)`` over ``_spans(numel)``, the first on the calling thread, the others on the span pool."""
    global _pool
    spans = _spans(numel)
    if len(spans) <= 1:
        work(0, numel)
        return
    if _pool is None or _pool._max_workers != len(spans) - 1:  # noqa: SLF001 (torch's thread count can change)
        _pool = ThreadPoolExecutor(max_workers=len(spans) - 1, thread_name_prefix="alloy-cpu")
    # the calling thread takes the first span itself: one thread hand-off fewer per pass (a futex wake and a
    # context switch each, ~25k of them in a task-arithmetic merge, strace)
    futures = [_pool.submit(work, lo, hi) for lo, hi in spans[1:]]
    try:
        work(*spans[0])
    finally:
        wait(futures)  # every span ends before anything returns or raises: they write shared buffers
    for future in futures:
        future.result()  # re-raises a worker's exception here


def _summed_over_spans(
    numel: int,
    part: Callable[[int, int, np.ndarray], None],
    zero: np.ndarray,
    into: np.ndarray | None = None,
) -> Tensor:
    """Σ over the spans of [0, numel) of what ``part(lo, hi, out)`` adds into a zeroed array shaped like ``zero``
    (each span its own accumulator, so threads never share one), added in span order to a copy of ``zero``, or
    in place to ``into``. The accumulators are one reused buffer and the sum needs no new array with ``into``:
    fresh arrays per tensor (a radix histogram is 1.5 MiB, new memory page-faults) took 462 of the 2144 py-spy
    samples of ComPEFT's global passes."""
    total = into if into is not None else zero.copy()
    spans = _spans(numel)
    if spans:
        dtype = torch.from_numpy(zero[:0].reshape(-1)).dtype
        accumulators = buffers.take("span_sums", (len(spans), *zero.shape), dtype).numpy()
        accumulators.fill(0)
        first = {lo: i for i, (lo, _) in enumerate(spans)}
        _run_spans(numel, lambda lo, hi: part(lo, hi, accumulators[first[lo]]))
        for accumulator in accumulators:
            np.add(total, accumulator, out=total)
    return torch.from_numpy(total)


def _run_row_spans(rows: int, n: int, work: Callable[[int, int], None]) -> None:
    """``work(first, last)`` over the rows of a [rows, n] array, split like ``_run_spans`` splits its elements:
    each span takes the rows that start inside it."""
    if rows and n:
        _run_spans(rows * n, lambda lo, hi: work(-(-lo // n), -(-hi // n)))


def fused_task_arithmetic(
    base: Tensor,
    finetuned: Sequence[Tensor],
    weights: Sequence[float],
    *,
    scale: float = 1.0,
    out_dtype: torch.dtype,
    gram: Tensor | None = None,
) -> Tensor:
    """``reference.fused_task_arithmetic``, bit-exact: per element, in float32, acc = Σ_t w_t·(θ_t − θ_0) left to
    right, then θ_0 + scale·acc, then one cast to ``out_dtype``. Never writes to its inputs.

    ``gram`` (float64 [K, K]) gains the task vectors' Gram matrix from the same pass: each block keeps its K
    deltas (K × 128 KiB, still in L2) and adds their float32 product, so the report's norms and cosines cost
    no second read of the inputs (a separate pass cost 1.9× the merge itself, measured). Equal to
    ``reference.task_vector_gram`` up to float32 rounding (blocks are summed in a different grouping)."""
    if len(finetuned) != len(weights):
        raise ValueError(f"{len(finetuned)} fine-tuned tensors for {len(weights)} weights")
    for theta in finetuned:
        if theta.shape != base.shape:
            raise ValueError(f"shape {tuple(theta.shape)} differs from the base's {tuple(base.shape)}")
    flat_base = base.contiguous().reshape(-1)
    flat_inputs = [t.contiguous().reshape(-1) for t in finetuned]
    ws = [float(w) for w in weights]
    out = buffers.take("output", flat_base.shape, out_dtype)
    k = len(flat_inputs)
    partial_grams: list[Tensor] = []
    compiled = jit()
    arrays = [storage(t) for t in (flat_base, out, *flat_inputs)] if compiled is not None else []
    if compiled is not None and k and all(a is not None for a in arrays) and flat_base.numel():
        base_np, out_np, *inputs_np = arrays
        w32, scale32 = np.asarray(ws, dtype=np.float32), np.float32(scale)

        def compiled_work(lo: int, hi: int) -> None:
            part = np.zeros((k, k), dtype=np.float64)
            compiled.task_arithmetic_span(
                base_np, tuple(inputs_np), w32, scale32, out_np, part, gram is not None, lo, hi
            )
            partial_grams.append(torch.from_numpy(part))

        _run_spans(flat_base.numel(), compiled_work)
        if gram is not None:
            for part in partial_grams:
                gram += _symmetric(part).to(gram.device)
        return out.view(base.shape)

    def work(lo: int, hi: int) -> None:
        size = min(BLOCK, hi - lo)
        base32, acc = (torch.empty(size, dtype=torch.float32) for _ in range(2))
        # one delta buffer, or K of them when the Gram matrix needs every model's delta of the block at once
        deltas = torch.empty((k if gram is not None else min(k, 1), size), dtype=torch.float32)
        block_gram = torch.zeros((k, k), dtype=torch.float64) if gram is not None else None
        for start in range(lo, hi, BLOCK):
            end = min(start + BLOCK, hi)
            n = end - start
            b, a = base32[:n], acc[:n]
            b.copy_(flat_base[start:end])
            a.zero_()
            for i, (theta, weight) in enumerate(zip(flat_inputs, ws, strict=True)):
                d = deltas[i if block_gram is not None else 0, :n]
                d.copy_(theta[start:end]).sub_(b)
                if weight == 1.0:  # 1·d is exact: the same sum without the multiply (the common w = 1)
                    a.add_(d)
                else:
                    a.add_(d, alpha=weight)
            if block_gram is not None:
                part = deltas[:, :n]
                block_gram += torch.mm(part, part.T).double()
            if scale != 1.0:  # acc·1 is acc
                a.mul_(scale)
            out[start:end].copy_(b.add_(a))
        if block_gram is not None:
            partial_grams.append(block_gram)  # list.append is atomic under the GIL

    if flat_base.numel():
        _run_spans(flat_base.numel(), work)
    if gram is not None:
        for part in partial_grams:
            gram += part.to(gram.device)
    return out.view(base.shape)


def task_vectors(base: Tensor, finetuned: Sequence[Tensor], *, gram: Tensor | None = None) -> Tensor:
    """``reference.task_vectors``, bit-exact: one compiled loop per span (widen, subtract, store); ``gram`` gains
    the Gram matrix from the same pass (up to float32 rounding, as ``task_vector_gram``)."""
    return checked_task_vectors(base, finetuned, gram=gram)[0]


def checked_task_vectors(
    base: Tensor, finetuned: Sequence[Tensor], *, gram: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``reference.checked_task_vectors``: ``task_vectors`` with the NaN/Inf count from the same pass (the
    values it writes are tested as they are made, not read again)."""
    compiled = jit()
    flat_base = base.contiguous().reshape(-1)
    flat_inputs = [t.contiguous().reshape(-1) for t in finetuned]
    arrays = [storage(t) for t in (flat_base, *flat_inputs)] if compiled is not None else []
    if (
        compiled is None
        or not finetuned
        or not all(a is not None for a in arrays)
        or any(t.shape != base.shape for t in finetuned)
    ):
        return reference.checked_task_vectors(base, finetuned, gram=gram)
    k = len(finetuned)
    taus = buffers.take("task_vectors", (k, flat_base.numel()), torch.float32)
    base_np, *inputs_np = arrays
    out_np = taus.numpy()
    parts: list[tuple[np.ndarray, int]] = []

    def work(lo: int, hi: int) -> None:
        part = np.zeros((k, k), dtype=np.float64)
        bad = compiled.task_vectors_span(base_np, tuple(inputs_np), out_np, part, gram is not None, lo, hi)
        parts.append((part, int(bad)))

    if flat_base.numel():
        _run_spans(flat_base.numel(), work)
    if gram is not None:
        for part, _ in parts:
            gram += _symmetric(torch.from_numpy(part)).to(gram.device)
    return taus.view(k, *base.shape), torch.tensor(sum(bad for _, bad in parts), dtype=torch.int64)


def all_finite(tensor: Tensor) -> bool:
    """``reference.all_finite``: one compiled pass per span testing exponent bits (float32, bf16)."""
    compiled = jit()
    flat = tensor.reshape(-1) if tensor.is_contiguous() else None
    values = storage(flat) if compiled is not None and flat is not None else None
    if values is None or compiled is None:
        return reference.all_finite(tensor)
    bad: list[int] = []
    if values.size:
        span = compiled.non_finite_span
        _run_spans(values.size, lambda lo, hi: bad.append(int(span(values, lo, hi))))
    return not any(bad)


def row_moments(x: Tensor) -> Tensor:
    """``reference.row_moments``: one compiled pass per span (float32 rows), the spans' sums added in float64."""
    compiled = jit()
    values = storage(x.reshape(x.shape[0], -1)) if x.dtype == torch.float32 else None
    if compiled is None or values is None:
        return reference.row_moments(x)

    def part(lo: int, hi: int, out: np.ndarray) -> None:
        compiled.moments_span(values, lo, hi, out)

    return _summed_over_spans(values.shape[1], part, np.zeros((3, values.shape[0])))


def sum_l1(x: Tensor, weights: Tensor) -> Tensor:
    """``reference.sum_l1``: one compiled pass per span over float32 ``x[K, n]``, the spans' norms added."""
    compiled = jit()
    values = storage(x.reshape(x.shape[0], -1)) if x.dtype == torch.float32 else None
    if compiled is None or values is None:
        return reference.sum_l1(x, weights)
    w = np.ascontiguousarray(weights.to(torch.float32).reshape(-1).cpu().numpy())
    if w.size != values.shape[0]:
        raise ValueError(f"{w.size} weights for {values.shape[0]} task vectors")

    def part(lo: int, hi: int, out: np.ndarray) -> None:
        out[:] = compiled.sum_l1_span(values, w, lo, hi)

    return _summed_over_spans(values.shape[1], part, np.zeros(2))


def task_vector_sum_l1(base: Tensor, finetuned: Sequence[Tensor], weights: Tensor) -> Tensor:
    """``reference.task_vector_sum_l1`` (the norms up to float64 rounding, the count exactly): one compiled pass
    per span over the stored tensors; LiNeS' α pass then reads each input once and writes nothing."""
    compiled = jit()
    flat_base = base.contiguous().reshape(-1)
    flat_inputs = [t.contiguous().reshape(-1) for t in finetuned]
    arrays = [storage(t) for t in (flat_base, *flat_inputs)] if compiled is not None else []
    w = np.ascontiguousarray(weights.to(torch.float32).reshape(-1).cpu().numpy())
    if w.size != len(finetuned):
        raise ValueError(f"{w.size} weights for {len(finetuned)} task vectors")
    if (
        compiled is None
        or not finetuned
        or not all(a is not None for a in arrays)
        or any(t.shape != base.shape for t in finetuned)
    ):
        return reference.task_vector_sum_l1(base, finetuned, weights)
    base_np, *inputs_np = arrays

    def part(lo: int, hi: int, out: np.ndarray) -> None:
        out[:] = compiled.task_vector_sum_l1_span(base_np, tuple(inputs_np), w, lo, hi)

    return _summed_over_spans(flat_base.numel(), part, np.zeros(3))


def _float32_pair(v0: Tensor, tau: Tensor) -> tuple[np.ndarray, np.ndarray] | None:
    """The flat numpy views of two same-size contiguous float32 CPU tensors (SLERP's loops), else None."""
    views = [
        storage(x.reshape(-1)) if x.dtype == torch.float32 and x.is_contiguous() else None for x in (v0, tau)
    ]
    a, t = views
    return (a, t) if a is not None and t is not None and a.shape == t.shape else None


def slerp_moments(v0: Tensor, tau: Tensor) -> Tensor:
    """``reference.slerp_moments`` up to float64 rounding: one compiled pass per span over float32 ``v0``, ``tau``."""
    compiled = jit()
    pair = _float32_pair(v0, tau)
    if compiled is None or pair is None:
        return reference.slerp_moments(v0, tau)
    a, t = pair
    return _summed_over_spans(
        a.size,
        lambda lo, hi, out: out.__setitem__(slice(None), compiled.slerp_moments_span(a, t, lo, hi)),
        np.zeros(3),
    )


def slerp_delta(v0: Tensor, tau: Tensor, c0: float, c1: float) -> Tensor:
    """``reference.slerp_delta``, bit-exact: one compiled loop per span into a reused buffer."""
    compiled = jit()
    pair = _float32_pair(v0, tau)
    if compiled is None or pair is None:
        return reference.slerp_delta(v0, tau, c0, c1)
    a, t = pair
    out = buffers.take("method_delta", v0.shape, torch.float32)
    out_np = out.reshape(-1).numpy()
    c0_, c1_ = np.float32(c0), np.float32(c1)
    if a.size:
        _run_spans(a.size, lambda lo, hi: compiled.slerp_delta_span(a, t, c0_, c1_, out_np, lo, hi))
    return out


def magnitude_ranks(x: Tensor) -> Tensor:
    """``reference.magnitude_ranks``, exactly, as a compiled radix sort per row of a 2-D float32 ``x``, rows split
    across threads (other shapes and dtypes: the reference)."""
    compiled = jit()
    values = storage(x) if x.dim() == 2 and x.dtype == torch.float32 else None
    if compiled is None or values is None:
        return reference.magnitude_ranks(x)
    r, n = values.shape
    out = np.empty((r, n), np.int64)
    _run_row_spans(r, n, lambda first, last: compiled.magnitude_ranks_span(values, first, last, out))
    return torch.from_numpy(out)


def magprune_mask(tau: Tensor, *, density: float, epsilon: float, key: int) -> Tensor:
    """``reference.magprune_mask``, exactly: one compiled pass per span of rows that ranks each row (in a row-sized
    scratch) and then derives each element's keep probability, hashes its draw and writes the masked value
    (float32 CPU tensors; rows of one element and other dtypes: the reference)."""
    compiled = jit()
    rows = tau.reshape(1, -1) if tau.dim() < 2 else tau
    values = storage(rows) if rows.dim() == 2 and rows.dtype == torch.float32 else None
    if compiled is None or values is None or values.shape[1] < 2:
        return reference.magprune_mask(tau, density=density, epsilon=epsilon, key=key)
    r, n = values.shape
    # a fresh output, not a reused buffer: it would stay allocated through the merge pass that follows, and raise
    # its peak (a DELLA merge's peak RSS rose from ~1.8 to 2.0 GiB with reused ones, measured)
    out = np.empty((r, n), np.float32)
    low, spread = np.float32(density - epsilon), np.float32(epsilon)
    _run_row_spans(
        r,
        n,
        lambda first, last: compiled.magprune_span(values, low, spread, np.uint32(key), first, last, out),
    )
    return torch.from_numpy(out).view(tau.shape)


def counter_bits24(numel: int, *, key: int, device: torch.device | str | None = None) -> Tensor:
    """``reference.counter_bits24`` bit for bit, as one compiled loop per span (CPU)."""
    compiled = jit()
    if compiled is None or torch.device(device or "cpu").type != "cpu":
        return reference.counter_bits24(numel, key=key, device=device)
    out = np.empty(numel, np.uint32)
    if numel:
        _run_spans(numel, lambda lo, hi: compiled.counter_bits_span(np.uint32(key), lo, hi, out))
    return torch.from_numpy(out.view(np.int32))  # the values are below 2^24: int32, as the reference


def magnitude_histogram(
    x: Tensor,
    *,
    prefix: Tensor,
    prefix_shift: int,
    digit_shift: int,
    digit_bits: int,
    out: Tensor | None = None,
) -> Tensor:
    """``reference.magnitude_histogram``, exact, as the compiled radix-select loops for the two digit splits of
    ``reference.RADIX_PASSES_WIDE`` (float32 rows; each span its own counts, added after, into ``out`` when
    given)."""
    compiled = jit()
    split = (prefix_shift, digit_shift, digit_bits)
    values = storage(x.reshape(x.shape[0], -1)) if x.dtype == torch.float32 else None
    if compiled is None or values is None or split not in reference.RADIX_PASSES_WIDE:
        return reference.magnitude_histogram(
            x,
            prefix=prefix,
            prefix_shift=prefix_shift,
            digit_shift=digit_shift,
            digit_bits=digit_bits,
            out=out,
        )
    r = values.shape[0]
    into = reference.histogram_out(out, r, digit_bits, x.device).numpy() if out is not None else None
    high = split == reference.RADIX_PASSES_WIDE[0]
    # the low pass filters on the high digit: a row's prefix is its bin (the first pass has prefix 0: no filter)
    bins = np.ascontiguousarray(prefix.to(torch.int64).reshape(-1).expand(r).cpu().numpy())

    def part(lo: int, hi: int, hist: np.ndarray) -> None:
        if high:
            compiled.high_histogram_span(values, lo, hi, hist)
        else:
            compiled.low_histogram_span(values, lo, hi, bins, hist)

    summed = _summed_over_spans(values.shape[1], part, np.zeros((r, 1 << digit_bits), np.int64), into=into)
    return out if out is not None else summed


def apply_delta(base: Tensor | None, delta: Tensor, *, scale: float, out_dtype: torch.dtype) -> Tensor:
    """``reference.apply_delta``, bit-exact, as one compiled loop per span into a reused output buffer."""
    compiled = jit()
    if compiled is None or base is None or scale == 0 or base.shape != delta.shape:
        return reference.apply_delta(base, delta, scale=scale, out_dtype=out_dtype)
    flat_base, flat_delta = base.contiguous().reshape(-1), delta.contiguous().reshape(-1)
    out = buffers.take("output", flat_base.shape, out_dtype)
    arrays = [storage(t) for t in (flat_base, flat_delta, out)]
    base_np, delta_np, out_np = arrays
    if base_np is None or out_np is None or delta_np is None or delta_np.dtype != np.float32:
        return reference.apply_delta(base, delta, scale=scale, out_dtype=out_dtype)
    scale32 = np.float32(scale)
    if flat_base.numel():
        _run_spans(
            flat_base.numel(),
            lambda lo, hi: compiled.apply_delta_span(base_np, delta_np, scale32, out_np, lo, hi),
        )
    return out.view(base.shape)


def task_vector_gram(taus: Tensor) -> Tensor:
    """``reference.task_vector_gram`` (up to float32 rounding): one compiled pass over the float32 task
    vectors, per span and block of columns, summed in float64."""
    compiled = jit()
    flat = taus.reshape(taus.shape[0], -1)
    if compiled is None or flat.dtype != torch.float32 or not flat.is_contiguous() or flat.shape[0] == 0:
        return reference.task_vector_gram(taus)
    k = flat.shape[0]
    parts: list[np.ndarray] = []
    rows = flat.numpy()

    def work(lo: int, hi: int) -> None:
        part = np.zeros((k, k), dtype=np.float64)
        compiled.gram_span(rows, part, lo, hi)
        parts.append(part)

    if flat.shape[1]:
        _run_spans(flat.shape[1], work)
    gram = torch.zeros((k, k), dtype=torch.float64)
    for part in parts:
        gram += torch.from_numpy(part)
    return _symmetric(gram)


def _symmetric(upper: Tensor) -> Tensor:
    """A full symmetric matrix from its upper triangle (the compiled Gram loops fill only that). In numpy:
    ``torch.triu`` always enters an OpenMP parallel region (grain 0), and waking its threads while the loader
    thread and the compiled spans hold both cores cost ~2 ms a call, 23 % of a task-arithmetic merge's
    main-thread samples outside imports (py-spy)."""
    u = upper.numpy()
    return torch.from_numpy(u + np.triu(u, 1).T)


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
    """``reference.fused_sparse_merge``, bit-exact: the same selection, then the aggregation and the report
    counts in one cache-blocked pass over the K sparse task vectors, per element the reference's float32
    operations in its order (sign election Σ_t w_t·τ̂_t, agreement on the weighted value, disjoint sum, the mean's
    divisor; or the plain weighted sum).

    The selection is applied inside that pass where it can be (``_in_pass_selection``): DARE with a scale per
    model hashes each block's keep mask into an L2-resident buffer (``reference.counter_hash24_into``, the same
    stream); top-k and threshold selections (TIES, Breadcrumbs, global scope) build bool keep masks with the
    reference's selection (1 byte an element) and apply them block by block. Either way no [K, R, m] float32
    sparse copy is made. Scaled or ternary selections (ComPEFT, DARE with a scale per row) are built first by
    ``reference.sparse_task_vectors``."""
    from kernels.reference import sparse_task_vectors

    w = weights.to(device=x.device, dtype=torch.float32).reshape(-1)
    if w.numel() != x.shape[0]:
        raise ValueError(f"{w.numel()} weights for {x.shape[0]} task vectors")
    if sum(v is not None for v in (keep, boundary, dare)) > 1:
        raise ValueError("pass one of keep (top-k), boundary (precomputed) or dare")
    compiled = jit()
    band = _band_selection(x, keep, skip, boundary, lower_boundary, scale, ternary) if compiled else None
    plan, masks = (
        (None, None)
        if band
        else _in_pass_selection(x, keep, skip, boundary, lower_boundary, dare, scale, ternary)
    )
    if plan is not None or masks is not None or band is not None:
        sparse = x.float().contiguous()
    else:
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
    rows = sparse.reshape(k, -1).numpy()
    numel = rows.shape[1]
    merged = buffers.take("sparse_merged", (numel,), torch.float32)
    counts: list[tuple[int, int]] = []
    if compiled is not None and k:
        return _compiled_sparse_merge(
            compiled, rows, w, plan, masks, band, consensus, mean, merged, sparse.shape[1:]
        )
    step = _SparseStep(w.tolist(), consensus=consensus, mean=mean, dare=plan, masks=masks)

    def work(lo: int, hi: int) -> None:
        block_buffers = step.buffers(min(SPARSE_BLOCK, hi - lo))
        kept = conflicts = 0
        for start in range(lo, hi, SPARSE_BLOCK):
            end = min(start + SPARSE_BLOCK, hi)
            block_kept, block_conflicts = step.run(rows, start, end, merged.numpy()[start:end], block_buffers)
            kept += block_kept
            conflicts += block_conflicts
        counts.append((kept, conflicts))  # list.append is atomic under the GIL

    if numel:
        _run_spans(numel, work)
    return (
        merged.view(sparse.shape[1:]),
        torch.tensor(sum(c[0] for c in counts), dtype=torch.int64),
        torch.tensor(sum(c[1] for c in counts), dtype=torch.int64),
    )


def _compiled_sparse_merge(
    compiled: Any,
    rows: np.ndarray,
    w: Tensor,
    plan: list[tuple[int, int, float]] | None,
    masks: np.ndarray | None,
    band: Band | None,
    consensus: bool,
    mean: bool,
    merged: Tensor,
    shape: torch.Size,
) -> tuple[Tensor, Tensor, Tensor]:
    """``fused_sparse_merge``'s pass as one compiled loop per span (``cpu_jit.sparse_merge_span``)."""
    k = rows.shape[0]
    weights = w.cpu().numpy().astype(np.float32)
    plain_divisor = np.float32(_plain_divisor(weights.tolist()))
    keys = np.zeros(k, dtype=np.uint32)
    thresholds = np.zeros(k, dtype=np.uint32)
    scales = np.ones(k, dtype=np.float32)
    selection = compiled.AS_STORED
    if plan is not None:
        selection = compiled.DARE
        for t, (key, threshold, scale) in enumerate(plan):
            keys[t], thresholds[t], scales[t] = key, min(threshold, 1 << 24), scale
    elif masks is not None:
        selection = compiled.MASKED
    edges, cuts = np.zeros((k, 2), np.uint32), np.zeros((k, 2), np.int64)
    if band is not None:
        edges, cuts = band.edges, band.cuts
        selection = compiled.BAND_TERNARY if band.ternary else compiled.BAND
        if band.scales is not None:
            scales = band.scales
    mask_rows = masks if masks is not None else np.zeros((k, 1), dtype=np.bool_)
    out = merged.numpy()
    counts: list[tuple[int, int]] = []

    def work(lo: int, hi: int) -> None:
        counts.append(
            compiled.sparse_merge_span(
                rows,
                mask_rows,
                selection,
                keys,
                thresholds,
                scales,
                edges,
                cuts,
                weights,
                consensus,
                mean,
                plain_divisor,
                out,
                lo,
                hi,
            )
        )

    if rows.shape[1]:
        _run_spans(rows.shape[1], work)
    return (
        merged.view(shape),
        torch.tensor(sum(int(c[0]) for c in counts), dtype=torch.int64),
        torch.tensor(sum(int(c[1]) for c in counts) if consensus else 0, dtype=torch.int64),
    )


@dataclass(frozen=True)
class Band:
    """The compiled pass's own selection: edges (magnitude bits) uint32 [K, 2] and cuts int64 [K, 2] (upper,
    lower) per model, kept values times ``scales`` [K] (None: as stored) or, ``ternary``, ±``scales``."""

    edges: np.ndarray
    cuts: np.ndarray
    scales: np.ndarray | None
    ternary: bool


def _band_selection(
    x: Tensor,
    keep: Tensor | None,
    skip: Tensor | None,
    boundary: tuple[Tensor, Tensor] | None,
    lower_boundary: tuple[Tensor, Tensor] | None,
    scale: Tensor | None,
    ternary: bool,
) -> Band | None:
    """The band for the compiled pass to select by itself (``cpu_jit`` BAND, BAND_TERNARY) when x is [K, 1, m]
    with long rows and a top-k or threshold selection, optionally scaled or ternarized per model (ComPEFT): the
    exact radix-select boundaries of each model's magnitudes, so no bool mask is written or read. None
    otherwise."""
    from kernels import cpu_select
    from kernels.reference import scale_per_row

    if x.dim() != 3 or x.shape[1] != 1 or (keep is None and boundary is None) or (ternary and scale is None):
        return None
    k, m = x.shape[0], x.shape[2]
    scales = None
    if scale is not None:
        scales = np.ascontiguousarray(scale_per_row(scale, k, 1).cpu().numpy(), dtype=np.float32)
    flat = x.float().reshape(k, m)

    def per_model(values: Tensor) -> np.ndarray:
        return np.ascontiguousarray(values.reshape(-1).expand(k).cpu().numpy())

    if keep is not None:
        upper_rank = (keep + (skip if skip is not None else 0)).clamp(0, m)
        has_band = skip is not None and bool((skip > 0).any())
        upper: tuple[np.ndarray | None, np.ndarray | None] = (per_model(upper_rank), None)
        lower: tuple[np.ndarray | None, np.ndarray | None] | None = (
            (per_model(skip.clamp(0, m)), None) if has_band and skip is not None else None
        )
    else:
        assert boundary is not None
        upper = (per_model(boundary[0].float()), per_model(boundary[1].to(torch.int64)))
        lower = (
            (per_model(lower_boundary[0].float()), per_model(lower_boundary[1].to(torch.int64)))
            if lower_boundary is not None
            else None
        )
    found = cpu_select.compiled_band_edges(flat, upper, lower)
    return None if found is None else Band(found[1], found[2], scales, ternary)


def _in_pass_selection(
    x: Tensor,
    keep: Tensor | None,
    skip: Tensor | None,
    boundary: tuple[Tensor, Tensor] | None,
    lower_boundary: tuple[Tensor, Tensor] | None,
    dare: tuple[Sequence[int], Sequence[float]] | None,
    scale: Tensor | None,
    ternary: bool,
) -> tuple[list[tuple[int, int, float]] | None, np.ndarray | None]:
    """What the pass applies itself: (per model (DARE key, threshold, scale), None) for DARE with one scale per
    model; (None, bool keep masks [K, R·m]) for an unscaled top-k / threshold selection; (None, None) when
    ``reference.sparse_task_vectors`` has to build the sparse task vectors first."""
    from kernels.reference import dare_threshold, scale_per_row, selection_masks

    if x.dim() != 3 or ternary:
        return None, None
    k, n_rows = x.shape[0], x.shape[1]
    if dare is not None:
        per_row = None if scale is None else scale_per_row(scale, k, n_rows).reshape(k, n_rows)
        if per_row is not None and not bool((per_row == per_row[:, :1]).all()):
            return None, None
        keys, densities = dare
        scales = [1.0] * k if per_row is None else per_row[:, 0].tolist()
        return [
            (int(key), dare_threshold(float(d)), s) for key, d, s in zip(keys, densities, scales, strict=True)
        ], None
    if scale is not None or (keep is None and boundary is None):
        return None, None
    flat = x.float().reshape(k * n_rows, x.shape[2])
    masks = buffers.take("keep_masks", flat.shape, torch.bool).numpy()
    for part, mask in selection_masks(
        flat, keep=keep, skip=skip, boundary=boundary, lower_boundary=lower_boundary
    ):
        masks[part] = mask.numpy()
    return None, masks.reshape(k, -1)


class _SparseStep:
    """One block of ``fused_sparse_merge``: numpy for masks, counts, signs and selects (no allocation: every
    temporary is a per-thread buffer of ``SPARSE_BLOCK`` elements); torch ``add_(alpha=w)`` for the weighted sums
    where w != 1, since that is the reference's fused multiply-add (one rounding; numpy has none).

    Exactness against the reference, for finite inputs (which it requires): a dropped or disagreeing entry is
    x·0 here (±0) where the reference has +0; every use of it is a sum (a + ±0 = a for any a, and an accumulator
    that starts at +0 never becomes −0), a comparison with 0 or a sign test, so results and counts are
    bit-identical."""

    def __init__(
        self,
        weights: list[float],
        *,
        consensus: bool,
        mean: bool,
        dare: list[tuple[int, int, float]] | None = None,
        masks: np.ndarray | None = None,
    ) -> None:
        self.w, self.consensus, self.mean, self.dare, self.masks = weights, consensus, mean, dare, masks
        self.k = len(weights)
        self.equal_weights = len(set(weights)) == 1
        self.plain_divisor = _plain_divisor(weights)
        self.count_dtype = np.uint8 if self.k < 256 else np.int32

    def buffers(self, size: int) -> dict[str, Any]:
        f32 = lambda: np.empty(size, dtype=np.float32)  # noqa: E731
        return {
            "tau": [f32() for _ in range(self.k)]
            if self.dare is not None or self.masks is not None
            else None,
            "bits": np.empty(size, dtype=np.uint32),
            "tmp": np.empty(size, dtype=np.uint32),
            "mask": np.empty(size, dtype=np.bool_),
            "summed": f32(),
            "total": f32(),
            "prod": f32(),
            "divisor": f32(),
            "nonzero": np.empty(size, dtype=self.count_dtype),
            "contributors": np.empty(size, dtype=self.count_dtype),
        }

    def _taus(self, rows: np.ndarray, start: int, end: int, buf: dict[str, Any]) -> list[np.ndarray]:
        """τ̂_t of the block: the stored rows, x·keep with a precomputed top-k mask, or (DARE) x·keep·scale with
        the mask hashed here."""
        if self.masks is not None:
            taus = [buf["tau"][t][: end - start] for t in range(self.k)]
            for t, tau in enumerate(taus):
                np.multiply(rows[t, start:end], self.masks[t, start:end], out=tau)
            return taus
        if self.dare is None:
            return [rows[t, start:end] for t in range(self.k)]
        from kernels.reference import counter_hash24_into

        n = end - start
        bits, tmp, mask = buf["bits"][:n], buf["tmp"][:n], buf["mask"][:n]
        out = []
        for t, (key, threshold, scale) in enumerate(self.dare):
            tau = buf["tau"][t][:n]
            if threshold >= 1 << 24:  # density 1 keeps everything
                np.copyto(tau, rows[t, start:end])
            else:
                for lo in range(0, n, HASH_BLOCK):  # SPARSE_BLOCK <= HASH_BLOCK: one step
                    hi = min(lo + HASH_BLOCK, n)
                    counter_hash24_into(bits[lo:hi], tmp[lo:hi], start=start + lo, key=key)
                np.less(bits, np.uint32(threshold), out=mask)
                np.multiply(rows[t, start:end], mask, out=tau)
            if scale != 1.0:  # x·1 is x: the reference's multiply by 1 changes nothing
                np.multiply(tau, np.float32(scale), out=tau)
            out.append(tau)
        return out

    def run(
        self, rows: np.ndarray, start: int, end: int, merged: np.ndarray, buf: dict[str, Any]
    ) -> tuple[int, int]:
        n = end - start
        taus = self._taus(rows, start, end, buf)
        mask = buf["mask"][:n]
        summed, total, prod = buf["summed"][:n], buf["total"][:n], buf["prod"][:n]
        nonzero, contributors = buf["nonzero"][:n], buf["contributors"][:n]
        summed.fill(0.0)
        if self.consensus:
            nonzero.fill(0)
        kept = 0
        for tau, weight in zip(taus, self.w, strict=True):
            # a compare and a count of the bools: ~6x faster than count_nonzero of float32
            kept += int(np.count_nonzero(np.not_equal(tau, 0.0, out=mask)))
            if self.consensus:
                np.add(nonzero, mask, out=nonzero)
            _accumulate(summed, tau, weight)
        if not self.consensus:
            if self.mean:
                summed_t, merged_t = torch.from_numpy(summed), torch.from_numpy(merged)
                for lo in range(0, n, BLOCK):  # below ATen's intra-op grain: stays on this thread
                    torch.div(summed_t[lo : lo + BLOCK], self.plain_divisor, out=merged_t[lo : lo + BLOCK])
            else:
                np.copyto(merged, summed)
            return kept, 0
        # γ = +1 where Σ w_t·τ̂_t >= 0 (zero elects +1), else −1; agreement sgn(w_t·τ̂_t) == γ, i.e.
        # τ̂_t·γ > 0 for w_t > 0 and τ̂_t·γ < 0 for w_t < 0 (an exact zero never agrees)
        gamma = summed  # Σ is not needed once γ is known: γ takes its buffer
        positive = np.greater_equal(summed, 0.0, out=mask)
        np.subtract(np.multiply(positive, np.float32(2.0), out=gamma), np.float32(1.0), out=gamma)
        total.fill(0.0)
        contributors.fill(0)
        divisor = buf["divisor"][:n] if self.mean and not self.equal_weights else None
        if divisor is not None:
            divisor.fill(0.0)
        for tau, weight in zip(taus, self.w, strict=True):
            if weight == 0:
                continue  # w_t·τ̂_t = 0 never agrees with γ = ±1
            np.multiply(tau, gamma, out=prod)
            agree = (np.greater if weight > 0 else np.less)(prod, 0.0, out=mask)
            np.add(contributors, agree, out=contributors)
            np.multiply(tau, agree, out=prod)  # τ̂_t where it agrees, else ±0
            _accumulate(total, prod, weight)
            if divisor is not None:
                np.add(divisor, np.multiply(agree, np.float32(weight), out=prod), out=divisor)
        conflicts = int(np.count_nonzero(np.greater(nonzero, contributors, out=mask)))
        if self.mean:
            if divisor is None:
                divisor = prod
                np.multiply(contributors, np.float32(self.w[0]), out=divisor)
            np.copyto(divisor, np.float32(1.0), where=np.equal(divisor, 0.0, out=mask))
            np.divide(total, divisor, out=merged)
        else:
            np.copyto(merged, total)
        return kept, conflicts


def _plain_divisor(weights: list[float]) -> float:
    """The plain mean's divisor, as the reference takes it: Σ w in float32, and 1 where |Σ w| < 1e-8."""
    total = float(torch.tensor(weights, dtype=torch.float32).sum())
    return total if abs(total) >= 1e-8 else 1.0


def _accumulate(acc: np.ndarray, x: np.ndarray, weight: float) -> None:
    """``acc += weight·x`` exactly as torch's ``add_(x, alpha=weight)``, the reference's fused multiply-add
    (one rounding). With weight 1 that is a plain add (1·x is exact), which numpy does with less overhead."""
    if weight == 1.0:
        np.add(acc, x, out=acc)
        return
    acc_t, x_t = torch.from_numpy(acc), torch.from_numpy(x)
    for lo in range(0, acc.size, BLOCK):  # below ATen's intra-op grain: stays on this thread
        acc_t[lo : lo + BLOCK].add_(x_t[lo : lo + BLOCK], alpha=weight)
