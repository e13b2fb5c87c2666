"""The data folders as a model browser: list one folder (confined like every local path), and describe each
checkpoint folder from its ``config.json`` and its safetensors headers only (no tensor is read).

A path is confined by ``app.services.paths.confine_path`` (``..``, absolute paths elsewhere and symlinks out are
refused: ``PathNotAllowedError``); a sub-folder whose realpath leaves the data dirs is left out of a listing.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from app.schemas import FolderEntry, FolderListing, ModelFacts
from app.services.errors import PathNotAllowedError
from app.services.paths import confine_path
from merge_ops.errors import InvalidArgumentError

#: a listing shows at most this many sub-folders (sorted by name), and says when it cut
MAX_ENTRIES = 500
#: safetensors' own bound on the JSON header
MAX_HEADER_BYTES = 100 * 1024 * 1024


def list_folder(raw: str | None, *, roots: Sequence[Path]) -> FolderListing:
    """The sub-folders of ``raw`` (a path inside the data dirs; empty: the data dirs themselves)."""
    real_roots = [Path(os.path.realpath(r)) for r in roots]
    if not raw:
        entries = [_entry(root, str(root), real_roots) for root in real_roots if root.is_dir()]
        return FolderListing(path=None, parent=None, model=None, entries=entries, truncated=False)
    try:
        folder = confine_path(raw, roots=real_roots, must_exist=True)
    except ValueError as exc:
        raise PathNotAllowedError(
            f"path not allowed: {exc}", errors=[{"loc": ["path"], "msg": str(exc)}]
        ) from None
    if not folder.is_dir():
        raise InvalidArgumentError(f"{raw!r} is not a folder", argument="path")
    names = sorted(
        (e.name for e in os.scandir(folder) if not e.name.startswith(".") and e.is_dir()), key=str.lower
    )
    entries = [
        _entry(folder / name, name, real_roots)
        for name in names
        if _inside_roots(Path(os.path.realpath(folder / name)), real_roots)
    ]
    parent = None if folder in real_roots else str(folder.parent)
    return FolderListing(
        path=str(folder),
        parent=parent,
        model=describe(folder),
        entries=entries[:MAX_ENTRIES],
        truncated=len(entries) > MAX_ENTRIES,
    )


def _inside_roots(real: Path, roots: Sequence[Path]) -> bool:
    return any(real == root or root in real.parents for root in roots)


def _entry(path: Path, name: str, roots: Sequence[Path]) -> FolderEntry:
    real = Path(os.path.realpath(path))
    return FolderEntry(name=name, path=str(real), model=describe(real))


def describe(folder: Path) -> ModelFacts | None:
    """Architecture, parameter count and size of a checkpoint folder; None for a folder that holds none."""
    shards = sorted(folder.glob("*.safetensors"))
    config = _read_json(folder / "config.json")
    adapter = _read_json(folder / "adapter_config.json")
    if not shards and config is None and adapter is None:
        return None
    facts: dict[str, Any] = {"kind": "adapter" if adapter is not None else "checkpoint", "files": len(shards)}
    source = config if config is not None else adapter or {}
    architectures = source.get("architectures")
    if isinstance(architectures, list) and architectures and isinstance(architectures[0], str):
        facts["architecture"] = architectures[0]
    for key, field in (("model_type", "model_type"), ("peft_type", "model_type")):
        if isinstance(source.get(key), str) and field not in facts:
            facts[field] = source[key]
    if adapter is not None and isinstance(adapter.get("base_model_name_or_path"), str):
        facts["base_model"] = adapter["base_model_name_or_path"]
    parameters, size, dtypes, problems = 0, 0, set(), []
    for shard in shards:
        try:
            header = read_safetensors_header(shard)
        except ValueError as exc:
            problems.append(f"{shard.name}: {exc}")
            continue
        size += shard.stat().st_size
        for name, info in header.items():
            if name == "__metadata__" or not isinstance(info, dict):
                continue
            parameters += math.prod(int(d) for d in info.get("shape", []))
            dtypes.add(str(info.get("dtype")))
    if shards:
        facts.update(parameters=parameters, bytes=size, dtypes=sorted(dtypes))
    if problems:
        facts["problem"] = "; ".join(problems)
    return ModelFacts(**facts)


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of one safetensors file (its first 8 + N bytes); ValueError when it is not one."""
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise ValueError("shorter than a safetensors header")
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER_BYTES or length > path.stat().st_size - 8:
            raise ValueError("not a safetensors file (header length out of range)")
        try:
            header = json.loads(fh.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError("not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise ValueError("not a safetensors file (header is not an object)")
    return header


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None
