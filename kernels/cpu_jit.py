"""Compiled CPU loops (numba) for the elementwise passes of a merge: one loop over memory per span, vectorized.

The blocked torch twins in ``kernels.cpu_fused`` run each reference op on 32 Ki-element blocks; every op is still a
separate library call and pass over its block (~10 ns an element for K = 3 bf16 task arithmetic on the 2-core
VM). Here the same float32 operations, in the same order, are one compiled loop: a bf16 input is widened by a
shift of its bits, the weighted delta is a fused multiply-add (``llvm.fma``, the one rounding torch's vectorized
``add_(alpha=w)`` has), the cast back to bf16 rounds to nearest even as torch does (NaN to 0xFFFF, as ATen's vectorized cast). So the
results are bit-identical to the reference (``tests/kernels/test_cpu_jit.py``), at ~1.2 ns an element.

Only bf16 and float32 storage are compiled (float16 runs on the blocked twins). Every function releases the GIL
(``nogil``), so ``cpu_fused`` runs them on its own per-thread spans. Compiled code is cached on disk next to this
file (``cache=True``: the first call of each signature compiles, ~1–3 s; later processes load it). Importing this
module imports numba (~0.4 s); ``cpu_fused`` does that only on first use, and ``ALLOY_JIT=off`` (or numba
missing) keeps the blocked twins.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

#: every loop: released GIL (spans run on threads), compiled once into the on-disk cache, no bounds checks
compiled_loop = njit(nogil=True, cache=True, boundscheck=False)
#: the Gram block alone may reassociate its float64 sums
compiled_fast_loop = njit(nogil=True, cache=True, boundscheck=False, fastmath=True)


def start() -> None:
    """Start numba's CPU target now (its registries load on the first call of any compiled function)."""
    non_finite_span(np.zeros(1, dtype=np.float32), 0, 1)


@intrinsic
def _fma(typingctx, a, b, c):  # type: ignore[no-untyped-def]
    """a·b + c with one rounding (llvm.fma: vfmadd where the CPU has it, an exact libm call where not)."""
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.fma(*args)

    return sig, codegen


@intrinsic
def _u32_as_f32(typingctx, a):  # type: ignore[no-untyped-def]
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@intrinsic
def _f32_as_u32(typingctx, a):  # type: ignore[no-untyped-def]
    sig = types.uint32(types.float32)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


def _widen(value):  # type: ignore[no-untyped-def]
    """One stored element as float32 (bf16 arrives as its uint16 bits)."""
    raise NotImplementedError  # only its compiled overload runs


@overload(_widen)
def _widen_impl(value):  # type: ignore[no-untyped-def]
    if value == types.uint16:
        return lambda value: _u32_as_f32(np.uint32(value) << np.uint32(16))
    if value == types.float32:
        return lambda value: value
    return None


def _store(out, j, value):  # type: ignore[no-untyped-def]
    """out[j] = value cast to out's storage (bf16 as uint16 bits: round to nearest even; NaN to 0xFFFF, as ATen's
    vectorized conversion writes it)."""
    raise NotImplementedError


@overload(_store)
def _store_impl(out, j, value):  # type: ignore[no-untyped-def]
    if out.dtype == types.uint16:

        def to_bf16(out, j, value):  # type: ignore[no-untyped-def]
            u = _f32_as_u32(value)
            rounded = np.uint16(
                (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
            )
            out[j] = np.uint16(0xFFFF) if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000) else rounded

        return to_bf16
    if out.dtype == types.float32:

        def to_f32(out, j, value):  # type: ignore[no-untyped-def]
            out[j] = value

        return to_f32
    return None


#: elements per block: K float32 deltas of a block (for the Gram matrix) stay in L1/L2
BLOCK = 4096


@compiled_fast_loop
def _gram_block(deltas, start, n, gram):  # type: ignore[no-untyped-def]
    """gram[a, c] += Σ_j d_a[j]·d_c[j] over columns [start, start + n) of the C-contiguous ``deltas`` [K, ·]
    (float32 sums, reassociated so they vectorize: the Gram matrix is a statistic, equal to the reference up to
    float32 rounding, not a merged value). Rows are sliced as 1-D arrays: that keeps them contiguous to numba."""
    k = deltas.shape[0]
    for a in range(k):
        da = deltas[a][start : start + n]
        for c in range(a, k):
            dc = deltas[c][start : start + n]
            s = np.float32(0.0)
            for j in range(n):
                s += da[j] * dc[j]
            gram[a, c] += s


