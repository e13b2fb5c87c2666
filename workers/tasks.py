"""Thin Celery tasks: each calls one plain function and maps ``RetryLater`` to a delayed re-send.

The job row, not Celery, records outcomes (``task_ignore_result``). A task body never raises for a job that
failed: the row says so, and the message is acknowledged.
"""

from __future__ import annotations

from typing import Any

from app.core.queue import PUBLISH_JOB_TASK, REAP_TASK, RUN_JOB_TASK
from workers import pipeline
from workers.celery_app import app
from workers.job_row import RetryLater


@app.task(name=RUN_JOB_TASK, bind=True, max_retries=None)
def run_job_task(self: Any, job_id: str, hf_token: str | None = None) -> str:
    try:
        return pipeline.run_job(job_id, hf_token=hf_token).status
    except RetryLater as exc:
        # the row is back in queued; re-send with backoff (attempts on the row bound the retries)
        raise self.retry(countdown=exc.countdown, exc=None) from None


@app.task(name=PUBLISH_JOB_TASK, bind=True, max_retries=None)
def publish_job_task(self: Any, job_id: str, output_path: str, hf_token: str | None = None) -> str:
    from workers.publish import push_to_hub

    try:
        return push_to_hub(
            job_id, output_path=output_path, hf_token=hf_token, attempt=self.request.retries
        ).status
    except RetryLater as exc:
        raise self.retry(countdown=exc.countdown, exc=None) from None


@app.task(name=REAP_TASK)
def reap_task() -> dict[str, int]:
    """One reaper pass, for deployments that prefer celery beat to the per-worker reaper thread."""
    from workers.reaper import reap_once

    return reap_once().as_dict()
