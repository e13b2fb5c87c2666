"""First streaming pass for ``scope=global``: per-model statistics over every merged tensor, memory bounded.

The paper versions of TIES and ComPEFT rank (and take σ over) a whole model as one vector. Alloy never builds
that vector: ``compute_global_stats`` iterates the tensors (``batches()`` yields ``(name, τ[K, *S])``) once per
radix digit and keeps only O(K·2^digit bits) counters plus a few floats per model:

1. element count N, float64 Στ, Στ², Σ|τ| (σ is the unbiased std of the uncompressed τ), the DARE-masked Σ|τ|
   (for ``rescale=l1``), and a histogram of the top digit of each |τ| bit pattern;
2. a histogram of the next digit inside the chosen bucket, and so on; the last digit's histogram per tensor.

The digits are ``kernels.radix_passes``: 16 + 15 bits (two passes) on the compiled CPU loops, 11 + 11 + 9 bits
(three passes, what a GPU's on-chip histogram holds) elsewhere; both select the same elements. That is an exact
MSB-first radix select of the k-th largest magnitude (non-negative float32 bit patterns are monotonic in the
value). The last pass also counts, per tensor, the elements equal to the threshold, so ties are
taken by lowest flat index in iteration order (tensor by tensor, row-major within a tensor): the tensor's
``tie_quota``. Methods then select with ``GlobalStats.selection_mask`` (|τ| > threshold, plus the tensor's quota
of ties) and read ``sigma``/``l1``.

Density, top_removed and the sparsifier come from the recipe's top-level params: under ``scope=global`` they are
one choice per model for the whole model (per-tensor overrides of them do not re-rank globally).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kernels import dare_keep_mask, magnitude_histogram, radix_passes, row_moments, select_by_threshold
from kernels.reference import INF_BITS
from merge_ops.methods._scope import floor_count, kept_count
from merge_ops.params import Sparsify

Batches = Callable[[], Iterable[tuple[str, torch.Tensor]]]
#: the digits of one radix select, each (prefix_shift, digit_shift, digit_bits) of |x| (bit 31 is always 0)
RadixPasses = tuple[tuple[int, int, int], ...]


@dataclass(frozen=True)
class RankCut:
    """The first ``rank[k]`` elements of model k in the global order (|τ| desc, iteration order asc)."""

    rank: tuple[int, ...]
    threshold: tuple[float, ...]
    #: tensor name -> per-model number of elements equal to the threshold that are inside the cut
    tie_quota: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def mask(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        return select_by_threshold(rows, *self.boundary(name, device=rows.device))

    def boundary(self, name: str, *, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Tensor ``name``'s per-model (threshold, tie_quota), as ``kernels.rank_boundary`` describes a cut."""
        threshold = torch.tensor(self.threshold, dtype=torch.float32, device=device)
        quota = self.tie_quota.get(name, (0,) * len(self.threshold))
        return threshold, torch.tensor(quota, dtype=torch.int64, device=device)


