"""Job and batch rows -> response models (the API's one rendering of a job, shared by JSON and SSE)."""

from __future__ import annotations

import re
from typing import Any, TypeVar

from fastapi import Request

from app.api.problems import error_problem
from app.models import Batch, Job
from app.schemas import BatchOut, JobOut, JobProgress, Output, Problem

_T = TypeVar("_T")


_SURROGATE = re.compile("[\ud800-\udfff]")


def _scrub_text(text: str) -> str:
    return _SURROGATE.sub("\ufffd", text)


def scrub(value: _T) -> _T:
    """``value`` with every string made encodable (a lone surrogate becomes U+FFFD).

    The edge refuses such text now (merge_ops.safe_load), but rows stored before that hold it, and one bad
    character made every rendering of the job (GET, the owner's list, the admin's list, DELETE) a 500."""
    result: Any = value
    if isinstance(value, str):
        result = _scrub_text(value)
    elif isinstance(value, dict):
        result = {scrub(k): scrub(v) for k, v in value.items()}
    elif isinstance(value, list):
        result = [scrub(v) for v in value]
    return result  # type: ignore[no-any-return]


def job_url(request: Request, job_id: str) -> str:
    return str(request.url_for("get_merge", job_id=job_id))


def job_out(job: Job, *, url: str) -> JobOut:
    total = job.tensors_total
    # bytes, not tensors: a model's tensors differ in size by orders of magnitude (embeddings vs. norms)
    if job.bytes_total:
        fraction: float | None = min(1.0, job.bytes_done / job.bytes_total)
    else:
        fraction = min(1.0, job.tensors_done / total) if total else None
    if job.status == "succeeded":
        fraction = 1.0
    error = scrub(job.error)
    return JobOut(
        id=job.id,
        name=job.name,
        kind=job.kind,  # type: ignore[arg-type]  # the DB column holds one of JobKind
        status=job.status,  # type: ignore[arg-type]
        url=url,
        priority=job.priority,
        batch_id=job.batch_id,
        attempts=job.attempts,
        cancel_requested=job.cancel_requested,
        progress=JobProgress(
            tensors_done=job.tensors_done,
            tensors_total=total,
            bytes_done=job.bytes_done,
            bytes_total=job.bytes_total,
            eta_s=job.eta_s,
            fraction=fraction,
            phase=job.progress_phase,
        ),
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        duration_s=job.duration_s,
        output=Output(path=job.output_path, url=job.output_url, commit=job.output_commit),
        error=Problem.model_validate(error_problem(error)) if error and job.status != "succeeded" else None,
        recipe=scrub(job.recipe),
        recipe_digest=job.recipe_digest,
        pinned_sources=scrub(job.pinned_sources),
    )


def batch_out(request: Request, batch: Batch, *, counts: dict[str, int], jobs: list[Job]) -> BatchOut:
    return BatchOut(
        id=batch.id,
        url=str(request.url_for("get_batch", batch_id=batch.id)),
        priority=batch.priority,
        created_at=batch.created_at,
        total=len(jobs),
        counts=counts,
        jobs=[job_out(job, url=job_url(request, job.id)) for job in jobs],
    )
