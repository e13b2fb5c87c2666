"""The reaper: the job row, not the broker, guarantees that every accepted job ends.

A broker can lose or delay an in-flight message (filesystem://: lost when the whole worker is SIGKILLed; Redis:
redelivered only after ``visibility_timeout``; Redis restarted without persistence: queued messages gone). Each
pass therefore:

* requeues running jobs whose heartbeat is older than ``heartbeat_stale_s`` (attempts += 1) and re-sends them,
  or fails them with ``worker_lost`` once ``max_attempts`` runs have died, so a job that kills its worker (OOM,
  segfault) stops instead of looping;
* re-sends queued jobs nobody claimed for ``queued_resend_s`` (a duplicate message is harmless: claim_job is a
  conditional update, the second message finds the row running or finished and exits).

Every worker runs a reaper thread (started on ``worker_ready``), so recovery happens as soon as any worker is up;
all writes are conditional, so several reapers are safe.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.pool import NullPool

from app import crud
from app.core.config import Settings, get_settings
from app.db import make_engine, session_scope
from app.models import Job, utcnow
from merge_ops.errors import MergeCancelled, WorkerLostError

log = logging.getLogger(__name__)


@dataclass
class ReapResult:
    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    resent: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, int]:
        return {key: len(value) for key, value in asdict(self).items()}


def queued_resend_s(settings: Settings) -> float:
    return settings.queued_resend_s


def reaper_interval_s(settings: Settings) -> float:
    return settings.reaper_interval_s


def worker_lost_error(attempts: int) -> dict[str, Any]:
    return WorkerLostError(
        f"the worker running this job stopped {attempts} times without finishing it (killed, out of memory, "
        "or its machine went away); giving up instead of retrying forever",
        attempts=attempts,
    ).to_dict()


def _cancelled_while_lost() -> dict[str, Any]:
    return MergeCancelled("cancelled; its worker stopped before it could acknowledge the cancel").to_dict()


def _remove_scratch_of(job: Job, settings: Settings) -> None:
    """A job that ends here leaves no partial shards behind (its attempt died mid-merge)."""
    from workers.pipeline import job_scratch, remove_scratch

    scratch = job_scratch(settings, job.id, job.recipe_json)
    if scratch is not None:
        remove_scratch(scratch)


def broker_uptime(settings: Settings) -> float | None:
    from app.core.queue import broker_uptime_s

    return broker_uptime_s(settings)


def _default_enqueue(job_id: str, *, priority: int, settings: Settings) -> None:
    from app.core.queue import enqueue_job

    enqueue_job(job_id, priority=priority, settings=settings)


def reap_once(
    settings: Settings | None = None,
    *,
    engine: Engine | None = None,
    enqueue: Callable[..., None] = _default_enqueue,
) -> ReapResult:
    settings = settings or get_settings()
    # NullPool: this runs in the prefork parent, whose children must not inherit open SQLite connections
    engine = engine or make_engine(settings.database_url, poolclass=NullPool)
    result = ReapResult()
    with session_scope(engine) as session:
        stale = crud.stale_running_jobs(
            session, older_than=settings.heartbeat_stale_s, handed_over_older_than=settings.publish_wait_s
        )
        for job in stale:
            runs = (job.attempts or 0) + 1  # this run died too
            if job.cancel_requested:
                # cancelled, then its worker died before it could stop: no worker may claim it again, so it
                # ends here (it used to go back to queued, unclaimable, re-sent forever)
                if crud.finish_job(session, job_id=job.id, status="cancelled", error=_cancelled_while_lost()):
                    log.warning("job %s: cancelled and its worker lost: cancelled", job.id)
                    result.cancelled.append(job.id)
                    _remove_scratch_of(job, settings)
            elif runs >= settings.max_attempts:
                if crud.finish_job(session, job_id=job.id, status="failed", error=worker_lost_error(runs)):
                    log.warning("job %s: worker lost %d times, failed", job.id, runs)
                    result.failed.append(job.id)
                    _remove_scratch_of(job, settings)
            elif crud.requeue_job(session, job_id=job.id):
                log.warning("job %s: heartbeat stale, requeued (attempt %d)", job.id, runs + 1)
                result.requeued.append(job.id)
        # a job requeued (worker shutdown) after its cancel was asked for: claim refuses it, so end it here
        for job in session.scalars(select(Job).where(Job.status == "queued", Job.cancel_requested.is_(True))):
            if crud.finish_job(session, job_id=job.id, status="cancelled", error=_cancelled_while_lost()):
                result.cancelled.append(job.id)
                _remove_scratch_of(job, settings)
        cutoff = utcnow() - timedelta(seconds=queued_resend_s(settings))
        # queued jobs not claimed for a while, and every queued job sent before the broker (re)started: a Redis
        # restart without persistence lost their messages, so they are re-sent now, not after the cutoff
        uptime = broker_uptime(settings)
        # uptime is whole seconds on Redis's whole-second clock, so the estimate below lies up to 2 s before the
        # real start: no job sent after the start is re-sent; one sent just before it waits for the cutoff
        broker_start = utcnow() - timedelta(seconds=uptime + 1) if uptime is not None else None
        since = cutoff if broker_start is None else max(cutoff, broker_start)
        stale_queued = session.scalars(
            select(Job).where(Job.status == "queued", Job.created_at < since).order_by(Job.priority.desc())
        ).all()
        session.commit()
        priorities = {job.id: job.priority for job in stale_queued}
        priorities.update({job_id: _priority(session, job_id) for job_id in result.requeued})
    for job_id in result.requeued:
        if _send(enqueue, job_id, priorities[job_id], settings):
            _last_resend[job_id] = time.monotonic()
    restarted = time.monotonic() - uptime - 1 if uptime is not None else None
    for job in stale_queued:
        lost_in_restart = (
            restarted is not None
            and broker_start is not None
            and job.created_at < broker_start
            and _last_resend.get(job.id, float("-inf")) < restarted
        )
        if lost_in_restart:
            _last_resend.pop(job.id, None)
        due = job.id not in result.requeued and _resend_due(job.id, settings)
        if due and _send(enqueue, job.id, job.priority, settings):
            result.resent.append(job.id)
    return result


def _priority(session: Any, job_id: str) -> int:
    job = crud.get_job(session, job_id=job_id)
    return job.priority if job is not None else 5


# in-process memory of the last re-send per queued job, so a long backlog is not re-sent every pass
_last_resend: dict[str, float] = {}


def _resend_due(job_id: str, settings: Settings) -> bool:
    now = time.monotonic()
    last = _last_resend.get(job_id)
    if last is not None and now - last < queued_resend_s(settings):
        return False
    _last_resend[job_id] = now
    if len(_last_resend) > 100_000:
        _last_resend.clear()
    return True


def _send(enqueue: Callable[..., None], job_id: str, priority: int, settings: Settings) -> bool:
    try:
        enqueue(job_id, priority=priority, settings=settings)
        return True
    except Exception:  # broker down: the row stays queued and the next pass re-sends it
        log.warning("job %s: re-send failed; will retry", job_id, exc_info=True)
        _last_resend.pop(job_id, None)
        return False


class _ReaperThread(threading.Thread):
    def __init__(self, settings: Settings) -> None:
        super().__init__(name="alloy-reaper", daemon=True)
        self.settings = settings
        self.stop_event = threading.Event()
        self.engine = make_engine(settings.database_url, poolclass=NullPool)

    def run(self) -> None:
        interval = reaper_interval_s(self.settings)
        while not self.stop_event.wait(interval):
            try:
                outcome = reap_once(self.settings, engine=self.engine)
                if outcome.requeued or outcome.failed or outcome.resent:
                    log.info("reaper: %s", outcome.as_dict())
            except Exception:
                log.warning("reaper pass failed", exc_info=True)


_thread: _ReaperThread | None = None


def start_reaper_thread(settings: Settings) -> None:
    global _thread
    if _thread is None or not _thread.is_alive():
        _thread = _ReaperThread(settings)
        _thread.start()


def stop_reaper_thread() -> None:
    global _thread
    if _thread is not None:
        _thread.stop_event.set()
        _thread = None