@compiled_loop
def task_arithmetic_span(base, inputs, weights, scale, out, gram, with_gram, lo, hi):  # type: ignore[no-untyped-def]
    """out[j] = θ_0 + scale·Σ_t w_t·(θ_t − θ_0) for j in [lo, hi), the reference's float32 ops in its order:
    acc = fma(d_t, w_t, acc) left to right from +0, then acc·scale (skipped at 1), then θ_0 + acc, one cast.
    ``gram`` (float64 [K, K], upper triangle) gains the deltas' products when ``with_gram``."""
    k = len(inputs)
    b32 = np.empty(BLOCK, np.float32)
    acc = np.empty(BLOCK, np.float32)
    deltas = np.empty((k if with_gram else 1, BLOCK), np.float32)
    for start in range(lo, hi, BLOCK):
        n = min(BLOCK, hi - start)
        stored = base[start : start + n]
        for j in range(n):
            b32[j] = _widen(stored[j])
            acc[j] = 0.0
        for t in range(k):
            x = inputs[t][start : start + n]
            w = weights[t]
            d = deltas[t if with_gram else 0]
            for j in range(n):
                dj = _widen(x[j]) - b32[j]
                d[j] = dj
                acc[j] = _fma(dj, w, acc[j])
        if with_gram:
            _gram_block(deltas, 0, n, gram)
        o = out[start : start + n]
        if scale != 1.0:
            for j in range(n):
                _store(o, j, b32[j] + acc[j] * scale)
        else:
            for j in range(n):
                _store(o, j, b32[j] + acc[j])


@compiled_loop
def apply_delta_span(base, delta, scale, out, lo, hi):  # type: ignore[no-untyped-def]
    """out[j] = cast(fma(delta[j], scale, θ_0[j])) for j in [lo, hi) (torch's add(alpha=scale), one cast)."""
    bs, ds, os_ = base[lo:hi], delta[lo:hi], out[lo:hi]
    for j in range(hi - lo):
        _store(os_, j, _fma(ds[j], scale, _widen(bs[j])))


@compiled_loop
def task_vectors_span(base, inputs, out, gram, with_gram, lo, hi):  # type: ignore[no-untyped-def]
    """out[t, j] = float32(θ_t[j]) − float32(θ_0[j]) for j in [lo, hi) (exact: one rounding), block by block;
    with ``with_gram`` each block's rows, still in cache, add their products to ``gram`` (upper triangle).
    Returns how many of the values written are NaN or ±Inf (the check a merge makes of every task vector)."""
    k = len(inputs)
    bad = 0
    for start in range(lo, hi, BLOCK):
        n = min(BLOCK, hi - start)
        bs = base[start : start + n]
        for t in range(k):
            xs = inputs[t][start : start + n]
            o = out[t][start : start + n]
            for j in range(n):
                v = _widen(xs[j]) - _widen(bs[j])
                o[j] = v
                bad += _non_finite(v)
        if with_gram:
            _gram_block(out, start, n, gram)
    return bad


@compiled_loop
def gram_span(taus, gram, lo, hi):  # type: ignore[no-untyped-def]
    """gram (float64 [K, K], upper triangle) += the float32 task vectors ``taus`` [K, N]'s products over
    columns [lo, hi), block by block."""
    for start in range(lo, hi, BLOCK):
        n = min(BLOCK, hi - start)
        _gram_block(taus, start, n, gram)


# -- exact magnitude selection (``reference.rank_boundary`` / ``select_by_threshold`` / ``topk_mask``) ---------
# |x| of a finite float32 is its bits with the sign cleared, and for those bits unsigned order is value order
# (−0 and +0 both become 0). So the r-th largest |x| of a row is found by a two-digit radix select on the bits:
# a histogram of the top 16 of the 31 magnitude bits, then one of the low 15 bits inside the bin that holds it.

#: the magnitude bits are split as 16 high (histogram 1) + 15 low (histogram 2)
LOW_BITS = 15
MAGNITUDE = np.uint32(0x7FFFFFFF)


