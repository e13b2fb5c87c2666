"""RAM and RAM+ (tensor-local): Reinforced Agent Merging (https://arxiv.org/abs/2601.13572; mergekit ``ram``,
``ramplus_tl``).

    changed c_t,i = |τ_t,i| > epsilon;  n_i = Σ_t c_t,i (how many models change entry i)
    ram:         τ_i = Σ_t c_t,i·τ_t,i / max(n_i, 1)
                 (entries one model changes keep that change; shared ones are averaged over the changers)
    ramplus_tl:  ρ_t = #{i: c_t,i, n_i > 1} / max(#{i: c_t,i, n_i = 1}, epsilon)   (per model, this tensor)
                 λ_t = 1 + r·clamp(ρ_t, 0, alpha)
                 τ_i = Σ_t c_t,i·τ_t,i·(λ_t if n_i = 1 else 1/n_i)

Defaults: epsilon 1e-5, r 0.1, alpha 0.2 (mergekit's). The models' weights are not used (as in mergekit);
statistics are per tensor. float32.
"""

from __future__ import annotations

import torch

from merge_ops.params import RamParams, RamplusTlParams
from merge_ops.registry import TensorContext, register_method


def _changes(task_vectors: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(τ with unchanged entries zeroed [K, n], changed mask [K, n], contributor count [n])."""
    flat = task_vectors.float().reshape(task_vectors.shape[0], -1)
    changed = flat.abs() > epsilon
    return flat * changed, changed, changed.sum(dim=0)


@register_method("ram")
def merge_ram(task_vectors: torch.Tensor, ctx: TensorContext, params: RamParams) -> torch.Tensor:
    kept, _, counts = _changes(task_vectors, float(params.epsilon))
    merged = (kept / counts.clamp(min=1)).sum(dim=0)
    if counts.numel():
        ctx.report["ram_overlap_rate"] = float((counts > 1).float().mean())
    return merged.reshape(task_vectors.shape[1:])


@register_method("ramplus_tl")
def merge_ramplus_tl(task_vectors: torch.Tensor, ctx: TensorContext, params: RamplusTlParams) -> torch.Tensor:
    epsilon = float(params.epsilon)
    kept, changed, counts = _changes(task_vectors, epsilon)
    unique, overlap = counts == 1, counts > 1
    shared_counts = (changed & overlap).sum(dim=1)
    unique_counts = (changed & unique).sum(dim=1)
    rho = shared_counts / unique_counts.clamp(min=epsilon)
    boost = 1 + float(params.r) * rho.clamp(min=0, max=float(params.alpha))
    merged = (kept * unique * boost.unsqueeze(-1) + kept * overlap / counts.clamp(min=1)).sum(dim=0)
    if counts.numel():
        ctx.report["ram_overlap_rate"] = float(overlap.float().mean())
    return merged.reshape(task_vectors.shape[1:])
