"""workers.pipeline.run_job in-process against a real SQLite job store and the real merge engine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from app import crud
from app.models import Job
from merge_ops.errors import HubTransientError, SourceNotFoundError
from workers.job_row import RetryLater
from workers.pipeline import run_job

from .helpers import (
    assert_output_matches,
    expected_task_arithmetic,
    make_models,
    stray_files,
    task_arithmetic_recipe,
)


@pytest.fixture
def models(tmp_path: Path, alloy_settings: Any) -> tuple[Path, list[Path]]:
    return make_models(alloy_settings.data_dirs[0] / "models")


def test_run_job_merges_records_progress_and_report(job_store, alloy_settings, models):
    base, fts = models
    out = alloy_settings.data_dirs[0] / "out"
    job_id = job_store.insert_job(task_arithmetic_recipe(base, fts, out, lam=0.5, weights=[1.0, 0.5]))
    outcome = run_job(job_id, settings=alloy_settings)
    assert outcome.status == "succeeded"
    job = job_store.job(job_id)
    assert job.status == "succeeded" and job.error_code is None
    assert Path(job.output_path) == out.resolve()
    assert job.tensors_total and job.tensors_done == job.tensors_total
    assert job.report["method"] == "task_arithmetic"
    assert_output_matches(out, expected_task_arithmetic(base, fts, lam=0.5, weights=[1.0, 0.5]))
    assert stray_files(alloy_settings.data_dirs[0]) == []


def test_recipe_without_output_path_lands_in_the_data_dir(job_store, alloy_settings, models):
    base, fts = models
    job_id = job_store.insert_job(task_arithmetic_recipe(base, fts, None))
    assert run_job(job_id, settings=alloy_settings).status == "succeeded"
    assert (
        Path(job_store.job(job_id).output_path) == (alloy_settings.data_dirs[0] / "merges" / job_id).resolve()
    )


def test_redelivered_message_for_a_claimed_or_finished_job_exits_cleanly(job_store, alloy_settings, models):
    base, fts = models
    job_id = job_store.insert_job(task_arithmetic_recipe(base, fts, alloy_settings.data_dirs[0] / "o"))
    assert run_job(job_id, settings=alloy_settings).status == "succeeded"
    finished = job_store.job(job_id)
    assert run_job(job_id, settings=alloy_settings).status == "skipped"
    again = job_store.job(job_id)
    assert (again.status, again.finished_at, again.attempts) == ("succeeded", finished.finished_at, 0)


def test_permanent_error_fails_at_once_with_its_code(job_store, alloy_settings, models):
    base, fts = models
    recipe = task_arithmetic_recipe(
        base, [fts[0], base.parent / "missing"], alloy_settings.data_dirs[0] / "o"
    )
    job_id = job_store.insert_job(recipe)
    assert run_job(job_id, settings=alloy_settings).status == "failed"
    job = job_store.job(job_id)
    assert job.status == "failed" and job.attempts == 0
    assert job.error_code == SourceNotFoundError.code and "missing" in job.error_detail
    assert not (alloy_settings.data_dirs[0] / "o").exists()
    assert stray_files(alloy_settings.data_dirs[0]) == []


class FlakyHub:
    """The merge engine as seen through a Hub that is down: raises the transient error the Hub client raises."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, recipe: Any, **kwargs: Any) -> Any:
        self.calls += 1
        raise HubTransientError("the Hub answered 503", status=503)


def test_transient_error_requeues_with_backoff_then_fails_after_max_attempts(
    job_store, alloy_settings, models
):
    base, fts = models
    job_id = job_store.insert_job(task_arithmetic_recipe(base, fts, alloy_settings.data_dirs[0] / "o"))
    flaky = FlakyHub()
    for attempt in range(alloy_settings.max_attempts - 1):
        with pytest.raises(RetryLater) as caught:
            run_job(job_id, settings=alloy_settings, merge=flaky)
        assert 0 < caught.value.countdown <= 2.0 * 2**attempt
        job = job_store.job(job_id)
        assert (job.status, job.attempts) == ("queued", attempt + 1)
    assert run_job(job_id, settings=alloy_settings, merge=flaky).status == "failed"
    job = job_store.job(job_id)
    assert job.status == "failed" and job.error_code == "hub_unavailable"
    assert flaky.calls == alloy_settings.max_attempts


def test_output_renamed_by_a_killed_attempt_is_recorded_not_recomputed(job_store, alloy_settings, models):
    """An attempt died between run_merge's rename and finish_job: the next attempt finds the complete output."""
    base, fts = models
    out = alloy_settings.data_dirs[0] / "o"
    first = job_store.insert_job(task_arithmetic_recipe(base, fts, out))
    assert run_job(first, settings=alloy_settings).status == "succeeded"
    retry = job_store.insert_job(task_arithmetic_recipe(base, fts, out))
    with job_store.session() as session:
        session.execute(update(Job).where(Job.id == retry).values(attempts=1))
        session.commit()

    def must_not_run(recipe: Any, **kwargs: Any) -> Any:
        raise AssertionError("the merge ran again")

    assert run_job(retry, settings=alloy_settings, merge=must_not_run).status == "succeeded"
    assert job_store.job(retry).report["recipe_digest"] == job_store.job(first).report["recipe_digest"]


def test_cancel_requested_while_running_stops_between_tensors(job_store, alloy_settings, models):
    base, fts = models
    out = alloy_settings.data_dirs[0] / "o"
    job_id = job_store.insert_job(task_arithmetic_recipe(base, fts, out))

    def merge_with_cancel(recipe: Any, **kwargs: Any) -> Any:
        from merge_ops.pipeline import run_merge

        # the API's DELETE lands while the job runs; the ticker sees it within progress_interval
        with job_store.session() as session:
            assert crud.cancel_job(session, job_id=job_id) == "running"
        pipeline_should_cancel = kwargs["should_cancel"]
        from tests.utils.services import wait_until

        wait_until(pipeline_should_cancel, timeout=10, what="cancel flag")
        return run_merge(recipe, **kwargs)

    assert run_job(job_id, settings=alloy_settings, merge=merge_with_cancel).status == "cancelled"
    job = job_store.job(job_id)
    assert job.status == "cancelled" and job.error_code == "cancelled"
    assert not out.exists() and stray_files(alloy_settings.data_dirs[0]) == []


def test_analyze_job_stores_task_vector_statistics_as_its_report(job_store, alloy_settings, models):
    base, fts = models
    request = {"sources": [str(f) for f in fts], "base": str(base), "allow_pickle": False}
    job_id = job_store.insert_job(request, kind="analyze")
    assert run_job(job_id, settings=alloy_settings).status == "succeeded"
    job = job_store.job(job_id)
    assert job.status == "succeeded" and job.output_path is None
    from merge_ops.analysis import inspect_task_vectors

    assert job.report == json.loads(json.dumps(inspect_task_vectors(str(base), [str(f) for f in fts])))
