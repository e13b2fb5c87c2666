"""How a mergekit model reference is resolved, as mergekit 0.1.5 does (``ModelReference.local_path``): the part
before ``@`` names a local model when that path exists, else it is a Hub repo id.

A server has no meaningful working directory: its data folders stand in for it. ``local_roots`` holds them while
a request translates a config, so ``model: small/ft1`` is the folder ``<data dir>/small/ft1`` when it exists
there, and the Hub repo ``small/ft1`` only when it does not.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from pathlib import Path

_HUB_ID = re.compile(r"^[\w.\-]+/[\w.\-]+$")
_LOCAL_ROOTS: ContextVar[tuple[Path, ...]] = ContextVar("mergekit_local_roots", default=())


@contextlib.contextmanager
def local_roots(roots: Sequence[Path]) -> Iterator[None]:
    """Resolve relative mergekit references inside ``roots`` (in order) while the block runs."""
    token = _LOCAL_ROOTS.set(tuple(Path(r) for r in roots))
    try:
        yield
    finally:
        _LOCAL_ROOTS.reset(token)


def _exists_locally(path: str) -> bool:
    candidate = Path(path).expanduser()
    if candidate.exists():
        return True
    return not candidate.is_absolute() and any((root / candidate).exists() for root in _LOCAL_ROOTS.get())


def alloy_source(ref: str) -> str:
    """A mergekit reference string (``path[@revision]``) as an Alloy source: a local path (mergekit ignores the
    revision of a local model) or ``hf://repo[@revision]``."""
    path, _, revision = ref.partition("@")
    if _exists_locally(path):
        return path
    if ref.startswith(("/", ".", "~", "hf://")):
        return ref
    if _HUB_ID.match(path):
        return f"hf://{path}@{revision}" if revision else f"hf://{path}"
    return ref
