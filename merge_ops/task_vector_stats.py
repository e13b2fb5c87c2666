"""Task-vector norms and pairwise cosines for the job report, collected while the merge streams.

Per merged tensor, one [K, K] Gram matrix G = T·Tᵀ of the float32 task vectors T [K, N] (the vectors the merge
itself builds: θ_t − θ_0, or θ_t for the methods that average full weights): its diagonal's square roots are the
norms ‖τ_t‖ and G_ij / (‖τ_i‖‖τ_j‖) the cosines. Gram matrices add over tensors, so a layer's (or the whole
model's) cosine is the exact cosine of the concatenated task vectors, not a mean of per-tensor cosines.

Cost: one extra read of the K+1 inputs of a tensor in chunks of ``CHUNK`` elements (float32, bounded memory: the
fused path never holds [K, *S]), and K²·N multiply-adds; sources that carry their own delta (LoRA, task-vector
files, transfer, vocabulary alignment) rebuild the task vectors with ``TensorMerger.task_vectors``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

import torch

if TYPE_CHECKING:
    from merge_ops.preflight import TensorPlan
    from merge_ops.tensor_merge import Loaded, TensorMerger

#: elements per chunk of the float32 task vectors (512 KiB per model: the chunk stays in cache)
CHUNK = 1 << 17
#: the per-tensor row key of the Gram matrix (a K×K list of floats)
GRAM_KEY = "task_vector_gram"

MergeFn = TypeVar("MergeFn", bound=Callable[..., tuple[torch.Tensor, dict[str, Any]]])


def task_vector_gram(merger: TensorMerger, loaded: Loaded, tp: TensorPlan) -> torch.Tensor:
    """G [K, K] float64 of one merged tensor's task vectors, as ``merger.task_vectors`` would build them."""
    k, inputs = merger.k, loaded.inputs
    gram = torch.zeros((k, k), dtype=torch.float64, device=loaded.base.device)
    if inputs is None or any(raw is None for raw in inputs):
        taus = merger.task_vectors(loaded, tp).reshape(k, -1)
        for start in range(0, taus.shape[1], CHUNK):
            part = taus[:, start : start + CHUNK]
            gram += (part @ part.T).double()
        return gram
    base = loaded.base.reshape(-1)
    raws = [raw.reshape(-1) for raw in inputs if raw is not None]
    n, width = base.numel(), min(CHUNK, base.numel())
    # two reused float32 buffers (a chunk stays in cache): convert by copy, then subtract in place (faster on CPU
    # than a mixed-dtype torch.sub with out=)
    taus = torch.empty((k, width), dtype=torch.float32, device=base.device)
    reference = torch.zeros(width, dtype=torch.float32, device=base.device)
    for start in range(0, n, width):
        end = min(n, start + width)
        part, ref = taus[:, : end - start], reference[: end - start]
        if not merger.zero_reference:
            ref.copy_(base[start:end])
        for i, raw in enumerate(raws):
            part[i].copy_(raw[start:end])
        part.sub_(ref)
        # float32 products per chunk (the task vectors' own precision), summed in float64 across chunks
        gram += (part @ part.T).double()
    return gram


def with_task_vector_stats(merge: MergeFn) -> MergeFn:
    """Wraps ``TensorMerger.merge``: its statistics gain the tensor's Gram matrix (``GRAM_KEY``). Runs after the
    merge, so the method's own [K, *S] task vectors are freed first (no higher peak)."""

    @functools.wraps(merge)
    def merged(
        merger: TensorMerger, loaded: Loaded, tp: TensorPlan, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        out, stats = merge(merger, loaded, tp, *args, **kwargs)
        gram = task_vector_gram(merger, loaded, tp)
        return out, {**stats, GRAM_KEY: gram.cpu().tolist()}

    return merged  # type: ignore[return-value]


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
