"""Merge method implementations; importing this package registers every method (``merge_ops.registry``)."""

from merge_ops.methods import (  # noqa: F401  (imported for their registration side effect)
    breadcrumbs,
    compeft,
    dare,
    lines,
    model_stock,
    soup,
    stages,
    task_arithmetic,
    ties,
    transfer,
)