@dataclass(frozen=True)
class GlobalStats:
    numel: int
    #: per model: unbiased std of the uncompressed τ over all tensors (0 when numel < 2)
    sigma: tuple[float, ...]
    #: per model: Σ|τ| over all tensors
    l1: tuple[float, ...]
    #: per model: Σ|mask_dare·τ| (only for sparsify=dare with rescale=l1)
    dare_kept_l1: tuple[float, ...] | None = None
    #: elements with global rank < upper.rank are candidates (top-k, or top_removed + density for Breadcrumbs)
    upper: RankCut | None = None
    #: Breadcrumbs: elements with global rank < lower.rank are the removed outliers
    lower: RankCut | None = None

    def boundaries(self, name: str, *, device: torch.device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The ``boundary`` / ``lower_boundary`` arguments of ``kernels.fused_sparse_merge`` for tensor ``name``
        (none: everything is a candidate)."""
        if self.upper is None:
            return {}
        cut = {"boundary": self.upper.boundary(name, device=device)}
        if self.lower is not None and any(self.lower.rank):
            cut["lower_boundary"] = self.lower.boundary(name, device=device)
        return cut

    def selection_mask(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """Bool [K, n] mask of tensor ``name`` (rows = its K task vectors flattened) inside the global band."""
        if self.upper is None:
            return torch.ones_like(rows, dtype=torch.bool)
        mask = self.upper.mask(name, rows)
        if self.lower is not None and any(self.lower.rank):
            mask &= ~self.lower.mask(name, rows)
        return mask


def compute_global_stats(
    batches: Batches,
    *,
    params: Any,
    densities: Sequence[float] | None = None,
    seed: int = 0,
    source_indices: Sequence[int] | None = None,
) -> GlobalStats:
    """Stream ``batches()`` (once per radix digit, and again per further digit for Breadcrumbs' lower cut; the same
    order each time) and return the per-model statistics the sparsifier in ``params`` needs under ``scope=global``."""
    sparsify = Sparsify(getattr(params, "sparsify", Sparsify.none))
    needs_rank = sparsify in (Sparsify.magnitude, Sparsify.compeft, Sparsify.breadcrumbs)
    dare_l1 = sparsify == Sparsify.dare and getattr(params, "rescale", "inverse") == "l1"

    numel = 0
    # rows of totals: Στ, Στ², Σ|τ|, Σ|DARE-kept τ| (float64, per model)
    totals: torch.Tensor | None = None
    top_hist: torch.Tensor | None = None
    passes: RadixPasses = ()
    for name, tv in batches():
        flat = tv.reshape(tv.shape[0], -1)
        k = flat.shape[0]
        if totals is None or top_hist is None:
            passes = radix_passes(tv)
            totals = torch.zeros(4, k, dtype=torch.float64)
            top_hist = torch.zeros(k, 1 << passes[0][2], dtype=torch.int64, device=tv.device)
        numel += flat.shape[1]
        totals[:3] += row_moments(flat).cpu()
        if dare_l1:
            for i in range(k):
                keep = dare_keep_mask(
                    tv.shape[1:],
                    density=_density(params, densities, i),
                    seed=seed,
                    source_index=_source(source_indices, i),
                    name=name,
                    device=tv.device,
                )
                totals[3, i] += flat[i].abs()[keep.reshape(-1)].sum(dtype=torch.float64).cpu()
        if needs_rank:
            _histogram(tv, torch.zeros(k, dtype=torch.int64), passes[0], out=top_hist)
    if totals is None or top_hist is None:
        return GlobalStats(numel=0, sigma=(), l1=())
    k = totals.shape[1]
    sums, sq_sums, abs_sums, kept_abs = totals

    sigma = tuple(_unbiased_std(s, q, numel) for s, q in zip(sums.tolist(), sq_sums.tolist(), strict=True))
    stats: dict[str, Any] = {"numel": numel, "sigma": sigma, "l1": tuple(abs_sums.tolist())}
    if dare_l1:
        stats["dare_kept_l1"] = tuple(kept_abs.tolist())
    if needs_rank:
        density = torch.tensor([_density(params, densities, i) for i in range(k)], dtype=torch.float64)
        keep = kept_count(density, numel)
        if sparsify == Sparsify.breadcrumbs:
            skip = floor_count(torch.full((k,), float(params.top_removed), dtype=torch.float64), numel)
            upper_rank = (skip + keep).clamp(max=numel)
            stats["lower"] = (
                _radix_select(batches, skip.tolist(), top_hist, passes) if bool((skip > 0).any()) else None
            )
        else:
            upper_rank = keep
        stats["upper"] = _radix_select(batches, upper_rank.tolist(), top_hist, passes)
    return GlobalStats(**stats)


def _density(params: Any, densities: Sequence[float] | None, i: int) -> float:
    return float(densities[i]) if densities is not None else float(params.density)


def _source(source_indices: Sequence[int] | None, i: int) -> int:
    return int(source_indices[i]) if source_indices is not None else i


def _unbiased_std(total: float, total_sq: float, n: int) -> float:
    if n < 2:
        return 0.0
    variance = (total_sq - total * total / n) / (n - 1)
    return max(variance, 0.0) ** 0.5


def _histogram(
    tv: torch.Tensor, prefix: torch.Tensor, radix_pass: tuple[int, int, int], out: torch.Tensor
) -> None:
    """Add ``tv``'s counts for ``radix_pass`` into ``out`` (one histogram for the pass: torch adding a new one per
    tensor into it took 249 of the 2144 py-spy samples of ComPEFT's global passes)."""
    prefix_shift, digit_shift, digit_bits = radix_pass
    rows = tv.reshape(tv.shape[0], -1)
    magnitude_histogram(
        rows,
        prefix=prefix.to(tv.device),
        prefix_shift=prefix_shift,
        digit_shift=digit_shift,
        digit_bits=digit_bits,
        out=out,
    )


def _zero(t: torch.Tensor) -> None:
    # numpy on the CPU, as in ``_add``: a torch op on a histogram this size enters an OpenMP parallel region
    if t.device.type == "cpu":
        t.numpy().fill(0)
    else:
        t.zero_()


def _add(total: torch.Tensor, part: torch.Tensor) -> None:
    if total.device.type == "cpu":
        np.add(total.numpy(), part.numpy(), out=total.numpy())
    else:
        total += part


def _descend(hist: torch.Tensor, remaining: list[int]) -> tuple[list[int], list[int]]:
    """Per model, the bucket holding the ``remaining``-th largest element (counting from the top bucket), and
    how many elements lie in higher buckets."""
    buckets, above = [], []
    for row, r in zip(hist.tolist(), remaining, strict=True):
        seen = 0
        for bucket in range(len(row) - 1, -1, -1):
            if seen + row[bucket] >= r:
                break
            seen += row[bucket]
        buckets.append(bucket)
        above.append(seen)
    return buckets, above


def _radix_select(batches: Batches, ranks: list[int], top_hist: torch.Tensor, passes: RadixPasses) -> RankCut:
    """Exact threshold and per-tensor tie quotas of the first ``ranks[k]`` elements of each model."""
    k = len(ranks)
    active = [r > 0 for r in ranks]
    remaining = [max(r, 1) for r in ranks]
    prefix = [0] * k
    hist = top_hist
    # last pass: per tensor, its non-zero cells as arrays of (model, digit, count) (sparse: few tensors hit the
    # bucket; arrays, since building a Python dict of them per tensor showed in py-spy: ComPEFT's global pass
    # went from 2.99 s to 2.80–2.93 s without it)
    per_tensor_ties: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = []
    for step, radix_pass in enumerate(passes):
        buckets, above = _descend(hist, remaining)
        digit_bits = radix_pass[2]
        for i in range(k):
            prefix[i] = (prefix[i] << digit_bits) | buckets[i]
            remaining[i] -= above[i]
        if step + 1 == len(passes):
            break
        next_pass = passes[step + 1]
        device = top_hist.device
        prefix_tensor = torch.tensor(prefix, dtype=torch.int64, device=device)
        hist = torch.zeros(k, 1 << next_pass[2], dtype=torch.int64, device=device)
        last = step + 2 == len(passes)
        # the last pass keeps each tensor's counts (for its tie quota): one histogram reused tensor by tensor
        counts = torch.zeros_like(hist) if last else hist
        for name, tv in batches():
            if not last:
                _histogram(tv, prefix_tensor, next_pass, out=hist)
                continue
            _zero(counts)
            _histogram(tv, prefix_tensor, next_pass, out=counts)
            _add(hist, counts)
            host = counts.cpu().numpy()
            models, digits = np.nonzero(host)
            if models.size:
                per_tensor_ties.append((name, models, digits, host[models, digits]))
    # prefix now holds the full 31-bit pattern of the threshold; remaining = ties taken from the threshold value
    threshold_bits = [p if a else INF_BITS for p, a in zip(prefix, active, strict=True)]
    threshold = torch.tensor(threshold_bits, dtype=torch.int32).view(torch.float32).tolist()
    tie_quota: dict[str, tuple[int, ...]] = {}
    left = [r if a else 0 for r, a in zip(remaining, active, strict=True)]
    final_digit = [p & ((1 << passes[-1][2]) - 1) for p in prefix]
    for name, models, digits, values in per_tensor_ties:
        at_threshold = digits == np.asarray(final_digit)[models]
        ties = (
            np.bincount(models[at_threshold], weights=values[at_threshold], minlength=k)
            .astype(np.int64)
            .tolist()
        )
        take = [min(t, q) for t, q in zip(ties, left, strict=True)]
        if any(take):
            tie_quota[name] = tuple(take)
            left = [q - t for q, t in zip(left, take, strict=True)]
    return RankCut(rank=tuple(ranks), threshold=tuple(threshold), tie_quota=tie_quota)
