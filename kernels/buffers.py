"""Reusable scratch buffers for the per-tensor passes of one merge.

A fresh large CPU allocation is new memory: every 2 MiB huge page (4 KiB without them) costs a page fault and the
kernel zeroing it on first touch, ~1 ns an element on the 2-core VM, more than the compiled pass that then fills
it (0.5 ns an element for a task vector). Inside ``reuse()`` each role's buffer grows to the largest tensor asked
for and is handed out again, so a merge touches fresh memory once per role instead of once per tensor; peak
memory is what the largest tensor needed anyway. Outside it (first passes, tests, other callers) ``take`` is a
plain ``torch.empty``.

The caller of ``reuse()`` promises that a role's previous buffer is dead when the role is asked for again, with
one exception: the merge pipeline writes a tensor's output in a thread while the next tensor computes, so the
``output`` role has two buffers, and ``turn()`` (called between tensors) hands out the other one. ``may_hold``
tells whether a tensor survives the next tensor's passes (a method may return one of its other buffers as its
output; the pipeline then writes it before going on). Buffers are per thread (concurrent merges in one process
never share them) and are freed when the scope ends.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator, Sequence

import torch

_local = threading.local()


#: roles whose buffer the caller may still read while the next tensor computes: two buffers each, ``turn()``
#: switching between them
_ALTERNATING = frozenset({"output"})

_Key = tuple[str, torch.dtype, int]  # role, dtype, which of an alternating role's two buffers (else 0)


@contextlib.contextmanager
def reuse() -> Iterator[None]:
    """Hand out reused buffers in this thread until the scope ends (nested scopes get their own)."""
    previous = getattr(_local, "buffers", None), getattr(_local, "turn", 0)
    _local.buffers, _local.turn = {}, 0
    try:
        yield
    finally:
        _local.buffers, _local.turn = previous


def _held() -> dict[_Key, torch.Tensor] | None:
    held: dict[_Key, torch.Tensor] | None = getattr(_local, "buffers", None)
    return held


def take(role: str, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor of ``shape``: the role's reused buffer inside ``reuse()``, else new."""
    buffers = _held()
    if buffers is None:
        return torch.empty(tuple(shape), dtype=dtype)
    numel = math.prod(shape)
    key = (role, dtype, _local.turn if role in _ALTERNATING else 0)
    held = buffers.get(key)
    if held is None or held.numel() < numel:
        buffers.pop(key, None)  # free the smaller one before the larger one is allocated
        held = torch.empty(numel, dtype=dtype)
        buffers[key] = held
    return held[:numel].view(tuple(shape))


def turn() -> None:
    """The next tensor starts: alternating roles hand out their other buffer, so what the last one handed out
    stays intact until the turn after this one."""
    if _held() is not None:
        _local.turn ^= 1


def may_hold(tensor: torch.Tensor) -> bool:
    """True when ``tensor`` stays intact through the next tensor's passes (after one ``turn()``): it is in no
    reused buffer, or in the buffer an alternating role handed out since the last turn."""
    buffers = _held()
    if buffers is None or tensor.device.type != "cpu":
        return True
    address = tensor.untyped_storage().data_ptr()
    for (role, _, which), held in buffers.items():
        if held.untyped_storage().data_ptr() == address:
            return role in _ALTERNATING and which == _local.turn
    return True
