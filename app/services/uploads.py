"""Held-out JSONL uploads for greedy soup: validated, stored content-addressed under the first data root.

The file lands in ``<data_dirs[0]>/uploads/<sha256>.jsonl`` so the path a client puts in ``evaluator.data`` passes
the same confinement as any other local path. Same bytes, same name: a repeated upload rewrites nothing. The
write goes through a temp file and a rename, so a reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from app.services.errors import InvalidUploadError

UPLOADS_FOLDER = "uploads"


@dataclass(frozen=True)
class StoredUpload:
    path: Path
    sha256: str
    bytes: int
    lines: int


def count_jsonl_objects(raw: bytes) -> int:
    """The number of JSON objects in ``raw``; InvalidUploadError unless every non-blank line is one."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidUploadError(f"file is not UTF-8 (byte {exc.start})") from None
    count = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidUploadError(f"line {number} is not JSON: {exc.msg}", line=number) from None
        if not isinstance(row, dict):
            raise InvalidUploadError(f"line {number} is not a JSON object", line=number)
        count += 1
    if count == 0:
        raise InvalidUploadError("file holds no JSON objects")
    return count


def store_upload(raw: bytes, *, data_root: Path) -> StoredUpload:
    """Validate ``raw`` as JSONL and store it as ``uploads/<sha256>.jsonl`` under ``data_root``."""
    lines = count_jsonl_objects(raw)
    digest = hashlib.sha256(raw).hexdigest()
    folder = Path(os.path.realpath(data_root)) / UPLOADS_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{digest}.jsonl"
    if not target.is_file():
        handle, temp = tempfile.mkstemp(dir=folder, suffix=".part")
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(raw)
            os.replace(temp, target)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
    return StoredUpload(path=target, sha256=digest, bytes=len(raw), lines=lines)
