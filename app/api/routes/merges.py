"""/v1/merges: submit, read, stream, list and cancel merge jobs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from app.api.deps import (
    CurrentToken,
    HfToken,
    IdempotencyKey,
    PinnerDep,
    RecipeBody,
    SessionDep,
    SettingsDep,
    SubmissionAllowed,
)
from app.api.openapi_docs import JOB_LINKS, PROBLEM_RESPONSES, recipe_request_body
from app.api.views import job_out, job_url, scrub
from app.models import TERMINAL_STATUSES, ApiToken
from app.schemas import JobKind, JobList, JobOut, JobStatus, OutputFile, OutputFiles
from app.services import jobs
from app.services.errors import ReportNotReadyError

router = APIRouter(prefix="/merges", tags=["merges"], responses=PROBLEM_RESPONSES)
KEEPALIVE_S = 15.0


@router.post(
    "",
    status_code=202,
    response_model=JobOut,
    responses=JOB_LINKS,
    dependencies=[SubmissionAllowed],
    openapi_extra=recipe_request_body(),
    summary="Submit a merge",
)
def create_merge(
    request: Request,
    response: Response,
    body: RecipeBody,
    session: SessionDep,
    settings: SettingsDep,
    caller: CurrentToken,
    pinner: PinnerDep,
    hf_token: HfToken,
    idempotency_key: IdempotencyKey = None,
    priority: Annotated[int, Query(ge=0, le=9, description="0..9, higher runs first.")] = 5,
    name: Annotated[
        str | None, Query(max_length=200, description="A label for job lists (not part of the recipe).")
    ] = None,
) -> JobOut:
    """Validate the recipe (JSON, or YAML with ``Content-Type: application/yaml``; mergekit configs are
    translated) and queue a job. Returns the existing job for a repeated ``Idempotency-Key`` or for the same
    recipe while an earlier job for it is still queued or running (header ``Idempotent-Replayed: true``)."""
    recipe = jobs.prepare_recipe(body, settings=settings)
    submission = jobs.submit_merge(
        session,
        recipe,
        owner=caller,
        settings=settings,
        idempotency_key=idempotency_key,
        hf_token=hf_token,
        priority=priority,
        pinner=pinner,
    )
    if name and submission.created:
        submission.job.name = name
        session.commit()
    url = job_url(request, submission.job.id)
    response.headers["Location"] = url
    if not submission.created:
        response.headers["Idempotent-Replayed"] = "true"
    return job_out(submission.job, url=url)


@router.get("", response_model=JobList, summary="List jobs")
def list_merges(
    request: Request,
    session: SessionDep,
    caller: CurrentToken,
    status: JobStatus | None = None,
    kind: JobKind | None = None,
    batch_id: str | None = None,
    cursor: Annotated[str | None, Query(max_length=500)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> JobList:
    """The caller's jobs (all jobs for an admin), newest first; pass ``next_cursor`` back as ``cursor``."""
    rows, next_cursor = jobs.list_jobs(
        session, caller=caller, status=status, kind=kind, batch_id=batch_id, cursor=cursor, limit=limit
    )
    return JobList(
        items=[job_out(job, url=job_url(request, job.id)) for job in rows], next_cursor=next_cursor
    )


@router.get("/{job_id}", response_model=JobOut, summary="Get a job")
def get_merge(request: Request, job_id: str, session: SessionDep, caller: CurrentToken) -> JobOut:
    """Status, progress, timings, output location, and the error as problem details for a failed job."""
    return job_out(jobs.visible_job(session, job_id, caller=caller), url=job_url(request, job_id))


@router.get("/{job_id}/report", summary="Get a job's report", response_model=dict[str, Any])
def get_merge_report(job_id: str, session: SessionDep, caller: CurrentToken) -> dict[str, Any]:
    """The engine's report (sources, pinned revisions, per-tensor stats, timings); 409 until it exists."""
    job = jobs.visible_job(session, job_id, caller=caller)
    report = job.report
    if report is None:
        raise ReportNotReadyError(f"job {job_id} has no report yet (status {job.status})", status=job.status)
    return scrub(report)


@router.delete("/{job_id}", response_model=JobOut, summary="Cancel a job")
def cancel_merge(request: Request, job_id: str, session: SessionDep, caller: CurrentToken) -> JobOut:
    """A queued job is cancelled at once and never starts; a running one stops between tensors (watch
    ``cancel_requested`` then ``status``). 409 for a job that already succeeded or failed."""
    return job_out(jobs.cancel(session, job_id, caller=caller), url=job_url(request, job_id))


