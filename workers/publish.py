"""The Hub push of a finished merge, on the ``io`` queue so a slow upload never holds a GPU worker.

The merge task leaves the row ``running`` with its report attached and sends ``alloy.publish_job``; the io worker
heartbeats the row while it pushes (one commit, ``HubClient.publish``) and then finishes it. A lost publish message
is recovered like any other: the reaper requeues the stale row, the merge task finds the output complete
(``completed_output``) and hands over again without recomputing.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from app import crud
from app.core.config import Settings, get_settings
from merge_ops.errors import MergeError
from merge_ops.recipe import Recipe, parse_source
from workers.pipeline import JobOutcome, JobTicker, RetryLater, _finish, _resolver, _session, retry_countdown

log = logging.getLogger(__name__)

PUBLISH_TASK = "alloy.publish_job"


def hand_over_to_publisher(
    job_id: str, *, output_path: str, report: dict[str, Any], hf_token: str | None, settings: Settings
) -> None:
    from workers.celery_app import IO_QUEUE, app

    with _session(settings) as session:
        crud.set_output(session, job_id=job_id, report=report)
        crud.heartbeat(session, job_id=job_id)
    kwargs: dict[str, Any] = {"output_path": output_path}
    if hf_token:
        kwargs["hf_token"] = hf_token
    app.send_task(
        PUBLISH_TASK,
        args=[job_id],
        kwargs=kwargs,
        queue=IO_QUEUE,
        routing_key=IO_QUEUE,
        kwargsrepr=repr({k: ("***" if k == "hf_token" else v) for k, v in kwargs.items()}),
    )


def publish_job(
    job_id: str,
    *,
    output_path: str,
    hf_token: str | None = None,
    attempt: int = 0,
    settings: Settings | None = None,
) -> JobOutcome:
    """Push ``output_path`` to the recipe's ``output.hub`` and finish the row with the commit and URL."""
    settings = settings or get_settings()
    with _session(settings) as session:
        job = crud.get_job(session, job_id=job_id)
        if job is None or job.status != "running":
            return JobOutcome(job_id, "skipped")
        recipe = Recipe.model_validate_json(job.recipe_json)
        owner = job.worker or ""
    hub_target = recipe.output.hub
    assert hub_target is not None, "publish_job is only sent for recipes with output.hub"
    ticker = JobTicker(job_id, worker=owner, settings=settings)
    ticker.start()
    try:
        client = _resolver(hf_token, settings)
        if client is None:
            raise MergeError("Hub publishing is not available: merge_ops.hub is missing")
        base = recipe.base or recipe.target_base
        base_model = None
        if base is not None and not isinstance(parse_source(base), Path):
            base_model = [parse_source(base).repo]  # type: ignore[union-attr]
        result = client.publish(Path(output_path), hub_target, base_model=base_model)
    except MergeError as exc:
        ticker.flush()
        if exc.transient and attempt + 1 < settings.max_attempts:
            raise RetryLater(exc.to_dict(), countdown=retry_countdown(attempt)) from exc
        # the merge itself is done: keep its folder on the row so the user sees it and can retry the upload
        _finish(settings, job_id, status="failed", error=exc.to_dict(), output_path=output_path)
        return JobOutcome(job_id, "failed", exc.code)
    except Exception as exc:
        ticker.flush()
        log.exception("job %s: publish failed", job_id)
        _finish(
            settings,
            job_id,
            status="failed",
            error={"code": "internal_error", "detail": f"{type(exc).__name__}: {exc}"},
            output_path=output_path,
        )
        return JobOutcome(job_id, "failed", "internal_error")
    ticker.flush()
    _finish(
        settings,
        job_id,
        status="succeeded",
        output_path=output_path,
        output_url=result.url,
        output_commit=result.commit_sha,
    )
    return JobOutcome(job_id, "succeeded")
