"""The job row, owned in one place: its session, the claim, the ticker that writes it while a job runs, its
finish, and the one mapping from an attempt's exceptions to the row's outcome (``settle``).

The row is the source of truth; a Celery message carries only the id (and a Hub token, which never touches the
database). Both tasks (``workers.pipeline.run_job``, ``workers.publish.publish_job``) go through ``settle``.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from app import crud
from app.core.config import Settings
from app.db import get_engine, session_scope
from merge_ops.errors import InternalError, MergeCancelled, MergeError, TimeLimitExceededError
from workers.celery_app import soft_time_limit_s

log = logging.getLogger(__name__)


class RetryLater(Exception):
    """A transient error: the row is back in ``queued``; the task re-sends itself after ``countdown`` seconds."""

    def __init__(self, error: dict[str, Any], *, countdown: float) -> None:
        super().__init__(error.get("detail", "transient error"))
        self.error = error
        self.countdown = countdown


@dataclass(frozen=True)
class JobOutcome:
    job_id: str
    status: str  # succeeded | failed | cancelled | skipped | abandoned
    error_code: str | None = None


def worker_identity() -> str:
    """Unique per attempt: host, pid namespace, pid and a nonce (a pid can be reused after a kill)."""
    return f"{_this_machine()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _this_machine() -> str:
    # the pid namespace tells two containers with one hostname apart: a pid means something only inside it
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = 0
    return f"{socket.gethostname()}/{namespace}"


def _died_here(worker: str | None) -> bool:
    """Whether ``worker`` (an identity from ``worker_identity``) was an attempt on this machine whose process is
    gone: then its row can be taken over at once, without waiting for the heartbeat to go stale."""
    machine, _, rest = (worker or "").rpartition(":")[0].rpartition(":")
    if machine != _this_machine() or not rest.isdigit():
        return False
    try:
        os.kill(int(rest), 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, owned by another user
        return False
    return False


def retry_countdown(attempts: int, *, base_s: float = 2.0, cap_s: float = 300.0) -> float:
    """Exponential backoff with full jitter (AWS style), so retried jobs don't hit a recovering service at once."""
    return random.uniform(0.5, 1.0) * min(cap_s, base_s * 2 ** max(0, attempts))


def progress_interval(settings: Settings) -> float:
    return min(settings.progress_interval_s, settings.heartbeat_interval_s)


@contextmanager
def job_session(settings: Settings) -> Iterator[Session]:
    # crud functions commit their own writes; the scope rolls back and closes
    with session_scope(get_engine(settings.database_url)) as session:
        yield session


class JobTicker(threading.Thread):
    """The only writer of the row while the merge runs: progress (rate-limited), heartbeat, cancel flag.

    The merge thread never waits on the database; it hands the latest progress over and reads two events.
    ``lost`` is set when the row is no longer ours (the reaper requeued it, or another attempt claimed it), so
    this attempt stops without touching the row again.
    """

    def __init__(self, job_id: str, *, worker: str, settings: Settings) -> None:
        super().__init__(name=f"alloy-ticker-{job_id[:8]}", daemon=True)
        self.job_id = job_id
        self.worker = worker
        self.settings = settings
        self.cancel = threading.Event()
        self.lost = threading.Event()
        self._stop_event = threading.Event()
        self._lock = threading.Lock()
        self._pending: Any = None
        self._interval = progress_interval(settings)
        self._deadline = time.monotonic() + soft_time_limit_s(settings.task_time_limit_s)

    def report(self, progress: Any) -> None:
        with self._lock:
            self._pending = progress

    def should_stop(self) -> bool:
        """Whether the merge should stop (cancelled, or the row is no longer ours). Past the soft time limit it
        raises Celery's ``SoftTimeLimitExceeded`` itself: the limit's signal can land where Python drops the
        exception (a weakref callback, a library's broad ``except``), and the merge asks here before each tensor."""
        if time.monotonic() > self._deadline:
            from celery.exceptions import SoftTimeLimitExceeded

            raise SoftTimeLimitExceeded()
        return self.cancel.is_set() or self.lost.is_set()

    def run(self) -> None:
        last_beat = time.monotonic()
        while not self._stop_event.wait(self._interval):
            try:
                last_beat = self._tick(last_beat)
            except Exception:  # a DB hiccup must not kill the merge; the next tick retries
                log.warning("job %s: progress/heartbeat write failed", self.job_id, exc_info=True)

    def _tick(self, last_beat: float) -> float:
        with self._lock:
            progress, self._pending = self._pending, None
        now = time.monotonic()
        with job_session(self.settings) as session:
            if not _still_ours(session, self.job_id, self.worker):
                self.lost.set()
                return now
            if progress is not None:
                write_progress(session, self.job_id, progress)
                last_beat = now
            elif now - last_beat >= self.settings.heartbeat_interval_s:
                crud.heartbeat(session, job_id=self.job_id)
                last_beat = now
            if crud.is_cancel_requested(session, job_id=self.job_id):
                self.cancel.set()
        return last_beat

    def flush(self) -> None:
        """Stop ticking and write the last progress (so a finished job shows done == total)."""
        self._stop_event.set()
        self.join(timeout=30)
        with self._lock:
            progress, self._pending = self._pending, None
        if progress is not None and not self.lost.is_set():
            with job_session(self.settings) as session:
                write_progress(session, self.job_id, progress)


