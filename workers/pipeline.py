"""``run_job``: one job, start to end, as a plain function (the Celery task only calls it).

The job row is the source of truth; the message carries only the id (and a Hub token, which never touches the
database). Order of events::

    claim (queued -> running, conditional: a redelivered or duplicate message exits here)
    -> run_merge in this thread; a ticker thread owns every DB write meanwhile: progress at most every
       progress_interval_s, a heartbeat every heartbeat_interval_s, and it reads cancel_requested
    -> finish: succeeded | cancelled | failed (typed error code + detail) | back to queued (transient error)

The merged folder is built in a job-scoped scratch folder next to the output and renamed into place by
run_merge; that scratch folder is wiped before each attempt and after it, so a killed attempt leaves nothing
behind once the job ends.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from app import crud
from app.core.config import Settings, get_settings
from app.db import get_engine, session_scope
from merge_ops.confine import check_files, check_recipe_files
from merge_ops.errors import MergeCancelled, MergeError, OutputError
from merge_ops.recipe import Recipe

log = logging.getLogger(__name__)

SCRATCH_DIRNAME = ".alloy-scratch"


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
    """Unique per attempt: host, pid and a nonce (a pid can be reused after a kill)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def default_output_dir(settings: Settings, job_id: str) -> Path:
    """Where a recipe without ``output.path`` lands: inside the first data dir, so the API may serve it."""
    return settings.data_dirs[0] / "merges" / job_id


def scratch_root_for(output_dir: Path, job_id: str) -> Path:
    # a sibling of the output, so the final rename never crosses filesystems
    return output_dir.parent / SCRATCH_DIRNAME / job_id


def remove_scratch(scratch: Path) -> None:
    shutil.rmtree(scratch, ignore_errors=True)
    with contextlib.suppress(OSError):
        scratch.parent.rmdir()  # only when no other job is using it


def retry_countdown(attempts: int, *, base_s: float = 2.0, cap_s: float = 300.0) -> float:
    """Exponential backoff with full jitter (AWS style), so retried jobs don't hit a recovering service at once."""
    return random.uniform(0.5, 1.0) * min(cap_s, base_s * 2 ** max(0, attempts))


def progress_interval(settings: Settings) -> float:
    return min(settings.progress_interval_s, settings.heartbeat_interval_s)


@contextmanager
def _session(settings: Settings) -> Iterator[Session]:
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

    def report(self, progress: Any) -> None:
        with self._lock:
            self._pending = progress

    def should_stop(self) -> bool:
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
        with _session(self.settings) as session:
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
            with _session(self.settings) as session:
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


def _finish(settings: Settings, job_id: str, *, status: str, **fields: Any) -> None:
    with _session(settings) as session:
        crud.finish_job(session, job_id=job_id, status=status, **fields)


def _resolver(hf_token: str | None, settings: Settings) -> Any:
    """A Hub client for ``hf://`` sources (the request's token, else the server's), or None without merge_ops.hub."""
    try:
        from merge_ops.hub import HubClient
    except ImportError:
        return None
    token = hf_token or (settings.hf_token.get_secret_value() if settings.hf_token else None)
    return HubClient(token=token, cache_dir=settings.hf_cache)


def pick_device() -> str:
    """One merge task per GPU: a prefork child uses the GPU of its pool index (``-c <gpus>``)."""
    explicit = os.environ.get("ALLOY_DEVICE")
    if explicit:
        return explicit
    try:
        import torch
    except ImportError:
        return "cpu"
    if not torch.cuda.is_available():
        return "cpu"
    try:
        from billiard.process import current_process

        index = getattr(current_process(), "index", 0) or 0
    except ImportError:
        index = 0
    return f"cuda:{index % torch.cuda.device_count()}"


def internal_error(exc: BaseException) -> dict[str, Any]:
    return {"code": "internal_error", "detail": f"{type(exc).__name__}: {exc}"}