@router.post("/{job_id}/publish", status_code=202, response_model=JobOut, summary="Retry a failed Hub upload")
def retry_publish(
    request: Request,
    job_id: str,
    session: SessionDep,
    settings: SettingsDep,
    caller: CurrentToken,
    hf_token: HfToken,
) -> JobOut:
    """A merge whose Hub push failed keeps its finished folder (``output.path``): queue the upload again. The
    worker finds the complete output and pushes it (one new commit); nothing is merged again. 409 for a job that
    has no finished merge waiting for its upload."""
    job = jobs.retry_publish(session, job_id, caller=caller, settings=settings, hf_token=hf_token)
    return job_out(job, url=job_url(request, job_id))


@router.get("/{job_id}/files", response_model=OutputFiles, summary="List a job's output files")
def list_output_files(
    job_id: str, session: SessionDep, settings: SettingsDep, caller: CurrentToken
) -> OutputFiles:
    """The files of a finished merge's output folder with their sizes (shards, config, tokenizer, report, model
    card); 409 while the job has no output folder."""
    job = jobs.visible_job(session, job_id, caller=caller)
    folder = Path(job.output_path) if job.output_path else None
    if folder is None or not folder.is_dir():
        raise ReportNotReadyError(
            f"job {job_id} has no output folder (status {job.status})", status=job.status
        )
    # only what lies inside the data dirs is listed: a link out of them is the server's business, not the user's
    roots = [root.resolve() for root in settings.data_dirs]
    files = [
        OutputFile(name=str(path.relative_to(folder)), bytes=path.stat().st_size)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and any(path.resolve().is_relative_to(root) for root in roots)
    ]
    return OutputFiles(path=str(folder), files=files, total_bytes=sum(f.bytes for f in files))


def _snapshot(request: Request, job_id: str, caller: ApiToken) -> JobOut:
    with request.app.state.sessionmaker() as session:
        return job_out(jobs.visible_job(session, job_id, caller=caller), url=job_url(request, job_id))


async def _events(
    request: Request, first: JobOut, caller: ApiToken, poll_s: float, max_s: float
) -> AsyncIterator[str]:
    """``event: status`` with the job JSON each time it changes, until the job ends (the API reads only the DB)
    or ``max_s`` passes: a stream is bounded in time, and an EventSource client reconnects by itself."""
    current, last_sent, last_time = first, "", 0.0
    deadline = time.monotonic() + max_s
    while True:
        payload = current.model_dump_json()
        if payload != last_sent:
            yield f"event: status\nid: {int(time.time() * 1000)}\ndata: {payload}\n\n"
            last_sent, last_time = payload, time.monotonic()
        elif time.monotonic() - last_time > KEEPALIVE_S:
            yield ": keepalive\n\n"
            last_time = time.monotonic()
        if (
            current.status in TERMINAL_STATUSES
            or time.monotonic() > deadline
            or await request.is_disconnected()
        ):
            return
        await asyncio.sleep(poll_s)
        current = await run_in_threadpool(_snapshot, request, current.id, caller)


@router.get(
    "/{job_id}/events",
    summary="Stream job status (SSE)",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {
                "text/event-stream": {
                    # one SSE event; ``data`` is the job as GET /v1/merges/{id} returns it, as JSON text
                    "schema": {
                        "type": "object",
                        "properties": {
                            "event": {"type": "string", "enum": ["status"]},
                            "id": {"type": "string"},
                            "data": {"type": "string"},
                        },
                    }
                }
            },
            "description": "Server-Sent Events: `status` events carrying the job JSON.",
        }
    },
)
def stream_merge_events(
    request: Request, job_id: str, session: SessionDep, caller: CurrentToken, settings: SettingsDep
) -> StreamingResponse:
    """Server-Sent Events: an ``status`` event with the job (as GET /v1/merges/{id}) whenever it changes; the
    stream ends after the job reaches succeeded, failed or cancelled, or after ``ALLOY_EVENTS_MAX_S`` (reconnect
    to follow on)."""
    first = job_out(jobs.visible_job(session, job_id, caller=caller), url=job_url(request, job_id))
    return StreamingResponse(
        _events(request, first, caller, settings.events_poll_s, settings.events_max_s),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
