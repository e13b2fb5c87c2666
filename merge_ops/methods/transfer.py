"""Fine-tuning transfer (Lin et al., EMNLP 2025, https://arxiv.org/abs/2503.20110).

    θ'_target = θ_target + λ·(θ_source_ft − θ_source_base)

The pipeline computes the single diff in float64, casts it to float32 and passes it as ``task_vectors[0]``; the
method returns it unchanged and the pipeline applies λ (default 1). No statistics, no scope.
"""

from __future__ import annotations

import torch

from merge_ops.params import TransferParams
from merge_ops.registry import TensorContext, register_method


@register_method("transfer")
def merge_transfer(task_vectors: torch.Tensor, ctx: TensorContext, params: TransferParams) -> torch.Tensor:
    if task_vectors.shape[0] != 1:
        raise ValueError(f"transfer takes exactly one diff, got {task_vectors.shape[0]}")
    return task_vectors[0].float().clone()
