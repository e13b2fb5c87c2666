"""Triton twins of ``kernels.reference``: ``@triton.jit`` kernels with their launchers, one module per family
(``elementwise``: task arithmetic, bit packing, DARE masks, ternarize; ``select``: exact magnitude selection by
radix histograms; ``consensus``: TIES sign election and disjoint merge). ``kernels.triton_ops`` re-exports the
launchers under the reference's names. Nothing outside this package and ``kernels/triton_ops.py`` imports
triton."""