#: interleaved copies of the high histogram: consecutive elements of a smooth distribution fall in the same few
#: bins, and one table makes each increment wait for the previous one's store
_LANES = 4
#: independent float64 accumulators of a norm's sum (one AVX-512 register; the adds then pipeline)
_SUM_LANES = 8


@compiled_loop
def high_histogram_span(rows, lo, hi, hist):  # type: ignore[no-untyped-def]
    """hist[r, b] += how many |rows[r, lo:hi]| have high digit b (hist: int64 [R, 2^16])."""
    lanes = np.zeros((_LANES, hist.shape[1]), np.int32)
    for r in range(rows.shape[0]):
        xs = rows[r][lo:hi]
        lanes[:] = 0
        n = hi - lo
        body = n - n % _LANES
        for j in range(0, body, _LANES):
            for lane in range(_LANES):
                lanes[lane, (_f32_as_u32(xs[j + lane]) & MAGNITUDE) >> np.uint32(LOW_BITS)] += 1
        for j in range(body, n):
            lanes[0, (_f32_as_u32(xs[j]) & MAGNITUDE) >> np.uint32(LOW_BITS)] += 1
        h = hist[r]
        for lane in range(_LANES):
            for b in range(hist.shape[1]):
                h[b] += lanes[lane, b]


@compiled_loop
def low_histogram_span(rows, lo, hi, bins, hist):  # type: ignore[no-untyped-def]
    """hist[i, d] += how many |rows[i // m, lo:hi]| have high digit bins[i] and low digit d, for the m = len(bins)
    // R bins asked per row, all of a row's bins in one pass (hist: int64 [len(bins), 2^15]; a bin < 0 asks
    nothing)."""
    per_row = bins.shape[0] // rows.shape[0]
    low_mask = np.uint32((1 << LOW_BITS) - 1)
    for r in range(rows.shape[0]):
        xs = rows[r][lo:hi]
        for first in range(r * per_row, (r + 1) * per_row, 2):  # two bins a pass (Breadcrumbs' two edges)
            h0 = hist[first]
            b0 = np.uint32(bins[first]) if bins[first] >= 0 else np.uint32(0xFFFFFFFF)
            two = first + 1 < (r + 1) * per_row
            h1 = hist[first + 1] if two else hist[first]
            b1 = np.uint32(bins[first + 1]) if two and bins[first + 1] >= 0 else np.uint32(0xFFFFFFFF)
            for j in range(hi - lo):
                u = _f32_as_u32(xs[j]) & MAGNITUDE
                digit = u >> np.uint32(LOW_BITS)
                if digit == b0:
                    h0[u & low_mask] += 1
                if digit == b1:
                    h1[u & low_mask] += 1


@compiled_loop
def histogram_descend(hist, row_of, wanted, digit, higher):  # type: ignore[no-untyped-def]
    """For each entry e: in histogram row ``row_of[e]`` of int64 ``hist`` [M, B], the digit holding the
    ``wanted[e]``-th largest element (1-based, counting from the top digit; the lowest digit when fewer are there)
    and how many elements lie in higher digits, walking down from the top (no cumulative array)."""
    bins = hist.shape[1]
    for e in range(row_of.shape[0]):
        h = hist[row_of[e]]
        seen = 0
        d = bins - 1
        while d > 0 and seen + h[d] < wanted[e]:
            seen += h[d]
            d -= 1
        digit[e] = d
        higher[e] = seen


@compiled_loop
def tie_cut(row, bits, quota):  # type: ignore[no-untyped-def]
    """The index of tie number ``quota`` (0-based) of the row, the first tie past the quota, or the row's length:
    elements with |x| bits == ``bits`` before it are kept. Ties are counted a block at a time (a compare and a
    sum, which vectorize) and only the block that holds the cut is searched element by element."""
    seen = 0
    n = row.shape[0]
    for start in range(0, n, BLOCK):
        xs = row[start : min(start + BLOCK, n)]
        here = 0
        for j in range(xs.shape[0]):
            here += (_f32_as_u32(xs[j]) & MAGNITUDE) == bits
        if seen + here > quota:
            for j in range(xs.shape[0]):
                if (_f32_as_u32(xs[j]) & MAGNITUDE) == bits:
                    if seen == quota:
                        return start + j
                    seen += 1
        seen += here
    return n


