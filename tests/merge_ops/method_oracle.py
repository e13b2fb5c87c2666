"""Float64 oracles written from the spec's formulas (spec/methods.md), independent of merge_ops' code paths:
plain sorting for top-k, explicit loops for consensus. Used by the method, property and global-scope tests."""

from __future__ import annotations

import math

import torch

from kernels import dare_keep_mask


def ranked(row: torch.Tensor) -> list[int]:
    """Indices of a flat float64 row in the spec's order: |x| descending, ties by lowest index."""
    values = row.tolist()
    return sorted(range(len(values)), key=lambda i: (-abs(values[i]), i))


def band(row: torch.Tensor, *, keep: int, skip: int = 0) -> torch.Tensor:
    mask = torch.zeros(row.numel(), dtype=torch.bool)
    mask[ranked(row)[skip : skip + keep]] = True
    return mask


def kept(density: float, n: int) -> int:
    return min(n, max(1, math.floor(density * n))) if n > 0 else 0


def units(tv: torch.Tensor, scope: str) -> torch.Tensor:
    """[K, *S] -> [K, U, m] scope units (per_row: first dim; 0-D/1-D tensors: one unit)."""
    k = tv.shape[0]
    if scope == "per_row" and tv.dim() >= 3:
        return tv.reshape(k, tv.shape[1], -1)
    return tv.reshape(k, 1, -1)


def sparsify(
    tv: torch.Tensor,
    *,
    kind: str,
    densities: list[float],
    top_removed: float = 0.0,
    alpha: float = 1.0,
    rescale: str = "inverse",
    scope: str = "per_tensor",
    name: str = "t",
    seed: int = 0,
    sources: list[int] | None = None,
) -> torch.Tensor:
    tv = tv.double()
    out = torch.zeros_like(tv)
    sources = sources or list(range(tv.shape[0]))
    if kind == "none":
        return tv.clone()
    if kind == "dare":
        for t in range(tv.shape[0]):
            if densities[t] >= 1:
                out[t] = tv[t]
                continue
            mask = dare_keep_mask(
                tv.shape[1:], density=densities[t], seed=seed, source_index=sources[t], name=name
            )
            masked = tv[t] * mask
            if rescale == "inverse":
                masked = masked / densities[t]
            elif rescale == "l1":
                unit_o, unit_m = units(tv[t : t + 1], scope)[0], units(masked.unsqueeze(0), scope)[0]
                for u in range(unit_o.shape[0]):
                    before, after = unit_o[u].abs().sum().item(), unit_m[u].abs().sum().item()
                    if before >= 1e-7 and after >= 1e-7:
                        unit_m[u] *= before / after
                masked = unit_m.reshape(masked.shape)
            out[t] = masked
        return out
    if tv.dim() == 1 and kind in ("breadcrumbs", "compeft"):
        return tv.clone()  # 0-dim tensors pass unchanged
    view = units(tv, scope)
    result = torch.zeros_like(view)
    for t in range(view.shape[0]):
        for u in range(view.shape[1]):
            row = view[t, u]
            n = row.numel()
            if kind == "breadcrumbs":
                skip = math.floor(top_removed * n)
                mask = band(row, keep=min(kept(densities[t], n), n - skip), skip=skip)
                result[t, u] = row * mask
            elif kind == "magnitude":
                result[t, u] = row * band(row, keep=kept(densities[t], n))
            elif kind == "compeft":
                if n < 2:
                    result[t, u] = row
                    continue
                mean = row.mean().item()
                sigma = math.sqrt(sum((v - mean) ** 2 for v in row.tolist()) / (n - 1))
                mask = band(row, keep=kept(densities[t], n))
                result[t, u] = alpha * sigma * torch.sign(row) * mask
    return result.reshape(tv.shape)


def aggregate(sparse: torch.Tensor, weights: list[float], *, consensus: str, mean: bool) -> torch.Tensor:
    k = sparse.shape[0]
    flat = sparse.double().reshape(k, -1)
    out = torch.zeros(flat.shape[1], dtype=torch.float64)
    for j in range(flat.shape[1]):
        weighted = [weights[t] * flat[t, j].item() for t in range(k)]
        if consensus == "ties_sign":
            gamma = 1.0 if sum(weighted) >= 0 else -1.0
            chosen = [t for t in range(k) if weighted[t] != 0 and math.copysign(1.0, weighted[t]) == gamma]
            divisor = sum(weights[t] for t in chosen)
            divisor = divisor if divisor != 0 else 1.0
        else:
            chosen = list(range(k))
            divisor = sum(weights)
            divisor = divisor if abs(divisor) >= 1e-8 else 1.0
        total = sum(weighted[t] for t in chosen)
        out[j] = total / divisor if mean else total
    return out.reshape(sparse.shape[1:])


def model_stock(tv: torch.Tensor, *, filter_wise: bool) -> torch.Tensor:
    tv = tv.double()
    n = tv.shape[0]
    rows = tv.reshape(n, tv.shape[1], -1) if filter_wise and tv.dim() >= 3 else tv.reshape(n, 1, -1)
    mean = rows.mean(dim=0)
    out = torch.zeros_like(mean)
    for r in range(rows.shape[1]):
        cosines = []
        for i in range(n):
            for j in range(i + 1, n):
                a, b = rows[i, r], rows[j, r]
                cosines.append((a @ b).item() / max(a.norm().item() * b.norm().item(), 1e-6))
        cos = min(max(sum(cosines) / len(cosines), 0.0), 1.0)
        t = n * cos / (1 + (n - 1) * cos)
        out[r] = t * mean[r]
    return out.reshape(tv.shape[1:])
