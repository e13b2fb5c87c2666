"""Model Breadcrumbs (Davari & Belilovsky, ECCV 2024, https://arxiv.org/abs/2312.06795).

Per scope unit of n elements, ranked by |τ| (ties by lowest flat index): drop the ⌊top_removed·n⌋ largest
(outliers), keep the next ⌊density·n⌋ (≥ 1, capped by what is left), zero the rest; kept values unchanged.

``breadcrumbs``: breadcrumbs / none / sum, density 0.15, top_removed 0.006, λ = 0.2 (the authors' search
seed). ``breadcrumbs_ties``: breadcrumbs / ties_sign / mean, λ = 1. Scope per_tensor by default (mergekit);
``per_row`` is close to the authors' code (which ranks along the last dim; Alloy's rows are the first dim).
⌊top_removed·n⌋ = 0 removes nothing (mergekit ≤ 0.1.4 zeroes the whole tensor there: a bug not copied);
0-dim tensors pass unchanged.
"""

from merge_ops.methods.stages import merge_stages
from merge_ops.registry import register_method

register_method("breadcrumbs", "breadcrumbs_ties")(merge_stages)