@compiled_loop
def band_select_span(rows, lo, hi, upper_bits, upper_cut, lower_bits, lower_cut, out):  # type: ignore[no-untyped-def]
    """out[r, j] for j in [lo, hi): selected by the upper boundary (|x| above it, or equal and before its cut) and
    not by the lower one (the same test; a lower boundary of +Inf bits and cut 0 removes nothing)."""
    for r in range(rows.shape[0]):
        xs = rows[r][lo:hi]
        o = out[r][lo:hi]
        ub, uc, lb, lc = upper_bits[r], upper_cut[r] - lo, lower_bits[r], lower_cut[r] - lo
        for j in range(hi - lo):
            u = _f32_as_u32(xs[j]) & MAGNITUDE
            o[j] = (u > ub or (u == ub and j < uc)) and not (u > lb or (u == lb and j < lc))


def _non_finite(value):  # type: ignore[no-untyped-def]
    """1 when the stored element is NaN or ±Inf (exponent bits all ones), else 0."""
    raise NotImplementedError


@overload(_non_finite)
def _non_finite_impl(value):  # type: ignore[no-untyped-def]
    if value == types.uint16:
        return lambda value: (value & np.uint16(0x7F80)) == np.uint16(0x7F80)
    if value == types.float32:
        return lambda value: (_f32_as_u32(value) & np.uint32(0x7F800000)) == np.uint32(0x7F800000)
    return None


@compiled_fast_loop
def moments_span(rows, lo, hi, out):  # type: ignore[no-untyped-def]
    """out (float64 [3, R]) += Σx, Σx², Σ|x| of each row's float32 ``rows[r, lo:hi]`` (the sums may reassociate)."""
    for r in range(rows.shape[0]):
        xs = rows[r][lo:hi]
        total = squares = magnitude = 0.0
        for j in range(hi - lo):
            v = np.float64(xs[j])
            total += v
            squares += v * v
            magnitude += abs(v)
        out[0, r] += total
        out[1, r] += squares
        out[2, r] += magnitude


@compiled_loop
def sum_l1_span(rows, weights, lo, hi):  # type: ignore[no-untyped-def]
    """(‖Σ_t rows[t]‖₁, ‖Σ_t w_t·rows[t]‖₁) over columns [lo, hi): the sums over t in float32, the norms in
    float64 (``reference.sum_l1``)."""
    plain = weighted = 0.0
    for j in range(lo, hi):
        total = np.float32(0.0)
        scaled = np.float32(0.0)
        for t in range(rows.shape[0]):
            v = rows[t, j]
            total += v
            scaled += weights[t] * v
        plain += abs(np.float64(total))
        weighted += abs(np.float64(scaled))
    return plain, weighted


@compiled_loop
def task_vector_sum_l1_span(base, inputs, weights, lo, hi):  # type: ignore[no-untyped-def]
    """``sum_l1_span`` of the task vectors θ_t − θ_0 over [lo, hi), computed from the stored tensors as
    ``task_vectors_span`` does (no [K, n] copy), and how many of them are NaN or ±Inf; block by block, the sums
    over t in float32 (t in order, as the reference), the norms' float64 sums in _SUM_LANES lanes (a statistic, like
    the Gram matrix: equal to the reference up to rounding)."""
    k = len(inputs)
    b32 = np.empty(BLOCK, np.float32)
    total = np.empty(BLOCK, np.float32)
    scaled = np.empty(BLOCK, np.float32)
    plain = np.zeros(_SUM_LANES, np.float64)
    weighted = np.zeros(_SUM_LANES, np.float64)
    bad = 0
    for start in range(lo, hi, BLOCK):
        n = min(BLOCK, hi - start)
        stored = base[start : start + n]
        for j in range(n):
            b32[j] = _widen(stored[j])
            total[j] = 0.0
            scaled[j] = 0.0
        for t in range(k):
            x = inputs[t][start : start + n]
            w = weights[t]
            for j in range(n):
                v = _widen(x[j]) - b32[j]
                bad += _non_finite(v)
                total[j] += v
                scaled[j] += w * v
        body = n - n % _SUM_LANES
        for j in range(0, body, _SUM_LANES):
            for lane in range(_SUM_LANES):
                plain[lane] += abs(np.float64(total[j + lane]))
                weighted[lane] += abs(np.float64(scaled[j + lane]))
        for j in range(body, n):
            plain[0] += abs(np.float64(total[j]))
            weighted[0] += abs(np.float64(scaled[j]))
    return plain.sum(), weighted.sum(), bad


