"""SCE: Select, Calculate, Erase (FuseChat 2, Wan et al., 2024, https://arxiv.org/abs/2408.07990; mergekit ``sce``).

    Select (select_topk < 1):  v_i = Var_t(τ_t,i) (population variance over the models);  keep the
        ⌊select_topk·#{i: v_i ≠ 0}⌋ entries of largest v (ties by lower index) in every τ_t, zero the rest
        (select_topk ≤ 0 keeps nothing; ≥ 1, the default, keeps everything)
    Calculate:  η_t = mean_i τ_t,i² / Σ_s mean_i τ_s,i²   (Σ < 1e-6: η_t = 1/K)
    Erase:      γ = sgn(Σ_t τ_t) (zero -> +1);  A_i = {t : sgn(τ_t,i) = γ_i}
    τ = Σ_{t∈A} η_t τ_t / max(Σ_{t∈A} η_t, 1e-6)

All statistics are per tensor. As in mergekit, the models' weights are not used (η replaces them) and the
sign vote is unweighted. float32.
"""

from __future__ import annotations

import torch

from merge_ops.params import SceParams
from merge_ops.registry import TensorContext, register_method


def select_mask(task_vectors: torch.Tensor, *, fraction: float) -> torch.Tensor:
    """The Select step's keep mask over the tensor's entries (float32 [*S])."""
    shape = task_vectors.shape[1:]
    if fraction <= 0:
        return torch.zeros(shape, device=task_vectors.device)
    if fraction >= 1:
        return torch.ones(shape, device=task_vectors.device)
    var = torch.var(task_vectors, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * fraction)  # in float32, as mergekit computes it
    mask = torch.zeros(var.numel(), device=var.device)
    if k:
        order = torch.argsort(var.abs().reshape(-1), descending=True, stable=True)
        mask[order[:k]] = 1
    return mask.reshape(shape)


def energy_weights(task_vectors: torch.Tensor) -> torch.Tensor:
    """η_t: each model's mean square over the tensor, normalised to sum 1 (uniform when all are ~0)."""
    energy = task_vectors.square().reshape(task_vectors.shape[0], -1).mean(dim=1)
    total = float(energy.sum())
    if abs(total) < 1e-6:
        return torch.full_like(energy, 1.0 / energy.shape[0])
    return energy / total


@register_method("sce")
def merge_sce(task_vectors: torch.Tensor, ctx: TensorContext, params: SceParams) -> torch.Tensor:
    tv = task_vectors.float()
    if params.select_topk < 1:
        tv = tv * select_mask(tv, fraction=float(params.select_topk)).unsqueeze(0)
    elected = torch.where(tv.sum(dim=0) >= 0, 1.0, -1.0)
    agree = (torch.sign(tv) == elected).to(torch.float32)
    eta = energy_weights(tv).reshape(-1, *([1] * (tv.dim() - 1)))
    erased = eta * agree
    merged = (tv * erased).sum(dim=0) / erased.sum(dim=0).clamp(min=1e-6)
    if tv.numel():
        ctx.report["kept_density"] = float(torch.count_nonzero(tv * agree)) / tv.numel()
    return merged
