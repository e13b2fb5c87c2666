"""TIES-Merging (Yadav et al., NeurIPS 2023, https://arxiv.org/abs/2306.01708).

    τ̂_t = top-k(τ_t)  (exactly ⌊density·n⌋ ≥ 1 largest |τ|, ties by lowest flat index)
    γ = sgn(Σ_t w_t·τ̂_t), zero -> +1;  τ_m = Σ_{t: sgn(w_t τ̂_t)=γ} w_t·τ̂_t / Σ_{same t} w_t

Defaults: density 0.2, disjoint mean, λ = 1. Stages: magnitude / ties_sign / mean. Scope: per_tensor by default
(mergekit/PEFT); ``scope=global`` ranks the whole model per task as the paper does, streamed
(``merge_ops.global_stats``). Deliberate choices vs the paper: weighted sign vote and Σw divisor (mergekit),
zero-sum ties elect +1 (mergekit/PEFT) instead of the global majority sign, exact ⌊dK⌋ count instead of the
kthvalue rule's ⌊dK⌋+1 plus ties.
"""

from merge_ops.methods.stages import merge_stages
from merge_ops.registry import register_method

register_method("ties")(merge_stages)
