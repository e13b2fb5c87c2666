"""Triton twins of the ops in ``kernels.reference``: same names, same signatures, same results (exact where the
reference is exact, within float32 rounding elsewhere). ``kernels.dispatch`` imports this module lazily and
routes CUDA tensors here (and CPU tensors under the interpreter, see ``INTERPRETED``); importing it needs
triton. The kernels live in ``kernels/triton/``.
"""

from __future__ import annotations

from kernels.triton.consensus import disjoint_merge, elect_sign
from kernels.triton.elementwise import (
    dare_keep_mask,
    fused_task_arithmetic,
    pack_bits,
    ternarize,
    unpack_bits,
)
from kernels.triton.fused import fused_sparse_merge
from kernels.triton.select import (
    _histogram_kernel,
    magnitude_histogram,
    rank_boundary,
    select_by_threshold,
    topk_mask,
)

#: True when triton was imported with ``TRITON_INTERPRET=1``: ``@triton.jit`` then made interpreted functions,
#: which run on CPU tensors (slowly); compiled kernels need CUDA tensors.
INTERPRETED = type(_histogram_kernel).__name__ == "InterpretedFunction"

__all__ = [
    "INTERPRETED",
    "dare_keep_mask",
    "disjoint_merge",
    "elect_sign",
    "fused_sparse_merge",
    "fused_task_arithmetic",
    "magnitude_histogram",
    "pack_bits",
    "rank_boundary",
    "select_by_threshold",
    "ternarize",
    "topk_mask",
    "unpack_bits",
]