def pin_sources(data: dict[str, Any], pinned: dict[str, str]) -> dict[str, Any]:
    """Replace Hub sources by the commit-pinned URIs resolved at submission (so a retry reads the same bytes)."""
    if not pinned:
        return data

    def pin(value: Any) -> Any:
        return pinned.get(value, value) if isinstance(value, str) else value

    out = dict(data)
    for key in ("base", "source_base", "source_finetuned", "target_base"):
        if key in out:
            out[key] = pin(out[key])
    if isinstance(out.get("models"), list):
        out["models"] = [
            {**m, "source": pin(m.get("source"))} if isinstance(m, dict) else pin(m) for m in out["models"]
        ]
    if isinstance(out.get("sources"), list):
        out["sources"] = [pin(s) for s in out["sources"]]
    return out


def completed_output(output_dir: Path, recipe: Recipe) -> dict[str, Any] | None:
    """The report of a finished merge of this recipe already at ``output_dir``: an earlier attempt renamed its
    output into place and died before recording it. run_merge renames only complete folders, so it is whole."""
    from merge_ops.pipeline import REPORT_NAME

    try:
        report = json.loads((output_dir / REPORT_NAME).read_text())
    except (OSError, ValueError):
        return None
    return report if report.get("recipe_digest") == recipe.digest() else None


def run_job(
    job_id: str,
    *,
    hf_token: str | None = None,
    settings: Settings | None = None,
    merge: Callable[..., Any] | None = None,
) -> JobOutcome:
    """Claim the job, run it, record the outcome. Raises ``RetryLater`` for transient errors (row requeued).

    ``merge`` defaults to ``merge_ops.pipeline.run_merge`` (imported lazily: importing this module stays cheap).
    """
    settings = settings or get_settings()
    worker = worker_identity()
    with _session(settings) as session:
        job = crud.claim_job(session, job_id=job_id, worker=worker)
        if job is None:
            # duplicate or redelivered message, cancelled while queued, or already finished: nothing to do
            log.info("job %s: not claimable, message dropped", job_id)
            return JobOutcome(job_id, "skipped")
        data = pin_sources(json.loads(job.recipe_json), job.pinned_sources)
        kind, attempts = job.kind, job.attempts or 0
    ticker = JobTicker(job_id, worker=worker, settings=settings)
    ticker.start()
    try:
        if kind == "analyze":
            return _run_analysis(job_id, data, hf_token=hf_token, settings=settings, ticker=ticker)
        return _run_merge_job(
            job_id, data, hf_token=hf_token, settings=settings, ticker=ticker, merge=merge, attempts=attempts
        )
    except MergeCancelled as exc:
        ticker.flush()
        if ticker.lost.is_set():
            log.warning("job %s: row taken over by another attempt; this one stops", job_id)
            return JobOutcome(job_id, "abandoned")
        _finish(settings, job_id, status="cancelled", error=exc.to_dict())
        return JobOutcome(job_id, "cancelled", exc.code)
    except MergeError as exc:
        ticker.flush()
        if ticker.lost.is_set():
            return JobOutcome(job_id, "abandoned")
        if exc.transient and attempts + 1 < settings.max_attempts:
            with _session(settings) as session:
                requeued = crud.requeue_job(session, job_id=job_id)
            if requeued:
                log.info("job %s: transient %s, retrying", job_id, exc.code)
                raise RetryLater(exc.to_dict(), countdown=retry_countdown(attempts)) from exc
        _finish(settings, job_id, status="failed", error=exc.to_dict())
        return JobOutcome(job_id, "failed", exc.code)
    except Exception as exc:
        # SoftTimeLimitExceeded, bugs, MemoryError: permanent, with the exception named on the row
        ticker.flush()
        if ticker.lost.is_set():
            return JobOutcome(job_id, "abandoned")
        error = _unexpected_error(exc, settings)
        _finish(settings, job_id, status="failed", error=error)
        return JobOutcome(job_id, "failed", error["code"])
    except BaseException:
        # the process is being shut down (SystemExit, KeyboardInterrupt): not the job's fault, so it goes back
        # to the queue (attempts += 1); the redelivered message or the reaper's re-send runs it again
        ticker.flush()
        if not ticker.lost.is_set():
            with _session(settings) as session:
                crud.requeue_job(session, job_id=job_id)
        raise
    finally:
        ticker.flush()


