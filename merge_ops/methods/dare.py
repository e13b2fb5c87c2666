"""DARE: drop and rescale (Yu et al., ICML 2024, https://arxiv.org/abs/2311.03099).

    m_t ~ Bernoulli(density) per element (counter-based, keyed by (job seed, source index, tensor name),
          so identical on every device and independent of order); τ̂_t = m_t ⊙ τ_t / density

``dare_linear``: dare / none / sum, density 0.1. ``dare_ties``: dare / ties_sign / mean, density 0.1 (the paper's
DARE-then-TIES without a second magnitude trim, as mergekit and PEFT do; mergekit's dare_ties defaults to the
disjoint *sum*, which ``aggregate: sum`` gives). Rescale ``inverse`` (÷density, default, the paper), ``l1``
(match each scope unit's L1 norm, mergekit) or ``none``. density 1 is the identity exactly. The mask is
element-wise, so scope only affects the ``l1`` rescale (global: one ratio per model).
"""

from merge_ops.methods.stages import merge_stages
from merge_ops.registry import register_method

register_method("dare_linear", "dare_ties")(merge_stages)
