"""ComPEFT (Yadav et al., 2023, https://arxiv.org/abs/2311.13171).

    τ̃_t = α·σ_t·sgn(τ_t) ⊙ topk(|τ_t|),  σ_t = unbiased std of the uncompressed τ_t in the scope unit

Every kept entry becomes ±α·σ (values exactly in {−ασ, 0, +ασ}); the merge is Σ_t w_t·τ̃_t (compeft / none /
sum). Defaults: density 0.2, α = 1, scope ``global`` (one σ and one top-k per expert over the whole model, as
in the paper; streamed by ``merge_ops.global_stats``). Exact ⌊density·n⌋ count (the authors' kthvalue keeps one
more plus ties). Per-tensor units with fewer than 2 elements have no unbiased std and pass unchanged.
"""

from merge_ops.methods.stages import merge_stages
from merge_ops.registry import register_method

register_method("compeft")(merge_stages)
