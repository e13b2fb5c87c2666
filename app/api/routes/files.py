"""/v1/files: upload a held-out JSONL file so a greedy-soup evaluator can travel with the job."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from app.api.deps import CurrentToken, SettingsDep, read_limited, request_media_type
from app.api.openapi_docs import PROBLEM_RESPONSES
from app.services.errors import UnsupportedMediaTypeError
from app.services.uploads import store_upload

router = APIRouter(
    prefix="/files",
    tags=["files"],
    responses={status: PROBLEM_RESPONSES[status] for status in (401, 413, 415, 422)},
)

JSONL_TYPES = ("application/x-ndjson", "application/jsonl", "application/x-jsonlines")


class FileOut(BaseModel):
    path: str = Field(description="Absolute path under the first data dir; put it in `evaluator.data`.")
    sha256: str
    bytes: int
    lines: int = Field(description="JSON objects in the file (blank lines are skipped).")


def _jsonl_request_body() -> dict[str, Any]:
    schema = {"type": "string", "format": "binary", "description": "UTF-8 JSONL, one object per line."}
    return {"requestBody": {"required": True, "content": {t: {"schema": schema} for t in JSONL_TYPES[:2]}}}


@router.post(
    "",
    status_code=201,
    response_model=FileOut,
    openapi_extra=_jsonl_request_body(),
    summary="Upload a held-out JSONL file",
)
async def upload_file(request: Request, settings: SettingsDep, caller: CurrentToken) -> FileOut:
    """Store the raw JSONL body content-addressed as `uploads/<sha256>.jsonl` under the first data dir; 422 if
    it is not UTF-8 JSONL with one object per non-blank line, 413 over `ALLOY_MAX_UPLOAD_BYTES`."""
    media_type = request_media_type(request)
    if media_type not in JSONL_TYPES:
        raise UnsupportedMediaTypeError(f"unsupported Content-Type {media_type!r}; send {JSONL_TYPES[0]}")
    raw = await read_limited(request, settings.max_upload_bytes)
    stored = await run_in_threadpool(store_upload, raw, data_root=settings.data_dirs[0])
    return FileOut(path=str(stored.path), sha256=stored.sha256, bytes=stored.bytes, lines=stored.lines)
