"""Reusable scratch buffers for the per-tensor passes of one merge.

A fresh large CPU allocation is new memory: every 2 MiB huge page (4 KiB without them) costs a page fault and the
kernel zeroing it on first touch, ~1 ns an element on the 2-core VM, more than the compiled pass that then fills
it (0.5 ns an element for a task vector). Inside ``reuse()`` each role's buffer grows to the largest tensor asked
for and is handed out again, so a merge touches fresh memory once per role instead of once per tensor; peak
memory is what the largest tensor needed anyway. Outside it (first passes, tests, other callers) ``take`` is a
plain ``torch.empty``.

The caller of ``reuse()`` promises that a role's previous buffer is dead when the role is asked for again: the
merge pipeline's main loop, where every tensor's output is written before the next tensor starts. Buffers are per
thread (concurrent merges in one process never share them) and are freed when the scope ends.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator, Sequence

import torch

_local = threading.local()


@contextlib.contextmanager
def reuse() -> Iterator[None]:
    """Hand out reused buffers in this thread until the scope ends (nested scopes get their own)."""
    previous = getattr(_local, "buffers", None)
    _local.buffers = {}
    try:
        yield
    finally:
        _local.buffers = previous


def take(role: str, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor of ``shape``: the role's reused buffer inside ``reuse()``, else new."""
    buffers: dict[tuple[str, torch.dtype], torch.Tensor] | None = getattr(_local, "buffers", None)
    if buffers is None:
        return torch.empty(tuple(shape), dtype=dtype)
    numel = math.prod(shape)
    held = buffers.get((role, dtype))
    if held is None or held.numel() < numel:
        buffers.pop((role, dtype), None)  # free the smaller one before the larger one is allocated
        held = torch.empty(numel, dtype=dtype)
        buffers[(role, dtype)] = held
    return held[:numel].view(tuple(shape))
