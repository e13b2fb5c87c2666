"""Task arithmetic (Ilharco et al., ICLR 2023, https://arxiv.org/abs/2212.04089).

    θ = θ_0 + λ·Σ_t w_t·τ_t            (method returns Σ_t w_t·τ_t; the pipeline applies λ)

Defaults: λ = 1, weights 1; a negative weight negates a task vector (forgetting). Stages: none / none / sum.
No statistics, so the scope is irrelevant. mergekit ``task_arithmetic`` (normalize false) is the same formula.
"""

from merge_ops.methods.stages import merge_stages
from merge_ops.registry import register_method

register_method("task_arithmetic")(merge_stages)