@compiled_loop
def slerp_moments_span(v0, tau, lo, hi):  # type: ignore[no-untyped-def]
    """(Σ v0², Σ v1², Σ v0·v1) over [lo, hi) of float32 ``v0`` and ``tau``, v1 = τ + v0 in float32, the sums in
    float64 in _SUM_LANES lanes (``reference.slerp_moments`` up to rounding)."""
    aa = np.zeros(_SUM_LANES, np.float64)
    bb = np.zeros(_SUM_LANES, np.float64)
    ab = np.zeros(_SUM_LANES, np.float64)
    body = lo + (hi - lo) - (hi - lo) % _SUM_LANES
    for j in range(lo, body, _SUM_LANES):
        for lane in range(_SUM_LANES):
            a = v0[j + lane]
            b = np.float64(tau[j + lane] + a)
            a64 = np.float64(a)
            aa[lane] += a64 * a64
            bb[lane] += b * b
            ab[lane] += a64 * b
    for j in range(body, hi):
        a = v0[j]
        b = np.float64(tau[j] + a)
        a64 = np.float64(a)
        aa[0] += a64 * a64
        bb[0] += b * b
        ab[0] += a64 * b
    return aa.sum(), bb.sum(), ab.sum()


@compiled_loop
def slerp_delta_span(v0, tau, c0, c1, out, lo, hi):  # type: ignore[no-untyped-def]
    """out[j] = (c0·v0[j] + c1·(τ[j] + v0[j])) − v0[j] for j in [lo, hi), float32, each operation rounded once in
    the reference's order (``reference.slerp_delta``, bit for bit)."""
    for j in range(lo, hi):
        a = v0[j]
        out[j] = (c0 * a + c1 * (tau[j] + a)) - a


@compiled_loop
def non_finite_span(flat, lo, hi):  # type: ignore[no-untyped-def]
    """How many of ``flat[lo:hi]`` (float32, or bf16 as uint16 bits) are NaN or ±Inf."""
    xs = flat[lo:hi]
    bad = 0
    for j in range(hi - lo):
        bad += _non_finite(xs[j])
    return bad


# -- DELLA's MagPrune: ranks by magnitude, and the counter hash behind its Bernoulli draws -------------------------
#: 8-bit digits of the LSD radix sort (the top one holds the last 7 of the 31 magnitude bits)
_RANK_DIGITS = 4


@compiled_loop
def _row_ranks(x, keys, spare_keys, index, spare_index, counts, o):  # type: ignore[no-untyped-def]
    """o[j] = the position of x[j] when x is sorted by |x| ascending, ties by lower index: a stable LSD radix sort
    on the magnitude bits in the row-sized scratch arrays given. A digit every element shares is skipped."""
    n = x.shape[0]
    counts[:] = 0
    for j in range(n):
        u = _f32_as_u32(x[j]) & MAGNITUDE
        keys[j] = u
        index[j] = j
        for d in range(_RANK_DIGITS):
            counts[d, (u >> np.uint32(8 * d)) & np.uint32(255)] += 1
    src_k, src_i, dst_k, dst_i = keys, index, spare_keys, spare_index
    for d in range(_RANK_DIGITS):
        shift = np.uint32(8 * d)
        c = counts[d]
        if n == 0 or c[(src_k[0] >> shift) & np.uint32(255)] == n:
            continue
        total = 0
        for b in range(256):
            here = c[b]
            c[b] = total
            total += here
        for j in range(n):
            key = src_k[j]
            b = (key >> shift) & np.uint32(255)
            at = c[b]
            c[b] = at + 1
            dst_k[at] = key
            dst_i[at] = src_i[j]
        src_k, src_i, dst_k, dst_i = dst_k, dst_i, src_k, src_i
    for j in range(n):
        o[src_i[j]] = j


