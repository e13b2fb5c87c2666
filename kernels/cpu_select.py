"""The CPU path of the exact magnitude selection (``rank_boundary``, ``select_by_threshold``, ``topk_mask`` of
``kernels.reference``), in numpy: bit for bit the same results as the torch code there, which stays the
reference and the path for other devices (the tests compare both with a stable-argsort oracle).

np.partition (introselect, SIMD on x86) and numpy's compares are several times faster than ``torch.kthvalue`` and
torch's bool reductions on the CPU, and numpy releases the GIL, so the work is split over
``torch.get_num_threads()`` threads. Long rows find their k-th value from a fixed-seed sample and one filtering
pass (exactly: a miss falls back to the full row); a value that dominates a row (exact zeros, bf16 ties) is split
off by counting, since partition slows down many times over on it.
"""

from __future__ import annotations

import functools
import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np
import torch

from kernels import buffers
from kernels.compiled import jit

Tensor = torch.Tensor


#: rows at least this long find their boundary from a sample and one filtering pass instead of a full partition
_SAMPLE_MIN_N = 1 << 17
#: size of that sample; the candidate band kept by the filter is about 8·sqrt(p(1 − p) / _SAMPLE) of the row
_SAMPLE = 1 << 16
#: np.partition slows down many times over when one value fills a large part of what it partitions (zeros, ties
#: of bf16 differences): a value holding 1/_DOMINANT of a _PROBE-element sample is split off by counting, or the
#: rows are sorted instead
_DOMINANT = 20
_PROBE = 1 << 12
#: work on fewer elements than this stays on the calling thread
_PARALLEL_MIN = 1 << 20

_T = TypeVar("_T")
_U = TypeVar("_U")
_pool: ThreadPoolExecutor | None = None
_pool_key = (0, 0)
_pool_lock = threading.Lock()


def _parallel_map(fn: Callable[[_T], _U], items: list[_T]) -> list[_U]:
    """``[fn(item) for item in items]``, on a shared thread pool when there are several items and threads."""
    global _pool, _pool_key
    threads = max(1, torch.get_num_threads())
    if min(len(items), threads) <= 1:
        return [fn(item) for item in items]
    key = (os.getpid(), threads)  # a forked child gets its own pool (its parent's threads are not in it)
    with _pool_lock:
        if _pool is None or _pool_key != key:
            if _pool is not None and _pool_key[0] == key[0]:
                _pool.shutdown(wait=False)
            _pool, _pool_key = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="alloy-select"), key
        pool = _pool
    return list(pool.map(fn, items))


