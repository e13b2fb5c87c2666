"""Job-store operations shared by the API and the workers.

Every function takes the session as its first argument and opens none itself. Writers commit before returning,
so a worker's claim, progress and finish are durable at once and visible to the API (which reads only the DB).
State changes are conditional UPDATEs (``WHERE status = ...``): a redelivered message or a racing reaper finds
the row already moved and gets ``None``/``False`` instead of running a job twice.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, and_, or_, select, update
from sqlalchemy.orm import Session

from app.models import ACTIVE_STATUSES, TERMINAL_STATUSES, Job, utcnow


def _execute(session: Session, statement: Any) -> CursorResult[Any]:
    """Run a DML statement; its result carries ``rowcount`` (how many rows the condition matched)."""
    return cast(CursorResult[Any], session.execute(statement))


def get_job(session: Session, *, job_id: str) -> Job | None:
    return session.get(Job, job_id, populate_existing=True)


def claim_job(session: Session, *, job_id: str, worker: str) -> Job | None:
    """queued -> running, only if still queued and not asked to cancel; None when not claimable."""
    now = utcnow()
    result = _execute(
        session,
        update(Job)
        .where(Job.id == job_id, Job.status == "queued", Job.cancel_requested.is_(False))
        .values(
            status="running",
            worker=worker,
            started_at=now,
            heartbeat_at=now,
            finished_at=None,
            tensors_done=0,
            bytes_done=0,
            eta_s=None,
        )
        .execution_options(synchronize_session=False),
    )
    session.commit()
    if result.rowcount != 1:
        return None
    return get_job(session, job_id=job_id)


def record_progress(
    session: Session,
    *,
    job_id: str,
    done: int,
    total: int | None,
    bytes_done: int = 0,
    bytes_total: int | None = None,
    eta_s: float | None = None,
    phase: str | None = None,
) -> bool:
    """Progress of a running job; doubles as its heartbeat. False when the job is no longer running."""
    result = _execute(
        session,
        update(Job)
        .where(Job.id == job_id, Job.status == "running")
        .values(
            tensors_done=done,
            tensors_total=total,
            bytes_done=bytes_done,
            bytes_total=bytes_total,
            eta_s=eta_s,
            progress_phase=phase,
            heartbeat_at=utcnow(),
        )
        .execution_options(synchronize_session=False),
    )
    session.commit()
    return result.rowcount == 1


def heartbeat(session: Session, *, job_id: str) -> bool:
    result = _execute(
        session,
        update(Job)
        .where(Job.id == job_id, Job.status == "running")
        .values(heartbeat_at=utcnow())
        .execution_options(synchronize_session=False),
    )
    session.commit()
    return result.rowcount == 1


def _report_text(report: Any) -> str | None:
    if report is None:
        return None
    if isinstance(report, str):
        return report
    if hasattr(report, "to_json"):
        return report.to_json()
    if hasattr(report, "model_dump_json"):
        return report.model_dump_json()
    return json.dumps(report)


def finish_job(
    session: Session,
    *,
    job_id: str,
    status: str,
    output_path: str | None = None,
    output_url: str | None = None,
    output_commit: str | None = None,
    report: Any = None,
    error: Mapping[str, Any] | None = None,
) -> bool:
    """Move an active job to a terminal status. ``error`` is ``MergeError.to_dict()``; ``report`` a dict, JSON
    text or an object with ``to_json()``. False when the job had already ended."""
    if status not in TERMINAL_STATUSES:
        raise ValueError(f"finish_job needs a terminal status, not {status!r}")
    job = get_job(session, job_id=job_id)
    if job is None:
        return False
    now = utcnow()
    values: dict[str, Any] = {"status": status, "finished_at": now, "eta_s": None}
    if job.started_at is not None:
        values["duration_s"] = (now - job.started_at).total_seconds()
    if status == "succeeded" and job.tensors_total is not None:
        values["tensors_done"] = job.tensors_total
    for key, value in {
        "output_path": output_path,
        "output_url": output_url,
        "output_commit": output_commit,
        "report_json": _report_text(report),
    }.items():
        if value is not None:
            values[key] = str(value) if key == "output_path" else value
    if error is not None:
        values["error_code"] = str(error.get("code", "merge_error"))
        values["error_detail"] = str(error.get("detail", ""))
        context = error.get("context")
        values["error_context_json"] = json.dumps(context, default=str) if context else None
    result = _execute(
        session,
        update(Job)
        .where(Job.id == job_id, Job.status.in_(ACTIVE_STATUSES))
        .values(**values)
        .execution_options(synchronize_session=False),
    )
    session.commit()
    return result.rowcount == 1


def set_output(
    session: Session,
    *,
    job_id: str,
    output_url: str | None = None,
    output_commit: str | None = None,
    report: Any = None,
) -> None:
    """Attach a later result (a Hub push on the io queue) to a job, whatever its status."""
    values: dict[str, Any] = {}
    if output_url is not None:
        values["output_url"] = output_url
    if output_commit is not None:
        values["output_commit"] = output_commit
    if report is not None:
        values["report_json"] = _report_text(report)
    if values:
        session.execute(
            update(Job).where(Job.id == job_id).values(**values).execution_options(synchronize_session=False)
        )
        session.commit()


def is_cancel_requested(session: Session, *, job_id: str) -> bool:
    row = session.execute(select(Job.cancel_requested, Job.status).where(Job.id == job_id)).one_or_none()
    session.commit()  # end the read transaction so the next poll sees fresh data
    return row is None or bool(row.cancel_requested) or row.status == "cancelled"


def cancel_job(session: Session, *, job_id: str) -> str | None:
    """queued -> cancelled at once (it never starts); running -> cancel_requested (the worker stops between
    tensors). Returns the status after the call, or None if the job does not exist."""
    now = utcnow()
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "queued")
        .values(
            status="cancelled",
            cancel_requested=True,
            finished_at=now,
            error_code="cancelled",
            error_detail="cancelled before it started",
        )
        .execution_options(synchronize_session=False)
    )
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "running")
        .values(cancel_requested=True)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    job = get_job(session, job_id=job_id)
    return job.status if job is not None else None


def stale_running_jobs(
    session: Session,
    *,
    older_than: datetime | timedelta | float,
    handed_over_older_than: datetime | timedelta | float | None = None,
) -> list[Job]:
    """Running jobs whose heartbeat (or start) is older than a cutoff: a datetime, or an age (timedelta/seconds).
    A merge handed over to the publisher (its report recorded, waiting in the io queue) has a cutoff of its own,
    ``handed_over_older_than`` (default: the same)."""
    cutoff = _cutoff(older_than)
    handed_over = _cutoff(handed_over_older_than) if handed_over_older_than is not None else cutoff
    rows = session.scalars(
        select(Job)
        .where(
            Job.status == "running",
            or_(
                and_(Job.report_json.is_(None), Job.heartbeat_at < cutoff),
                and_(Job.report_json.is_not(None), Job.heartbeat_at < handed_over),
            ),
        )
        .order_by(Job.heartbeat_at)
    ).all()
    session.commit()
    return list(rows)


def _cutoff(older_than: datetime | timedelta | float) -> datetime:
    if isinstance(older_than, datetime):
        return older_than
    age = older_than if isinstance(older_than, timedelta) else timedelta(seconds=float(older_than))
    return utcnow() - age


def reopen_failed_job(session: Session, *, job_id: str) -> bool:
    """failed -> queued, attempts += 1 (>= 1: the worker then looks for the finished output before merging)."""
    result = _execute(
        session,
        update(Job)
        .where(Job.id == job_id, Job.status == "failed")
        .values(
            status="queued",
            attempts=Job.attempts + 1,
            error_code=None,
            error_detail=None,
            error_context_json=None,
            finished_at=None,
            cancel_requested=False,
            worker=None,
            heartbeat_at=None,
        )
        .execution_options(synchronize_session=False),
    )
    session.commit()
    return result.rowcount == 1


def requeue_job(session: Session, *, job_id: str, worker: str | None = None) -> bool:
    """running -> queued with attempts += 1 (the reaper re-enqueues it after this returns True); with
    ``worker``, only while that attempt still owns the row."""
    owned = [Job.worker == worker] if worker is not None else []
    result = _execute(
        session,
        update(Job)
        .where(Job.id == job_id, Job.status == "running", *owned)
        .values(status="queued", attempts=Job.attempts + 1, worker=None, heartbeat_at=None)
        .execution_options(synchronize_session=False),
    )
    session.commit()
    return result.rowcount == 1
