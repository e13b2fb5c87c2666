"""DELLA-Merging (Deep, Bhardwaj et al., 2024, https://arxiv.org/abs/2406.11617), as mergekit 0.1.5 computes it.

MagPrune, per task vector τ_t, ranked along dim 1 (1-D tensors: the whole tensor; 0-dim: one element):

    r_i = rank of |τ_i| in its row, 1 = smallest (ties by lower index);  ρ_i = (r_i − 1)/(n − 1)
    p_i = (density − ε) + 2ε·ρ_i                  keep probability: larger magnitudes are kept more often
    m_i ~ Bernoulli(p_i);  τ̂ = m ⊙ τ · ‖τ‖₁/‖m ⊙ τ‖₁   (``rescale``; skipped when either norm is < 1e-7)

then the GTA stages: ``della``: sign election γ = sgn(Σ w_t τ̂_t) (zero -> +1) and the disjoint mean over the
agreeing models (``normalize``, default true); ``della_linear``: Σ_t w_t τ̂_t (``normalize`` false by default, true
divides by Σ w_t). λ (``lambda``, default 1) is applied by the pipeline. Defaults as mergekit: density 1 (no
pruning: the result is then TIES without trimming, or task arithmetic), ε 0.15; when density < 1,
density ± ε must lie inside (0, 1) (recipe-wide and per-model values: ``density``, ``epsilon`` and ``weight``
may be set per model).

Intended differences from mergekit: (1) the mask comes from Alloy's counter-based generator keyed like DARE's
(job seed, source index, tensor name), not from torch's global RNG: reproducible on every device and worker,
so the masks (not their statistics) differ from mergekit's; keep iff h_i < ⌊p_i·2^24⌋. (2) The rescale matches
the L1 norm as mergekit does (the paper divides by p_i). (3) Rows of one element (0-dim tensors, [n, 1]
tensors) have no rank spread: Alloy keeps them with probability ``density``; mergekit fails on them.
"""

from __future__ import annotations

import torch

from kernels import fused_sparse_merge, magprune_mask
from kernels.reference import dare_key
from merge_ops.errors import RecipeError
from merge_ops.methods._points import per_model_densities, per_model_values
from merge_ops.params import DellaParams, check_della_window
from merge_ops.registry import TensorContext, register_method

_L1_EPS = 1e-7  # mergekit rescaled_masked_tensor


def magprune(
    tau: torch.Tensor,
    *,
    density: float,
    epsilon: float,
    rescale: bool,
    key: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One task vector through MagPrune (see the module docstring), into ``out`` when given (``tau`` itself may be
    it: τ is read whole before ``out`` is written); density 1 is the identity."""
    result = out if out is not None else torch.empty_like(tau)
    if density >= 1:
        return result.copy_(tau)
    masked = magprune_mask(tau, density=density, epsilon=epsilon, key=key)
    if not rescale:
        return result.copy_(masked)
    # the L1 norms as torch.abs(·).sum(), with ``result`` as the |·| scratch (τ is no longer needed): a new
    # full-size temporary per norm took 45 % of the main thread's py-spy samples in a DELLA merge
    before = torch.abs(tau, out=result).sum()
    after = torch.abs(masked, out=result).sum()
    if float(before) < _L1_EPS or float(after) < _L1_EPS:
        return result.copy_(masked)
    return torch.mul(masked, before / after, out=result)


def _merge_della(
    task_vectors: torch.Tensor, ctx: TensorContext, params: DellaParams, *, consensus: bool
) -> torch.Tensor:
    tv = task_vectors.float()
    k = tv.shape[0]
    densities = per_model_densities(ctx, params, k)
    epsilons = per_model_values(ctx, "epsilon", [float(params.epsilon)] * k)
    pruned = tv  # each model is pruned in place: its task vector is read whole before its row is written
    for i in range(k):
        try:
            check_della_window(densities[i], epsilons[i])
        except ValueError as exc:
            raise RecipeError(f"model {ctx.source_indices[i]}: {exc}", tensor=ctx.name) from None
        key = dare_key(seed=ctx.seed, source_index=ctx.source_indices[i], name=ctx.name)
        magprune(
            tv[i], density=densities[i], epsilon=epsilons[i], rescale=params.rescale, key=key, out=pruned[i]
        )
    merged, kept, conflicts = fused_sparse_merge(
        pruned.reshape(k, 1, -1), ctx.weights, consensus=consensus, mean=params.normalize
    )
    if pruned.numel():
        ctx.report["kept_density"] = float(kept) / pruned.numel()
    if consensus and merged.numel():
        ctx.report["sign_conflict_rate"] = float(conflicts) / merged.numel()
    return merged.reshape(tv.shape[1:])


@register_method("della")
def merge_della(task_vectors: torch.Tensor, ctx: TensorContext, params: DellaParams) -> torch.Tensor:
    return _merge_della(task_vectors, ctx, params, consensus=True)


@register_method("della_linear")
def merge_della_linear(task_vectors: torch.Tensor, ctx: TensorContext, params: DellaParams) -> torch.Tensor:
    return _merge_della(task_vectors, ctx, params, consensus=False)