def _unexpected_error(exc: Exception, settings: Settings) -> dict[str, Any]:
    from celery.exceptions import SoftTimeLimitExceeded

    if isinstance(exc, SoftTimeLimitExceeded):
        return {
            "code": "time_limit_exceeded",
            "detail": f"the job ran longer than task_time_limit_s={settings.task_time_limit_s}",
        }
    log.error("unexpected error", exc_info=exc)
    return internal_error(exc)


def _validated_recipe(data: dict[str, Any]) -> Recipe:
    from pydantic import ValidationError

    from merge_ops.errors import RecipeError
    from merge_ops.recipe import recipe_error

    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:  # validated by the API; a row that no longer parses fails permanently
        raise recipe_error(exc) from None
    except ValueError as exc:
        raise RecipeError(f"stored recipe does not validate: {exc}", errors=[]) from None


def _run_merge_job(
    job_id: str,
    data: dict[str, Any],
    *,
    hf_token: str | None,
    settings: Settings,
    ticker: JobTicker,
    merge: Callable[..., Any] | None,
    attempts: int,
) -> JobOutcome:
    recipe = _validated_recipe(data)
    # again at run time: a link inside a source folder can change after submission
    check_recipe_files(recipe, roots=settings.data_dirs)
    output_dir = Path(recipe.output.path) if recipe.output.path else default_output_dir(settings, job_id)
    report = completed_output(output_dir, recipe) if attempts else None
    if report is None:
        scratch = scratch_root_for(output_dir, job_id)
        remove_scratch(scratch)  # leftovers of a killed attempt of this very job
        try:
            scratch.mkdir(parents=True, exist_ok=True)
        except (
            OSError
        ) as exc:  # e.g. the output path is under a file: the user's to fix, not an internal error
            raise OutputError(
                f"cannot create a folder next to the output {output_dir}: {exc.strerror or exc}; "
                "choose an output path under a writable folder",
                path=str(output_dir),
            ) from None
        if merge is None:
            from merge_ops.pipeline import run_merge

            merge = run_merge
        try:
            result = merge(
                recipe,
                output_dir=output_dir,
                resolver=_resolver(hf_token, settings),
                device=pick_device(),
                progress=ticker.report,
                should_cancel=ticker.should_stop,
                scratch_root=scratch,
            )
        finally:
            remove_scratch(scratch)
        report = json.loads(result.to_json())
    ticker.flush()
    if ticker.lost.is_set():
        # another attempt owns the row now (it will find this output complete and record it)
        return JobOutcome(job_id, "abandoned")
    output_path = str(report.get("output_path") or output_dir.resolve())
    if recipe.output.hub is not None:
        from workers.publish import hand_over_to_publisher

        hand_over_to_publisher(
            job_id, output_path=output_path, report=report, hf_token=hf_token, settings=settings
        )
        return JobOutcome(job_id, "publishing")
    _finish(settings, job_id, status="succeeded", output_path=output_path, report=report)
    return JobOutcome(job_id, "succeeded")


def _run_analysis(
    job_id: str, data: dict[str, Any], *, hf_token: str | None, settings: Settings, ticker: JobTicker
) -> JobOutcome:
    """An ``analyze`` job: task-vector statistics of ``sources`` against ``base`` (merge_ops.inspect)."""
    from merge_ops.errors import RecipeError
    from merge_ops.inspect import inspect_task_vectors

    base, sources = data.get("base"), data.get("sources") or data.get("models") or []
    if not base or not sources:
        raise RecipeError("an analysis needs a base and at least one source", errors=[])
    local = [(f"sources.{i}", str(s)) for i, s in enumerate(sources) if isinstance(s, str)] + [("base", base)]
    check_files(
        [(name, p) for name, p in local if isinstance(p, str) and not p.startswith("hf://")],
        roots=settings.data_dirs,
    )
    stats = inspect_task_vectors(
        base,
        list(sources),
        resolver=_resolver(hf_token, settings),
        allow_pickle=bool(data.get("allow_pickle")),
    )
    ticker.flush()
    if ticker.lost.is_set():
        return JobOutcome(job_id, "abandoned")
    _finish(settings, job_id, status="succeeded", report=stats)
    return JobOutcome(job_id, "succeeded")
