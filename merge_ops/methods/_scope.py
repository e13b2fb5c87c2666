"""Scope views: how a task-vector stack ``[K, *S]`` is cut into independent statistic units.

Every sparsifier works on a 2-D view ``[R, n]`` whose rows are scope units, plus ``model_of_row[R]`` (which of the
K models a row belongs to, for per-model densities, DARE keys and global statistics):

- ``per_tensor``: ``[K, n]``, one unit per model and tensor (mergekit-compatible);
- ``per_row``: rows are the first dimension, the tensor viewed as ``[rows, -1]``, so ``[K·rows, n/rows]``;
  1-D and 0-D tensors have a single row and fall back to ``per_tensor``;
- ``global``: ``[K, n]`` too, but thresholds/σ come from ``ctx.global_stats`` (a first streaming pass over every
  tensor), not from this tensor alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from merge_ops.params import Scope


@dataclass(frozen=True)
class ScopeView:
    rows: torch.Tensor  # [R, n] float32 view of the stack (no copy for contiguous input)
    model_of_row: torch.Tensor  # [R] int64
    shape: torch.Size  # the original [K, *S]

    @property
    def n(self) -> int:
        return self.rows.shape[1]

    def restore(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.reshape(self.shape)


def scope_view(task_vectors: torch.Tensor, scope: Scope) -> ScopeView:
    k = task_vectors.shape[0]
    inner = task_vectors.shape[1:]
    if scope == Scope.per_row and len(inner) >= 2:
        rows = task_vectors.reshape(k * inner[0], -1)
        model_of_row = torch.arange(k, device=task_vectors.device).repeat_interleave(inner[0])
    else:
        rows = task_vectors.reshape(k, -1)
        model_of_row = torch.arange(k, device=task_vectors.device)
    return ScopeView(rows, model_of_row, task_vectors.shape)


def kept_count(density: torch.Tensor, n: int) -> torch.Tensor:
    """The spec's top-k count: ⌊density·n⌋, at least 1 when density > 0 and n > 0 (float64 product, so a density
    like 0.2 of n = 1000 gives exactly 200)."""
    count = torch.floor(density.to(torch.float64) * n).to(torch.int64)
    return count.clamp(min=1 if n > 0 else 0, max=n)


def floor_count(fraction: torch.Tensor, n: int) -> torch.Tensor:
    """⌊fraction·n⌋ with no minimum (Breadcrumbs' removed top: 0 removes nothing)."""
    return torch.floor(fraction.to(torch.float64) * n).to(torch.int64).clamp(0, n)
