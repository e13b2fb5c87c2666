"""Merge method implementations; importing this package registers every method (``merge_ops.registry``)."""

from merge_ops.methods import (  # noqa: F401  (imported for their registration side effect)
    arcee_fusion,
    breadcrumbs,
    compeft,
    dare,
    della,
    karcher,
    lines,
    model_stock,
    multislerp,
    nearswap,
    nuslerp,
    passthrough,
    ram,
    sce,
    slerp,
    soup,
    stages,
    task_arithmetic,
    ties,
    transfer,
)
