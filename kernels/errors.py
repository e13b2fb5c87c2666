"""The kernels' own typed error. ``kernels`` imports nothing from ``merge_ops``; ``merge_ops.errors`` maps this
to its ``KernelUnavailableError`` (same ``code``) where a merge_ops entry point calls into kernels."""

from __future__ import annotations

from typing import Any


class KernelUnavailable(RuntimeError):
    """``ALLOY_KERNELS`` names no known mode, or ``triton`` was asked for and Triton can't run this op here.

    ``code`` is stable (the API's problem type and the job row use it); ``detail`` is one line saying why;
    ``context`` holds ``op`` and/or ``mode``. Pickles by its constructor arguments (crosses processes)."""

    code = "kernel_unavailable"

    def __init__(self, detail: str, **context: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.context = context

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (self.detail, self.context))


def _rebuild(detail: str, context: dict[str, Any]) -> KernelUnavailable:
    return KernelUnavailable(detail, **context)
