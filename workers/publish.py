"""The Hub push of a finished merge, on the ``io`` queue so a slow upload never holds a GPU worker.

The merge task leaves the row ``running`` with its report attached and sends ``alloy.publish_job``
(``hand_over_to_publisher``); the io worker heartbeats the row while it pushes (one commit,
``merge_ops.hub.publish_merge``, the CLI's publish too) and then finishes it. A lost publish message is recovered
like any other: the reaper requeues the stale row, the merge task finds the output complete
(``completed_output``) and hands over again without recomputing.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from app import crud
from app.core.config import Settings, get_settings
from app.core.queue import enqueue_publish
from merge_ops.errors import MergeError
from merge_ops.recipe import Recipe
from workers.job_row import JobOutcome, JobTicker, finish, hub_client_for, job_session, settle

log = logging.getLogger(__name__)


def hand_over_to_publisher(
    job_id: str, *, output_path: str, report: dict[str, Any], hf_token: str | None, settings: Settings
) -> None:
    with job_session(settings) as session:
        crud.set_output(session, job_id=job_id, report=report)
        crud.heartbeat(session, job_id=job_id)
    enqueue_publish(job_id, output_path=output_path, hf_token=hf_token, settings=settings)


def push_to_hub(
    job_id: str,
    *,
    output_path: str,
    hf_token: str | None = None,
    attempt: int = 0,
    settings: Settings | None = None,
) -> JobOutcome:
    """Push ``output_path`` to the recipe's ``output.hub`` and finish the row with the commit and URL."""
    settings = settings or get_settings()
    with job_session(settings) as session:
        job = crud.get_job(session, job_id=job_id)
        if job is None or job.status != "running":
            return JobOutcome(job_id, "skipped")
        recipe = Recipe.model_validate_json(job.recipe_json)
        owner = job.worker or ""
    ticker = JobTicker(job_id, worker=owner, settings=settings)
    ticker.start()

    def body() -> JobOutcome:
        from merge_ops.hub import publish_merge

        client = hub_client_for(hf_token, settings)
        if client is None:
            raise MergeError("Hub publishing is not available: merge_ops.hub is missing")
        result = publish_merge(client, Path(output_path), recipe)
        ticker.flush()
        finish(
            settings,
            job_id,
            status="succeeded",
            output_path=output_path,
            output_url=result.url,
            output_commit=result.commit_sha,
        )
        return JobOutcome(job_id, "succeeded")

    # a transient Hub error retries this task (the row stays running, heartbeated), not the merge; a failed
    # push keeps the finished merge's folder on the row, so the user sees it and can retry the upload alone
    return settle(
        job_id,
        body,
        settings=settings,
        ticker=ticker,
        attempts=attempt,
        requeue_transient=False,
        failed_fields={"output_path": output_path},
    )