def _tiles(rows: int, n: int) -> list[tuple[slice, slice]]:
    """(rows, columns) pieces of an ``[R, n]`` array, one per thread: column ranges of every row when rows are
    long, blocks of rows otherwise; one piece when the array is small."""
    parts = max(1, torch.get_num_threads()) if rows * n >= _PARALLEL_MIN else 1
    if parts > 1 and n >= _PARALLEL_MIN:
        cuts = [n * i // parts for i in range(parts + 1)]
        return [
            (slice(r, r + 1), slice(a, b)) for r in range(rows) for a, b in zip(cuts, cuts[1:], strict=False)
        ]
    parts = min(parts, rows)
    cuts = [rows * i // parts for i in range(parts + 1)] if parts > 1 else [0, rows]
    return [(slice(a, b), slice(0, n)) for a, b in zip(cuts, cuts[1:], strict=False)]


def _magnitudes_np(x: Tensor) -> np.ndarray:
    """|x| as a fresh C-contiguous float32 numpy array (x is 2-D on the CPU; -0.0 becomes 0.0)."""
    src = x.detach().float().numpy()
    out = np.empty(src.shape, dtype=np.float32)

    def work(tile: tuple[slice, slice]) -> None:
        np.abs(src[tile], out=out[tile])

    _parallel_map(work, _tiles(*src.shape))
    return out


@functools.lru_cache(maxsize=64)
def _sample_index(n: int, size: int) -> np.ndarray:
    """Fixed positions (ascending) of a stratified random sample of ``size`` of n >= 2·size elements."""
    stride = n // size
    jitter = np.random.default_rng(0x5E1EC7).integers(0, stride, size)
    index = np.arange(size, dtype=np.int64) * stride + jitter
    index.flags.writeable = False
    return index


def _dominant_value(flat: np.ndarray) -> np.float32 | None:
    """A value that holds at least 1/_DOMINANT of (a sample of) the 1-D ``flat``, if there is one."""
    probe = flat[_sample_index(flat.size, _PROBE)] if flat.size >= 2 * _PROBE else flat
    values, counts = np.unique(probe, return_counts=True)
    top = int(counts.argmax())
    return values[top] if counts[top] > 1 and counts[top] * _DOMINANT >= probe.size else None


def _kth_largest_1d(values: np.ndarray, r: int, *, owned: bool) -> tuple[np.float32, int]:
    """(the r-th largest of the 1-D ``values``, how many are larger), 1 <= r <= size; reorders ``values`` only if
    ``owned``. By np.partition, after splitting off (counting) a dominant value, a few times at most, else a sort."""
    greater = 0
    for _ in range(4):
        dominant = _dominant_value(values) if values.size > 64 else None
        if dominant is None:
            part = values if owned else values.copy()
            kth = part.size - r
            part.partition(kth)
            value = part[kth]
            return value, greater + int(np.count_nonzero(part[kth + 1 :] > value))
        above = values > dominant
        n_above = int(np.count_nonzero(above))
        n_equal = int(np.count_nonzero(values == dominant))
        if n_above < r <= n_above + n_equal:
            return dominant, greater + n_above
        if r <= n_above:
            values = values[above]
        else:
            values = values[values < dominant]
            r -= n_above + n_equal
            greater += n_above + n_equal
        owned = True
    ordered = np.sort(values)
    value = ordered[ordered.size - r]
    return value, greater + int(ordered.size - np.searchsorted(ordered, value, side="right"))


def _kth_largest_sampled(row: np.ndarray, r: int) -> tuple[np.float32, int] | None:
    """As ``_kth_largest_1d`` for a long row, by a band [lo, hi] around the r-th largest taken from a sample: one
    pass counts the elements above hi and marks those inside, and only those are searched. The answer is exact
    whenever it is returned; None when the band missed it (rare: the margin is 4 standard deviations)."""
    n = row.size
    sample = row[_sample_index(n, _SAMPLE)]
    size = sample.size
    p = r / n
    centre = (n - r) / n * size  # where the r-th largest sits in the sorted (ascending) sample
    margin = 4.0 * math.sqrt(size * p * (1.0 - p)) + 8.0
    low, high = math.floor(centre - margin), math.ceil(centre + margin)
    kth = [k for k in (low, high) if 0 <= k < size]
    if kth:
        sample.partition(kth)
    lo = sample[low] if low >= 0 else np.float32(-np.inf)
    hi = sample[high] if high < size else np.float32(np.inf)
    inside = np.empty(n, dtype=bool)
    tiles = [cols for _, cols in _tiles(1, n)]

    def count(cols: slice) -> tuple[int, int]:
        above = row[cols] > hi
        np.greater_equal(row[cols], lo, out=inside[cols])
        np.not_equal(inside[cols], above, out=inside[cols])  # lo <= |x| <= hi (above is a subset)
        return int(np.count_nonzero(above)), int(np.count_nonzero(inside[cols]))

    counts = _parallel_map(count, tiles)
    greater = sum(c[0] for c in counts)
    band = sum(c[1] for c in counts)
    k = r - greater  # the r-th largest is the k-th largest inside the band
    if not 0 < k <= band:
        return None
    if lo == hi:
        return lo, greater
    candidates = np.concatenate(_parallel_map(lambda cols: row[cols][np.flatnonzero(inside[cols])], tiles))
    value, in_band = _kth_largest_1d(candidates, k, owned=True)
    return value, greater + in_band


def _kth_largest_rows(block: np.ndarray, ranks: list[int]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per rank r (1..n, every row of ``block[R, n]`` the same r): (r-th largest per row, count of larger)."""
    rows, n = block.shape
    kths = sorted({n - r for r in ranks})
    found = {r: (np.empty(rows, dtype=np.float32), np.empty(rows, dtype=np.int64)) for r in ranks}
    # with a dominant value np.partition degrades and sorting is the faster
    ties = _dominant_value(block.reshape(-1)) is not None

    def work(tile: tuple[slice, slice]) -> None:
        if ties:
            part = np.sort(block[tile[0]], axis=1)
        else:
            # one partition serves every rank (Breadcrumbs: both edges of the band)
            part = block[tile[0]].copy()
            part.partition(kths, axis=1)
        for r, (value, greater) in found.items():
            v = part[:, n - r]
            value[tile[0]] = v
            greater[tile[0]] = _row_counts(part[:, n - r + 1 :] > v[:, None])

    _parallel_map(work, _tiles(rows, n))
    return found


def _boundaries_np(mag: np.ndarray, ranks: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """``rank_boundary`` of the magnitudes ``mag[R, n]`` for each int64 rank array ([R], values in 0..n)."""
    rows, n = mag.shape
    out = [(np.full(rows, np.inf, dtype=np.float32), np.zeros(rows, dtype=np.int64)) for _ in ranks]
    if rows == 0 or n == 0:
        return out
    if n >= _SAMPLE_MIN_N:
        for i in range(rows):
            for (threshold, quota), rank in zip(out, ranks, strict=True):
                r = int(rank[i])
                if r > 0:
                    sampled = _kth_largest_sampled(mag[i], r)
                    value, greater = sampled or _kth_largest_1d(mag[i], r, owned=False)
                    threshold[i], quota[i] = value, r - greater
        return out
    stacked = np.stack(ranks, axis=1)
    if bool((stacked == stacked[0]).all()):  # the common case: one rank (tuple) for every row
        groups: list[tuple[np.ndarray | None, list[int]]] = [(None, stacked[0].tolist())]
    else:  # per-model densities: group rows by their ranks
        keys, inverse = np.unique(stacked, axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        groups = [(np.flatnonzero(inverse == g), key.tolist()) for g, key in enumerate(keys)]
    for sel, key in groups:
        live = [r for r in key if r > 0]
        if not live:
            continue
        found = _kth_largest_rows(mag if sel is None else mag[sel], live)
        for (threshold, quota), r in zip(out, key, strict=True):
            if r > 0:
                where = slice(None) if sel is None else sel
                threshold[where], quota[where] = found[r][0], r - found[r][1]
    return out


def _row_counts(mask: np.ndarray) -> np.ndarray:
    """int64 [R]: True per row of a 2-D bool array (a loop of 1-D count_nonzero beats its axis= form)."""
    return np.fromiter((np.count_nonzero(row) for row in mask), dtype=np.int64, count=mask.shape[0])


def _drop_ties_after(out: np.ndarray, ties: np.ndarray, quota: int) -> None:
    """Clear in the 1-D ``out`` every tie (``ties`` True) after the first ``quota`` ones: find where tie number
    ``quota`` sits by counting chunk by chunk, then clear the ties from there on in one pass."""
    chunk, seen = 1 << 18, 0
    for start in range(0, ties.size, chunk):
        here = ties[start : start + chunk]
        count = int(np.count_nonzero(here))
        if seen + count > quota:
            first = start + int(np.flatnonzero(here)[quota - seen])
            np.greater(out[first:], ties[first:], out=out[first:])  # out & ~ties
            return
        seen += count


def _drop_extra_ties(
    out: np.ndarray, mag: np.ndarray, threshold: np.ndarray, quota: np.ndarray, rows: np.ndarray
) -> None:
    """In ``out`` rows ``rows`` (which hold every element with |x| >= threshold), keep only the first ``quota``
    elements equal to the threshold (lowest index first)."""
    n = mag.shape[1]
    if n >= _SAMPLE_MIN_N or rows.size == 1:
        for i in rows.tolist():
            _drop_ties_after(out[i], mag[i] == threshold[i], int(quota[i]))
        return

    def work(some: np.ndarray) -> None:
        ties = mag[some] == threshold[some, None]
        flat = np.flatnonzero(ties)  # row-major: by row, then by index
        starts = np.searchsorted(flat, np.arange(some.size + 1) * n)  # each row's first tie in flat
        nth = starts[:-1] + quota[some]  # tie number `quota` (0-based) of each row, where it has one
        cut = np.full(some.size, n, dtype=np.int64)
        more = np.flatnonzero(nth < starts[1:])
        cut[more] = flat[nth[more]] - more * n
        ties &= np.arange(n) >= cut[:, None]  # the ties from tie number `quota` on
        out[some] = np.greater(out[some], ties)  # out & ~ties

    parts = max(1, torch.get_num_threads()) if rows.size * n >= _PARALLEL_MIN else 1
    _parallel_map(work, [some for some in np.array_split(rows, min(parts, rows.size)) if some.size])


def _select_np(
    mag: np.ndarray, threshold: np.ndarray, quota: np.ndarray, expected: np.ndarray | None = None
) -> np.ndarray:
    """``select_by_threshold`` of the magnitudes ``mag[R, n]``: |x| >= threshold (|x| > threshold where the quota
    is 0), then the ties past the quota dropped in the rows that have some. ``expected``: the number selected
    per row when known (the rank the boundary came from), which spares the pass that counts ties."""
    rows, n = mag.shape
    out = np.empty((rows, n), dtype=bool)
    strict = quota <= 0
    tiles = _tiles(rows, n)

    def work(tile: tuple[slice, slice]) -> np.ndarray:
        part, into, thr, exclusive = mag[tile], out[tile], threshold[tile[0], None], strict[tile[0]]
        if bool(exclusive.all()):
            np.greater(part, thr, out=into)
        elif not bool(exclusive.any()):
            np.greater_equal(part, thr, out=into)
        else:
            for j, ex in enumerate(exclusive.tolist()):
                (np.greater if ex else np.greater_equal)(part[j], thr[j], out=into[j])
        if expected is not None:
            return _row_counts(into)
        return _row_counts(part == thr)  # ties

    counts = np.zeros(rows, dtype=np.int64)
    for (row_slice, _), count in zip(tiles, _parallel_map(work, tiles), strict=True):
        counts[row_slice] += count
    extra = counts != expected if expected is not None else counts > quota
    fix = np.flatnonzero(extra & ~strict)
    if fix.size:
        _drop_extra_ties(out, mag, threshold, quota, fix)
    return out


def _as_rows(values: np.ndarray, rows: int) -> np.ndarray:
    return np.ascontiguousarray(np.broadcast_to(values.reshape(-1), (rows,)))


#: rows at most this many (each at least _SAMPLE_MIN_N long) take the compiled radix select: its histograms are
#: R × 2^16 counters per thread
_JIT_MAX_ROWS = 64
_HIGH = 1 << 16
_LOW = 1 << 15
_INF_BITS = np.uint32(0x7F800000)


def _compiled_rows(x: Tensor) -> np.ndarray | None:
    """``x[R, n]`` as float32 numpy rows when the compiled radix select takes it (long rows, few of them)."""
    rows, n = x.shape
    if n < _SAMPLE_MIN_N or rows > _JIT_MAX_ROWS or jit() is None:
        return None
    return np.ascontiguousarray(x.detach().float().numpy())


def _column_spans(n: int) -> list[tuple[int, int]]:
    parts = max(1, torch.get_num_threads()) if n >= _PARALLEL_MIN else 1
    cuts = [n * i // parts for i in range(parts + 1)]
    return list(zip(cuts, cuts[1:], strict=False))


def _summed(
    fn: Callable[[int, int, np.ndarray], None], shape: tuple[int, int], n: int, role: str
) -> np.ndarray:
    """Σ over column spans (one per thread) of the int64 histograms ``fn(lo, hi, hist)`` fills, into the reused
    buffer ``role`` (valid until the next call with that role): inside ``buffers.reuse()`` neither the span
    histograms nor the sum are new memory. Not ``cpu_fused._summed_over_spans``: routed through it (its spans
    start at 2^18 columns, these at 2^20, on another pool), a Breadcrumbs merge pass ran 3.94–4.28 s against
    3.49–3.62 s."""
    spans = _column_spans(n)
    parts = buffers.take("select_span_histograms", (len(spans), *shape), torch.int64).numpy()
    parts.fill(0)
    _parallel_map(lambda i: fn(spans[i][0], spans[i][1], parts[i]), list(range(len(spans))))
    total = buffers.take(role, shape, torch.int64).numpy()
    np.sum(parts, axis=0, out=total)
    return total


def _digit(hist: np.ndarray, wanted: np.ndarray, row_of: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per entry e: in row ``row_of[e]`` of ``hist[M, B]``, the digit holding the ``wanted[e]``-th largest
    (1-based) and how many lie in higher digits (``cpu_jit.histogram_descend``: a cumulative sum over every
    digit of a [M, 2^16] histogram took 677 of 4118 main-thread samples of a Breadcrumbs merge)."""
    compiled = jit()
    assert compiled is not None
    digit, higher = np.empty(row_of.size, np.int64), np.empty(row_of.size, np.int64)
    compiled.histogram_descend(
        hist, np.ascontiguousarray(row_of, np.int64), np.ascontiguousarray(wanted, np.int64), digit, higher
    )
    return digit, higher


def _compiled_boundaries(
    rows: np.ndarray, ranks: list[np.ndarray]
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``rank_boundary`` of ``rows[R, n]`` per int64 rank array ([R], values in 0..n), exact, by the compiled
    two-digit radix select: per rank (threshold bits uint32 [R], quota [R], ties at the threshold [R])."""
    compiled = jit()
    assert compiled is not None
    r_count, n = rows.shape
    high = _summed(
        lambda lo, hi, h: compiled.high_histogram_span(rows, lo, hi, h), (r_count, _HIGH), n, "select_high"
    )
    live = np.concatenate([np.maximum(rank, 1) for rank in ranks])  # rank 0 is answered below
    # entries are rank-major: entry m·R + i is row i of rank block m
    row = np.tile(np.arange(r_count, dtype=np.int64), len(ranks))
    block = np.repeat(np.arange(len(ranks), dtype=np.int64), r_count)
    bins, greater_high = _digit(high, live, row)
    asked = np.where(np.concatenate(ranks) > 0, bins, -1)
    # the low-digit kernel wants its bins R-major: entry m·R + i is its bin i·len(ranks) + m
    low_row = row * len(ranks) + block
    per_row = np.empty_like(asked)
    per_row[low_row] = asked
    low = _summed(
        lambda lo, hi, h: compiled.low_histogram_span(rows, lo, hi, per_row, h),
        (per_row.size, _LOW),
        n,
        "select_low",
    )
    digits, greater_low = _digit(low, live - greater_high, low_row)
    bits = ((bins.astype(np.uint32) << np.uint32(15)) | digits.astype(np.uint32)).astype(np.uint32)
    ties = low[low_row, digits]
    quota = live - greater_high - greater_low
    out = []
    for m, rank in enumerate(ranks):
        part = slice(m * r_count, (m + 1) * r_count)
        zero = rank <= 0
        out.append(
            (
                np.where(zero, _INF_BITS, bits[part]).astype(np.uint32),
                np.where(zero, 0, quota[part]).astype(np.int64),
                np.where(zero, 0, ties[part]).astype(np.int64),
            )
        )
    return out


def _cuts(rows: np.ndarray, bits: np.ndarray, quota: np.ndarray, ties: np.ndarray | None) -> np.ndarray:
    """Per row, the index before which ties at the threshold are kept: none for a quota of 0, all when the
    quota covers them, else up to tie number ``quota``."""
    compiled = jit()
    assert compiled is not None
    n = rows.shape[1]
    cut = np.empty(rows.shape[0], dtype=np.int64)
    for i in range(rows.shape[0]):
        q = int(quota[i])
        if q <= 0:
            cut[i] = 0
        elif ties is not None and q >= int(ties[i]):
            cut[i] = n
        else:
            cut[i] = compiled.tie_cut(rows[i], np.uint32(bits[i]), q)
    return cut


def _compiled_select(rows: np.ndarray, edges: np.ndarray, cuts: np.ndarray) -> np.ndarray:
    """bool [R, n]: selected by the upper boundary (column 0 of ``compiled_band_edges``' edges and cuts) and not
    by the lower one (column 1)."""
    compiled = jit()
    assert compiled is not None
    n = rows.shape[1]
    upper_bits, lower_bits = np.ascontiguousarray(edges[:, 0]), np.ascontiguousarray(edges[:, 1])
    upper_cut, lower_cut = np.ascontiguousarray(cuts[:, 0]), np.ascontiguousarray(cuts[:, 1])
    out = np.empty(rows.shape, dtype=np.bool_)  # the caller keeps it: not a reused buffer

    def work(span: tuple[int, int]) -> None:
        compiled.band_select_span(rows, span[0], span[1], upper_bits, upper_cut, lower_bits, lower_cut, out)

    _parallel_map(work, _column_spans(n))
    return out


def compiled_band_edges(
    x: Tensor,
    upper: tuple[np.ndarray | None, np.ndarray | None],
    lower: tuple[np.ndarray | None, np.ndarray | None] | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """For the in-pass selection of ``cpu_jit.sparse_merge_span`` (BAND): (float32 rows, edges uint32 [R, 2],
    cuts int64 [R, 2]) of ``x[R, n]``, column 0 the upper boundary and column 1 the lower one; None when the
    compiled radix select does not take ``x``. A boundary is (rank [R], None) for a top-k edge or (threshold [R],
    quota [R]) for a precomputed one; ``lower`` None removes nothing."""
    rows = _compiled_rows(x)
    if rows is None:
        return None
    r_count = rows.shape[0]
    edges = np.empty((r_count, 2), dtype=np.uint32)
    cuts = np.empty((r_count, 2), dtype=np.int64)
    ranked = [
        (column, edge[0])
        for column, edge in enumerate((upper, lower))
        if edge is not None and edge[1] is None
    ]
    # the top-k edges (Breadcrumbs: both) from one pair of histogram passes
    found = (
        _compiled_boundaries(rows, [np.ascontiguousarray(r, dtype=np.int64) for _, r in ranked])
        if ranked
        else []
    )
    by_column = {column: boundary for (column, _), boundary in zip(ranked, found, strict=True)}
    for column, edge in enumerate((upper, lower)):
        if edge is None:
            edges[:, column], cuts[:, column] = _INF_BITS, 0
        elif column in by_column:
            bits, q, ties = by_column[column]
            edges[:, column], cuts[:, column] = bits, _cuts(rows, bits, q, ties)
        else:  # a precomputed (threshold, quota)
            threshold, quota = edge
            assert quota is not None, "a boundary without a quota is a rank, ranked above"
            bits = np.ascontiguousarray(threshold, dtype=np.float32).view(np.uint32) & np.uint32(0x7FFFFFFF)
            edges[:, column], cuts[:, column] = bits, _cuts(rows, bits, quota, None)
    return rows, edges, cuts


def _as_float(bits: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(bits, dtype=np.uint32).view(np.float32)


def rank_boundary(x: Tensor, rank: Tensor) -> tuple[Tensor, Tensor]:
    """``reference.rank_boundary`` for a CPU ``x[R, n]``; ``rank`` already clamped to [0, n]."""
    if (rows := _compiled_rows(x)) is not None:
        ((bits, quota, _),) = _compiled_boundaries(rows, [_as_rows(rank.numpy(), x.shape[0])])
        return torch.from_numpy(_as_float(bits).copy()), torch.from_numpy(quota)
    ((threshold, quota),) = _boundaries_np(_magnitudes_np(x), [_as_rows(rank.numpy(), x.shape[0])])
    return torch.from_numpy(threshold), torch.from_numpy(quota)


def select_by_threshold(x: Tensor, threshold: Tensor, tie_quota: Tensor) -> Tensor:
    """``reference.select_by_threshold`` for a CPU ``x[R, n]``."""
    rows = x.shape[0]
    quotas = _as_rows(tie_quota.to(dtype=torch.int64).cpu().numpy(), rows)
    thresholds = _as_rows(threshold.to(dtype=torch.float32).cpu().numpy(), rows)
    if (found := compiled_band_edges(x, (thresholds, quotas), None)) is not None:
        return torch.from_numpy(_compiled_select(*found))
    return torch.from_numpy(_select_np(_magnitudes_np(x), thresholds, quotas))


def topk_mask(x: Tensor, keep: Tensor, skip: Tensor) -> Tensor:
    """``topk_mask`` on the CPU: one |x|, one partition for both edges of a Breadcrumbs band, and masks built
    knowing how many each row selects (so ties are only counted in rows that have more than the quota)."""
    rows, n = x.shape
    upper = _as_rows((skip + keep).clamp(0, n).numpy(), rows)
    band = bool((skip > 0).any())
    ranks = [upper, _as_rows(skip.clamp(0, n).numpy(), rows)] if band else [upper]
    if (found := compiled_band_edges(x, (upper, None), (ranks[1], None) if band else None)) is not None:
        return torch.from_numpy(_compiled_select(*found))
    magnitude = _magnitudes_np(x)
    boundaries = _boundaries_np(magnitude, ranks)
    mask = _select_np(magnitude, *boundaries[0], expected=upper)
    if band:
        removed = _select_np(magnitude, *boundaries[1], expected=ranks[1])
        np.greater(mask, removed, out=mask)  # mask & ~removed
    return torch.from_numpy(mask)