@compiled_loop
def magnitude_ranks_span(rows, lo, hi, out):  # type: ignore[no-untyped-def]
    """out[r, j] = the position of rows[r, j] when row r is sorted by |x| ascending, ties by lower index, for the
    rows [lo, hi) of float32 ``rows`` [R, n] (``reference.magnitude_ranks``, exactly)."""
    n = rows.shape[1]
    keys, spare_keys = np.empty(n, np.uint32), np.empty(n, np.uint32)
    index, spare_index = np.empty(n, np.int64), np.empty(n, np.int64)
    counts = np.empty((_RANK_DIGITS, 256), np.int64)
    for r in range(lo, hi):
        _row_ranks(rows[r], keys, spare_keys, index, spare_index, counts, out[r])


@compiled_loop
def counter_bits_span(key, lo, hi, out):  # type: ignore[no-untyped-def]
    """out[i] = h_i >> 8 for i in [lo, hi): ``reference.counter_bits24``'s stream (uint32 ``out``)."""
    for i in range(lo, hi):
        at = np.uint64(i)
        h = _mix32(_mix32(np.uint32(at & np.uint64(0xFFFFFFFF)) ^ key) ^ np.uint32(at >> np.uint64(32)))
        out[i] = h >> np.uint32(8)


@compiled_loop
def magprune_span(rows, low, spread, key, lo, hi, out):  # type: ignore[no-untyped-def]
    """``reference.magprune_mask`` for the rows [lo, hi) of float32 ``rows`` [R, n] (n ≥ 2): each row's 0-based
    magnitude positions (``_row_ranks``, into a row-sized scratch: no [R, n] array of ranks is written and read
    back), then out = rows where h_{r·n+j} >> 8 < ⌊p·2^24⌋, else +0, p = low + (ρ·2)·spread and ρ = rank/(n − 1),
    each in float32 in torch's order (low = float32(density − ε), spread = float32(ε))."""
    n = rows.shape[1]
    keys, spare_keys = np.empty(n, np.uint32), np.empty(n, np.uint32)
    index, spare_index = np.empty(n, np.int64), np.empty(n, np.int64)
    counts = np.empty((_RANK_DIGITS, 256), np.int64)
    rank = np.empty(n, np.int64)
    denominator = np.float32(n - 1)
    for r in range(lo, hi):
        x, o = rows[r], out[r]
        _row_ranks(x, keys, spare_keys, index, spare_index, counts, rank)
        for j in range(n):
            rho = min(max(np.float32(rank[j]) / denominator, np.float32(0.0)), np.float32(1.0))
            p = low + (rho * np.float32(2.0)) * spread
            threshold = np.floor(p * np.float32(16777216.0))
            at = np.uint64(r * n + j)
            h = _mix32(_mix32(np.uint32(at & np.uint64(0xFFFFFFFF)) ^ key) ^ np.uint32(at >> np.uint64(32)))
            o[j] = x[j] if np.float32(h >> np.uint32(8)) < threshold else np.float32(0.0)


# -- sparsify + consensus + aggregate (``reference.fused_sparse_merge``) ------------------------------------------
#: how ``sparse_merge_span`` gets τ̂_t from the rows: as stored, times a bool keep mask, DARE's hashed mask, the
#: magnitude band (times ``scales[t]``), or the band ternarized to ``±scales[t]`` (ComPEFT)
AS_STORED, MASKED, DARE, BAND, BAND_TERNARY = 0, 1, 2, 3, 4


@compiled_loop
def _mix32(x):  # type: ignore[no-untyped-def]
    """``reference.mix32`` on uint32 (products truncated to 32 bits, as the reference's modular arithmetic)."""
    x = x ^ (x >> np.uint32(16))
    x = np.uint32(np.uint64(x) * np.uint64(0x7FEB352D))
    x = x ^ (x >> np.uint32(15))
    x = np.uint32(np.uint64(x) * np.uint64(0x846CA68B))
    return x ^ (x >> np.uint32(16))


