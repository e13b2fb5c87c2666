"""LiNeS layer scaling (Wang, Dimitriadis et al., ICLR 2025, https://arxiv.org/abs/2410.17146): helpers the
pipeline uses to scale a merged delta by depth. Torch-free.

    λ(ℓ) = α + β·ℓ/(L − 1)      for a tensor in block ℓ (0-based) of a stack of L blocks

- Block index: the first match of ``(layers|layer|h|blocks|block|resblocks)\\.(\\d+)\\.`` in the name, anchored at a
  name component (so ``graph.3.`` is not ``h.3.``). T5 ``encoder.block.3.layer.0`` -> block 3; Mixtral
  ``layers.5.block_sparse_moe.experts.0`` -> block 5 (the reference code's substring search gets both wrong).
- Stacks: the name prefix before the match (``encoder.``, ``decoder.``, ``model.``, ``visual.transformer.``) keys
  a stack; each stack ramps separately. L = number of distinct indices in the stack, and ℓ is an index's rank
  among them (a filtered subset of layers still ramps 0..L−1). L = 1: ℓ/(L−1) is taken as 0 (scale α).
- Tensors outside blocks: embeddings (and anything unrecognised) get α; output-side tensors (final norm,
  lm_head, proj, heads) get α (``head_scale='alpha'``, the reference) or α + β (``'alpha_plus_beta'``).
- Multi-task α default: (‖Σ_t τ_t‖₁ / ‖τ_merged‖₁)/T from global L1 sums (``auto_alpha``); 1/T for task
  arithmetic. α = 1, β = 0 is the identity.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

BLOCK_PATTERN = re.compile(r"(?:^|(?<=\.))(layers|layer|h|blocks|block|resblocks)\.(\d+)\.")
_EMBEDDING = re.compile(
    r"(embed|(^|\.)wte\.|(^|\.)wpe\.|(^|\.)shared\.|patch|(^|\.)conv1\.|class_embedding|position|pos_emb|"
    r"cls_token|ln_pre|pre_layrnorm|pre_layernorm|(^|\.)word_embeddings)"
)
_OUTPUT = re.compile(
    r"(lm_head|(^|\.)ln_f\.|final_layer_?norm|(^|\.)norm\.|ln_post|post_layernorm|(^|\.)proj$|(^|\.)head\.|"
    r"(^|\.)output\.|classifier|(^|\.)score\.|(^|\.)pooler\.)"
)

Side = Literal["block", "embedding", "output", "other"]
HeadScale = Literal["alpha", "alpha_plus_beta"]


@dataclass(frozen=True)
class BlockPosition:
    stack: str  # the name prefix before the block container ('' for top-level stacks)
    index: int  # the index in the name
    depth: int  # ℓ: rank of the index among the stack's distinct indices, 0-based
    num_blocks: int  # L of the stack

    @property
    def ramp(self) -> float:
        """ℓ/(L−1), 0 for a single-block stack."""
        return self.depth / (self.num_blocks - 1) if self.num_blocks > 1 else 0.0


def find_block(name: str) -> tuple[str, int] | None:
    """(stack key, block index) of a tensor name, or None outside every block."""
    match = BLOCK_PATTERN.search(name)
    if match is None:
        return None
    return name[: match.start()], int(match.group(2))


def block_map(names: Iterable[str]) -> dict[str, BlockPosition]:
    """Every block tensor's position; names outside blocks are absent."""
    found = {name: block for name in names if (block := find_block(name)) is not None}
    indices: dict[str, set[int]] = defaultdict(set)
    for stack, index in found.values():
        indices[stack].add(index)
    ranks = {
        stack: {index: rank for rank, index in enumerate(sorted(values))} for stack, values in indices.items()
    }
    return {
        name: BlockPosition(stack, index, ranks[stack][index], len(indices[stack]))
        for name, (stack, index) in found.items()
    }


def tensor_side(name: str) -> Side:
    """Where a tensor sits: in a block, on the input side (embeddings), on the output side, or neither."""
    if find_block(name) is not None:
        return "block"
    if _EMBEDDING.search(name):
        return "embedding"
    if _OUTPUT.search(name):
        return "output"
    return "other"


def lines_scale(
    name: str, position: BlockPosition | None, *, alpha: float, beta: float, head_scale: HeadScale = "alpha"
) -> float:
    """λ for one tensor given its block position (None outside blocks)."""
    if position is not None:
        return alpha + beta * position.ramp
    if head_scale == "alpha_plus_beta" and tensor_side(name) == "output":
        return alpha + beta
    return alpha


def lines_scales(
    names: Iterable[str], *, alpha: float, beta: float, head_scale: HeadScale = "alpha"
) -> dict[str, float]:
    """name -> LiNeS scale for every name (L per stack is inferred from these names, so pass them all)."""
    names = list(names)
    blocks = block_map(names)
    return {n: lines_scale(n, blocks.get(n), alpha=alpha, beta=beta, head_scale=head_scale) for n in names}


def block_report(names: Iterable[str]) -> dict[str, dict[str, object]]:
    """The tensor -> block map for the job report: stack, index, depth and L, or the side of non-block tensors."""
    names = list(names)
    blocks = block_map(names)
    report: dict[str, dict[str, object]] = {}
    for name in names:
        position = blocks.get(name)
        if position is None:
            report[name] = {"side": tensor_side(name)}
        else:
            report[name] = {
                "stack": position.stack,
                "block": position.index,
                "depth": position.depth,
                "num_blocks": position.num_blocks,
            }
    return report


def auto_alpha(*, sum_l1: float, merged_l1: float, num_models: int) -> float:
    """LiNeS multi-task α = (‖Σ_t τ_t‖₁ / ‖τ_merged‖₁)/T. A zero merged norm (nothing to scale) gives 1/T."""
    if num_models < 1:
        raise ValueError("auto alpha needs at least one model")
    if merged_l1 <= 0.0:
        return 1.0 / num_models
    return sum_l1 / merged_l1 / num_models
