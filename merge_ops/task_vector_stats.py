"""Task-vector norms and pairwise cosines for the job report, collected while the merge streams.

Per merged tensor, one [K, K] Gram matrix G = T·Tᵀ of the float32 task vectors T [K, N] (the vectors the merge
itself builds: θ_t − θ_0, or θ_t for the methods that average full weights): its diagonal's square roots are the
norms ‖τ_t‖ and G_ij / (‖τ_i‖‖τ_j‖) the cosines. Gram matrices add over tensors, so a layer's (or the whole
model's) cosine is the exact cosine of the concatenated task vectors, not a mean of per-tensor cosines.

The Gram matrix is computed where the task vectors already are (``TensorMerger.merge``): inside the fused
task-arithmetic pass, block by block while each block's deltas are in cache (``kernels.fused_task_arithmetic``'s
``gram``), or from the method's own [K, *S] float32 task vectors before the method runs
(``kernels.task_vector_gram``): no second read of the inputs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

#: the per-tensor row key of the Gram matrix (a K×K list of floats)
GRAM_KEY = "task_vector_gram"


def summarize(gram: list[list[float]] | torch.Tensor) -> dict[str, Any]:
    """Norms [K] and cosines [K][K] of one Gram matrix; a cosine with a zero task vector is None."""
    g = torch.as_tensor(gram, dtype=torch.float64)
    norms = g.diagonal().clamp_min(0).sqrt().tolist()
    k = len(norms)
    cosine: list[list[float | None]] = [
        [
            _round(float(g[i, j]) / (norms[i] * norms[j])) if norms[i] > 0 and norms[j] > 0 else None
            for j in range(k)
        ]
        for i in range(k)
    ]
    return {"norms": [_round(n) for n in norms], "cosine": cosine}


def aggregate(rows: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    """The report's ``totals.task_vectors``: the whole model's norms and cosines, and the same per layer (each
    from the sum of the Gram matrices of its tensors). None when no row carries a Gram matrix."""
    total: torch.Tensor | None = None
    layers: dict[int, torch.Tensor] = {}
    for row in rows:
        if GRAM_KEY not in row:
            continue
        g = torch.as_tensor(row[GRAM_KEY], dtype=torch.float64)
        total = g.clone() if total is None else total + g
        if isinstance(row.get("layer"), int):
            layers[row["layer"]] = layers[row["layer"]] + g if row["layer"] in layers else g.clone()
    if total is None:
        return None
    return {
        **summarize(total),
        "layers": [{"layer": layer, **summarize(layers[layer])} for layer in sorted(layers)],
    }


def _round(value: float) -> float:
    """Seven significant digits: the float32 task vectors' own precision, and a readable report."""
    return float(f"{value:.7g}") if math.isfinite(value) else value