@compiled_loop
def sparse_merge_span(  # type: ignore[no-untyped-def]
    rows,
    masks,
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
):
    """out[j] for j in [lo, hi) and (kept, conflicts) there: per element the reference's float32 operations in its
    order. τ̂_t = rows[t] as stored, where ``masks[t]`` (MASKED), times ``scales[t]`` where DARE's 24-bit
    counter hash of (flat index, ``keys[t]``) is below ``thresholds[t]`` (DARE), or where |rows[t]| is selected by
    the band of ``band_select_span`` with edges (bits) ``edges[t]`` and ``cuts[t]`` (upper, lower), times
    ``scales[t]`` (BAND) or as sgn(rows[t])·``scales[t]`` (BAND_TERNARY); a dropped entry is +0.
    With ``consensus``: γ = +1 where fma-accumulated Σ_t w_t·τ̂_t >= 0, else −1; entry t agrees iff
    sgn(w_t·τ̂_t) == γ; out = Σ_agree w_t·τ̂_t, with ``mean`` ÷ Σ_agree w_t (equal weights: contributors·w_0; a
    zero divisor counts as 1). Without: out = Σ_t w_t·τ̂_t, with ``mean`` ÷ ``plain_divisor``. kept counts
    non-zero τ̂ entries, conflicts the entries where some non-zero τ̂_t disagrees with γ."""
    k = rows.shape[0]
    tau = np.empty((k, BLOCK), np.float32)
    summed = np.empty(BLOCK, np.float32)
    total = np.empty(BLOCK, np.float32)
    divisor = np.empty(BLOCK, np.float32)
    contributors = np.empty(BLOCK, np.int32)
    nonzero = np.empty(BLOCK, np.int32)
    equal_weights = True
    for t in range(k):
        if weights[t] != weights[0]:
            equal_weights = False
    kept = 0
    conflicts = 0
    for start in range(lo, hi, BLOCK):
        n = min(BLOCK, hi - start)
        for j in range(n):
            summed[j] = 0.0
            nonzero[j] = 0
        for t in range(k):
            x = rows[t][start : start + n]
            tt = tau[t]
            if selection == MASKED:
                keep = masks[t][start : start + n]
                for j in range(n):
                    tt[j] = x[j] if keep[j] else np.float32(0.0)
            elif selection >= BAND:  # BAND or BAND_TERNARY
                ub, lb = edges[t, 0], edges[t, 1]
                uc, lc = cuts[t, 0] - start, cuts[t, 1] - start
                s = scales[t]
                ternary = selection == BAND_TERNARY
                for j in range(n):
                    u = _f32_as_u32(x[j]) & MAGNITUDE
                    chosen = (u > ub or (u == ub and j < uc)) and not (u > lb or (u == lb and j < lc))
                    v = x[j]
                    # ternary: torch.sign(x)·s exactly; else x·s (x·1 = x when unscaled; ±0 stays a zero)
                    v = (s if v > 0.0 else -s) if ternary and v != 0.0 else v * s
                    tt[j] = v if chosen else np.float32(0.0)
            elif selection == DARE:
                key, threshold, scale = keys[t], thresholds[t], scales[t]
                for j in range(n):
                    i = np.uint64(start + j)
                    h = _mix32(
                        _mix32(np.uint32(i & np.uint64(0xFFFFFFFF)) ^ key) ^ np.uint32(i >> np.uint64(32))
                    )
                    tt[j] = x[j] * scale if (h >> np.uint32(8)) < threshold else np.float32(0.0)
            else:
                for j in range(n):
                    tt[j] = x[j]
            w = weights[t]
            for j in range(n):
                summed[j] = _fma(tt[j], w, summed[j])
                nonzero[j] += tt[j] != 0.0
        for j in range(n):
            kept += nonzero[j]
        o = out[start : start + n]
        if not consensus:
            if mean:
                for j in range(n):
                    o[j] = summed[j] / plain_divisor
            else:
                for j in range(n):
                    o[j] = summed[j]
            continue
        for j in range(n):
            total[j] = 0.0
            divisor[j] = 0.0
            contributors[j] = 0
        for t in range(k):
            w = weights[t]
            if w == 0:
                continue  # w_t·τ̂_t = 0 never agrees with γ = ±1
            tt = tau[t]
            flip = w < 0  # agreement on the weighted value: a negative weight flips the model's vote
            for j in range(n):
                v = tt[j]
                positive_vote = (v > 0.0) != flip
                agree = v != 0.0 and positive_vote == (summed[j] >= 0.0)
                total[j] = _fma(v if agree else np.float32(0.0), w, total[j])
                contributors[j] += agree
                divisor[j] = _fma(np.float32(1.0) if agree else np.float32(0.0), w, divisor[j])
        for j in range(n):
            conflicts += nonzero[j] > contributors[j]
        if mean:
            w0 = weights[0]
            for j in range(n):
                d = np.float32(contributors[j]) * w0 if equal_weights else divisor[j]
                o[j] = total[j] / (d if d != 0.0 else np.float32(1.0))
        else:
            for j in range(n):
                o[j] = total[j]
    return kept, conflicts


