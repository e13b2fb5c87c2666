"""``run_job``: one merge or analysis job, start to end, as a plain function (the Celery task only calls it).

Order of events (the row's writes are ``workers.job_row``'s)::

    claim (queued -> running, conditional: a redelivered or duplicate message exits here)
    -> run_merge in this thread; the job row's ticker thread owns every DB write meanwhile: progress at most
       every progress_interval_s, a heartbeat every heartbeat_interval_s, and it reads cancel_requested
    -> settle: succeeded | cancelled | failed (typed error code + detail) | back to queued (transient error)
    -> with output.hub: handed to the io queue (``workers.publish``), which finishes the row

The merged folder is built in a job-scoped scratch folder next to the output and renamed into place by
run_merge; that scratch folder is wiped before each attempt and after it, so a killed attempt leaves nothing
behind once the job ends.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from app.core.config import Settings, get_settings
from merge_ops.confine import check_files, check_recipe_files
from merge_ops.errors import OutputError
from merge_ops.recipe import Recipe
from workers.job_row import (
    JobOutcome,
    JobTicker,
    claim,
    finish,
    hub_client_for,
    settle,
    worker_identity,
)

log = logging.getLogger(__name__)

SCRATCH_DIRNAME = ".alloy-scratch"


def default_output_dir(settings: Settings, job_id: str) -> Path:
    """Where a recipe without ``output.path`` lands: inside the first data dir, so the API may serve it."""
    return settings.data_dirs[0] / "merges" / job_id


def scratch_root_for(output_dir: Path, job_id: str) -> Path:
    # a sibling of the output, so the final rename never crosses filesystems
    return output_dir.parent / SCRATCH_DIRNAME / job_id


def job_scratch(settings: Settings, job_id: str, recipe_json: str) -> Path | None:
    """The scratch folder of a merge job's attempts (None for a row whose recipe is not a merge recipe)."""
    try:
        output = (json.loads(recipe_json).get("output") or {}).get("path")
    except (ValueError, AttributeError):
        return None
    return scratch_root_for(Path(output) if output else default_output_dir(settings, job_id), job_id)


def remove_scratch(scratch: Path) -> None:
    shutil.rmtree(scratch, ignore_errors=True)
    with contextlib.suppress(OSError):
        scratch.parent.rmdir()  # only when no other job is using it


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
    job = claim(settings, job_id, worker=worker)
    if job is None:
        log.info("job %s: not claimable, message dropped", job_id)
        return JobOutcome(job_id, "skipped")
    data = json.loads(job.recipe_json)  # Hub sources were pinned into it at submission
    kind, attempts = job.kind, job.attempts or 0
    ticker = JobTicker(job_id, worker=worker, settings=settings)
    ticker.start()

    def body() -> JobOutcome:
        if kind == "analyze":
            return _run_analysis(job_id, data, hf_token=hf_token, settings=settings, ticker=ticker)
        return _run_merge_job(
            job_id, data, hf_token=hf_token, settings=settings, ticker=ticker, merge=merge, attempts=attempts
        )

    return settle(job_id, body, settings=settings, ticker=ticker, attempts=attempts)


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
                resolver=hub_client_for(hf_token, settings),
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
    finish(settings, job_id, status="succeeded", output_path=output_path, report=report)
    return JobOutcome(job_id, "succeeded")


def _run_analysis(
    job_id: str, data: dict[str, Any], *, hf_token: str | None, settings: Settings, ticker: JobTicker
) -> JobOutcome:
    """An ``analyze`` job: task-vector statistics of ``sources`` against ``base`` (merge_ops.analysis)."""
    from merge_ops.analysis import inspect_task_vectors
    from merge_ops.errors import RecipeError

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
        resolver=hub_client_for(hf_token, settings),
        allow_pickle=bool(data.get("allow_pickle")),
    )
    ticker.flush()
    if ticker.lost.is_set():
        return JobOutcome(job_id, "abandoned")
    finish(settings, job_id, status="succeeded", report=stats)
    return JobOutcome(job_id, "succeeded")