def write_progress(session: Session, job_id: str, progress: Any) -> None:
    crud.record_progress(
        session,
        job_id=job_id,
        done=progress.tensors_done,
        total=progress.tensors_total,
        bytes_done=progress.bytes_done,
        bytes_total=progress.bytes_total,
        eta_s=progress.eta_s,
        phase=getattr(progress, "phase", None),
    )


def _still_ours(session: Session, job_id: str, worker: str) -> bool:
    job = crud.get_job(session, job_id=job_id)
    if job is None or job.status != "running":
        return False
    owner = getattr(job, "worker", None)
    return owner is None or owner == worker


def finish(settings: Settings, job_id: str, *, status: str, **fields: Any) -> None:
    with job_session(settings) as session:
        crud.finish_job(session, job_id=job_id, status=status, **fields)


def hub_client_for(hf_token: str | None, settings: Settings) -> Any:
    """A Hub client for ``hf://`` sources (the request's token, else the server's), or None without merge_ops.hub."""
    try:
        from merge_ops.hub import HubClient
    except ImportError:
        return None
    token = hf_token or (settings.hf_token.get_secret_value() if settings.hf_token else None)
    return HubClient(token=token, cache_dir=settings.hf_cache)


def claim(settings: Settings, job_id: str, *, worker: str) -> Any:
    """queued -> running for this attempt; None when the row is not claimable (a duplicate or redelivered
    message, cancelled while queued, already finished, or running in a live attempt).

    A row still running under an attempt of this machine whose process is gone (a killed pool child: Celery
    redelivers its message at once) is requeued and claimed now, not after the heartbeat goes stale; the
    requeue is conditional on that attempt still owning the row, so two live attempts never run one job."""
    with job_session(settings) as session:
        job = crud.claim_job(session, job_id=job_id, worker=worker)
        if job is None:
            current = crud.get_job(session, job_id=job_id)
            if current is not None and current.status == "running" and _died_here(current.worker):
                lost = current.worker
                if not current.cancel_requested and crud.requeue_job(session, job_id=job_id, worker=lost):
                    log.warning("job %s: its attempt %s died on this machine; taking it over", job_id, lost)
                    job = crud.claim_job(session, job_id=job_id, worker=worker)
        if job is not None:
            session.expunge(job)
        return job


def requeue(settings: Settings, job_id: str) -> bool:
    with job_session(settings) as session:
        return crud.requeue_job(session, job_id=job_id)


def settle(
    job_id: str,
    body: Callable[[], JobOutcome],
    *,
    settings: Settings,
    ticker: JobTicker,
    attempts: int,
    requeue_transient: bool = True,
    failed_fields: dict[str, Any] | None = None,
) -> JobOutcome:
    """Run one attempt's ``body`` and record its outcome on the row: the one mapping from exceptions to outcomes.

    cancelled -> ``cancelled``; a transient MergeError with attempts left -> ``RetryLater`` (the row back in
    ``queued`` first when ``requeue_transient``: a publish retry keeps its row running); any other MergeError ->
    ``failed`` with its code; any other exception -> ``failed`` as ``internal_error`` or
    ``time_limit_exceeded``; a process shutdown (SystemExit, KeyboardInterrupt) -> back to ``queued``, re-raised.
    ``failed_fields`` are written with a failure (a failed push keeps the merged folder's path). When the ticker
    finds the row taken over by another attempt, this one stops without touching it."""
    try:
        return body()
    except BaseException as exc:
        ticker.flush()
        if ticker.lost.is_set():
            log.warning("job %s: row taken over by another attempt; this one stops", job_id)
            if isinstance(exc, Exception):
                return JobOutcome(job_id, "abandoned")
            raise
        if not isinstance(exc, Exception):
            # not the job's fault: it goes back to the queue (attempts += 1) for the redelivered message or the
            # reaper's re-send
            requeue(settings, job_id)
            raise
        error = _as_merge_error(exc, settings)
        if isinstance(error, MergeCancelled):
            finish(settings, job_id, status="cancelled", error=error.to_dict())
            return JobOutcome(job_id, "cancelled", error.code)
        retry = error.transient and attempts + 1 < settings.max_attempts
        if retry and (not requeue_transient or requeue(settings, job_id)):
            log.info("job %s: transient %s, retrying", job_id, error.code)
            raise RetryLater(error.to_dict(), countdown=retry_countdown(attempts)) from exc
        finish(settings, job_id, status="failed", error=error.to_dict(), **(failed_fields or {}))
        return JobOutcome(job_id, "failed", error.code)
    finally:
        ticker.flush()


def _as_merge_error(exc: Exception, settings: Settings) -> MergeError:
    if isinstance(exc, MergeError):
        return exc
    from celery.exceptions import SoftTimeLimitExceeded

    if isinstance(exc, SoftTimeLimitExceeded):
        return TimeLimitExceededError(
            f"the job ran longer than task_time_limit_s={settings.task_time_limit_s}"
        )
    log.error("unexpected error", exc_info=exc)
    return InternalError.wrapping(exc)