def warm_up(ks: tuple[int, ...] = (1, 2, 3, 4)) -> int:
    """Compile (or load) every loop for bf16 and float32 storage and ``ks`` models into numba's on-disk cache,
    so the first merges of a fresh machine (a CI run, a container's first job) don't each pay ~1–3 s a
    signature. Returns how many signatures it touched. ``python -m kernels.cpu_jit`` runs it."""
    n = 8
    stored: dict[str, np.ndarray] = {"bf16": np.zeros(n, np.uint16), "f32": np.zeros(n, np.float32)}
    f32 = stored["f32"]
    count = 0
    for x in stored.values():
        non_finite_span(x, 0, n)
        for out in stored.values():
            apply_delta_span(x, f32, np.float32(1.0), out.copy(), 0, n)
            count += 1
            for k in ks:
                inputs = tuple(x.copy() for _ in range(k))
                weights = np.ones(k, np.float32)
                task_arithmetic_span(
                    x, inputs, weights, np.float32(1.0), out.copy(), np.zeros((k, k)), True, 0, n
                )
                count += 1
        for k in ks:
            inputs = tuple(x.copy() for _ in range(k))
            task_vectors_span(x, inputs, np.zeros((k, n), np.float32), np.zeros((k, k)), True, 0, n)
            task_vector_sum_l1_span(x, inputs, np.ones(k, np.float32), 0, n)
            count += 2
    rows = np.zeros((2, n), np.float32)
    gram_span(rows, np.zeros((2, 2)), 0, n)
    moments_span(rows, 0, n, np.zeros((3, 2)))
    sum_l1_span(rows, np.ones(2, np.float32), 0, n)
    slerp_moments_span(f32, f32, 0, n)
    slerp_delta_span(f32, f32, np.float32(0.5), np.float32(0.5), f32.copy(), 0, n)
    magnitude_ranks_span(rows, 0, 2, np.zeros((2, n), np.int64))
    counter_bits_span(np.uint32(1), 0, n, np.zeros(n, np.uint32))
    magprune_span(rows, np.float32(0.4), np.float32(0.1), np.uint32(1), 0, 2, rows.copy())
    high_histogram_span(rows, 0, n, np.zeros((2, 1 << 16), np.int64))
    low_histogram_span(rows, 0, n, np.zeros(2, np.int64), np.zeros((2, 1 << LOW_BITS), np.int64))
    tie_cut(rows[0], np.uint32(0), 0)
    histogram_descend(
        np.zeros((2, 4), np.int64),
        np.zeros(2, np.int64),
        np.ones(2, np.int64),
        np.zeros(2, np.int64),
        np.zeros(2, np.int64),
    )
    pair = np.zeros((2, 2), np.uint32), np.zeros((2, 2), np.int64)
    band_select_span(
        rows,
        0,
        n,
        pair[0][:, 0].copy(),
        pair[1][:, 0].copy(),
        pair[0][:, 1].copy(),
        pair[1][:, 1].copy(),
        np.zeros((2, n), np.bool_),
    )
    sparse_merge_span(
        rows,
        np.zeros((2, 1), np.bool_),
        AS_STORED,
        np.zeros(2, np.uint32),
        np.zeros(2, np.uint32),
        np.ones(2, np.float32),
        pair[0],
        pair[1],
        np.ones(2, np.float32),
        True,
        True,
        np.float32(2.0),
        np.zeros(n, np.float32),
        0,
        n,
    )
    return count + 16


if __name__ == "__main__":
    import time

    from kernels import cpu_jit  # the module as merges import it (numba keys its cache by module)

    started = time.perf_counter()
    touched = cpu_jit.warm_up()
    print(
        f"kernels.cpu_jit: {touched} signatures compiled or loaded in {time.perf_counter() - started:.1f} s"
    )
