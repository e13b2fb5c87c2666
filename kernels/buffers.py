"""Reusable scratch buffers for the per-tensor passes of one merge.

A fresh large CPU allocation is new memory: every 2 MiB huge page (4 KiB without them) costs a page fault and the
kernel zeroing it on first touch, ~1 ns an element on the 2-core VM, more than the compiled pass that then fills
it (0.5 ns an element for a task vector). Inside ``reuse()`` each role's buffer grows to the largest tensor asked
for and is handed out again, so a merge touches fresh memory once per role instead of once per tensor; peak
memory is what the largest tensor needed anyway. Outside it (first passes, tests, other callers) ``take`` is a
plain ``torch.empty``.

The caller of ``reuse()`` promises that a role's previous buffer is dead when the role is asked for again, or
lent: the merge pipeline writes a tensor's output in a thread while the next tensor computes, and ``lend(tensor,
busy)`` makes the next ``take`` of the buffer holding ``tensor`` wait until ``busy`` is done. So the write overlaps
every pass of the next tensor before the one that fills its output, and no second output buffer is held (a
second one raised a merge's peak RSS by up to one output tensor, measured). Buffers are per thread (concurrent
merges in one process never share them) and are freed when the scope ends.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, wait
from typing import Any

import torch

_local = threading.local()


@contextlib.contextmanager
def reuse() -> Iterator[None]:
    """Hand out reused buffers in this thread until the scope ends (nested scopes get their own)."""
    previous = getattr(_local, "buffers", None), getattr(_local, "lent", None)
    _local.buffers, _local.lent = {}, {}
    try:
        yield
    finally:
        wait(_local.lent.values())  # what was lent from these buffers is done with them before they go
        _local.buffers, _local.lent = previous


def take(role: str, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor of ``shape``: the role's reused buffer inside ``reuse()``, else new.
    A buffer lent out (``lend``) is handed out once its borrower is done with it."""
    buffers: dict[tuple[str, torch.dtype], torch.Tensor] | None = getattr(_local, "buffers", None)
    if buffers is None:
        return torch.empty(tuple(shape), dtype=dtype)
    numel = math.prod(shape)
    held = buffers.get((role, dtype))
    if held is not None:
        busy = _local.lent.pop(held.untyped_storage().data_ptr(), None)
        if busy is not None:
            wait([busy])  # its errors are the borrower's to report
    if held is None or held.numel() < numel:
        buffers.pop((role, dtype), None)  # free the smaller one before the larger one is allocated
        held = torch.empty(numel, dtype=dtype)
        buffers[(role, dtype)] = held
    return held[:numel].view(tuple(shape))


def lend(tensor: torch.Tensor, busy: Future[Any]) -> None:
    """``tensor`` is read elsewhere until ``busy`` is done: when it lives in a reused buffer, the next ``take`` of
    that buffer waits for ``busy`` first (outside ``reuse()``, or for a tensor of its own, nothing to do)."""
    lent: dict[int, Future[Any]] | None = getattr(_local, "lent", None)
    buffers: dict[tuple[str, torch.dtype], torch.Tensor] | None = getattr(_local, "buffers", None)
    if lent is None or buffers is None or tensor.device.type != "cpu":
        return
    address = tensor.untyped_storage().data_ptr()
    if any(held.untyped_storage().data_ptr() == address for held in buffers.values()):
        lent[address] = busy
