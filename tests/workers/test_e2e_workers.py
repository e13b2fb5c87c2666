"""Real `celery worker` subprocesses on a real Redis, with a real SQLite job store: crash safety end to end."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

import pytest

from .helpers import (
    assert_output_matches,
    expected_task_arithmetic,
    long_recipe,
    make_models,
    stray_files,
    task_arithmetic_recipe,
)

pytestmark = pytest.mark.slow


def finished_runs(*workers: Any) -> int:
    """How many task runs ended by finishing a job (the worker logs the task's return value)."""
    return sum(
        len(re.findall(r"succeeded in [\d.]+s: '(?:succeeded|failed|cancelled)'", w.log())) for w in workers
    )


# redis: the unacked message would come back only after visibility_timeout; filesystem: the SIGKILL loses it.
# Either way the reaper of the next worker sees the stale heartbeat and re-sends the job.
@pytest.mark.parametrize("broker_kind", ["redis", "filesystem"])
def test_worker_killed_mid_merge_job_completes_once_on_a_new_worker(
    job_store, celery_worker, alloy_settings, long_models
):
    base, fts = long_models
    data = alloy_settings.data_dirs[0]
    out = data / "out"
    # the long models live outside the deployment's data dir; the worker re-checks sources, so allow them
    env = {"ALLOY_DATA_DIRS": os.pathsep.join([str(data), str(base.parent)])}
    first = celery_worker(name="doomed", env=env)
    job_id = job_store.submit(long_recipe(base, fts, out, lam=0.7))
    job = job_store.wait_for(job_id, ("running",), timeout=60, where=lambda j: (j.tensors_done or 0) >= 3)
    assert job.tensors_done < job.tensors_total, "the merge finished before the kill; make LONG_MERGE bigger"
    first.kill9()
    time.sleep(0.5)
    assert job_store.job(job_id).status == "running"  # nobody is left to finish it

    second = celery_worker(name="rescuer", env=env)
    job = job_store.wait_for(job_id, timeout=120)
    assert job.status == "succeeded", (job.error_code, job.error_detail, second.log()[-3000:])
    assert job.attempts == 1
    assert finished_runs(first, second) == 1
    assert_output_matches(out, expected_task_arithmetic(base, fts, lam=0.7, weights=[1.0] * len(fts)))
    assert stray_files(data) == [] and stray_files(base.parent) == []
    assert [p.name for p in data.iterdir()] == ["out"]


def test_a_killed_pool_process_is_taken_over_at_once(job_store, celery_worker, alloy_settings, long_models):
    """kill -9 of the pool child under a live worker: Celery redelivers the message at once and the new attempt
    takes the row over (its dead owner is checked on this machine), long before the lease would go stale (300 s
    here). The output equals the reference merge and exactly one attempt finishes."""
    import signal

    base, fts = long_models
    data = alloy_settings.data_dirs[0]
    out = data / "out"
    env = {
        "ALLOY_DATA_DIRS": os.pathsep.join([str(data), str(base.parent)]),
        "ALLOY_HEARTBEAT_STALE_S": "300",
        "ALLOY_QUEUED_RESEND_S": "300",
    }
    worker = celery_worker(name="survivor", env=env)
    job_id = job_store.submit(long_recipe(base, fts, out, lam=0.7))
    job = job_store.wait_for(job_id, ("running",), timeout=60, where=lambda j: (j.tensors_done or 0) >= 3)
    assert job.tensors_done < job.tensors_total, "the merge finished before the kill; make LONG_MERGE bigger"
    (child,) = worker.pool_pids()
    killed_at = time.monotonic()
    os.kill(child, signal.SIGKILL)
    job = job_store.wait_for(job_id, timeout=120)
    recovered_s = time.monotonic() - killed_at
    assert job.status == "succeeded", (job.error_code, job.error_detail, worker.log()[-3000:])
    assert recovered_s < 60, recovered_s  # the lease (300 s) was not waited for
    assert job.attempts == 1 and "taking it over" in worker.log()
    assert finished_runs(worker) == 1
    assert_output_matches(out, expected_task_arithmetic(base, fts, lam=0.7, weights=[1.0] * len(fts)))
    assert stray_files(data) == []


def test_redis_restart_while_jobs_are_queued_loses_none(
    job_store, celery_worker, redis_server, alloy_settings
):
    base, fts = make_models(alloy_settings.data_dirs[0] / "models")
    ids = [job_store.submit(task_arithmetic_recipe(base, fts, None, lam=0.1 * (i + 1))) for i in range(4)]
    redis_server.restart()  # no persistence: every queued message is gone
    worker = celery_worker(name="after-restart")
    for job_id in ids:
        job = job_store.wait_for(job_id, timeout=90)
        assert job.status == "succeeded", (job.error_code, job.error_detail, worker.log()[-3000:])
        assert_output_matches(Path(job.output_path), _expected_for(job, base, fts))


def _expected_for(job: Any, base: Path, fts: list[Path]) -> dict[str, Any]:
    lam = job.recipe["params"]["lambda"]
    return expected_task_arithmetic(base, fts, lam=lam, weights=[1.0, 1.0])


def test_permanent_error_fails_once_through_a_real_worker(job_store, celery_worker, alloy_settings):
    base, fts = make_models(alloy_settings.data_dirs[0] / "models")
    recipe = task_arithmetic_recipe(base, [fts[0], base.parent / "gone"], None)
    worker = celery_worker(name="permanent")
    job_id = job_store.submit(recipe)
    job = job_store.wait_for(job_id, timeout=60)
    assert (job.status, job.error_code, job.attempts) == ("failed", "source_not_found", 0)
    assert finished_runs(worker) == 1


def test_merge_past_the_time_limit_fails_with_a_clear_error(
    job_store, celery_worker, alloy_settings, long_models
):
    base, fts = long_models
    data = alloy_settings.data_dirs[0]
    # hard limit 2 s -> soft limit 1 s, raised inside the merge; the row says why, the scratch is gone
    roots = os.pathsep.join([str(data), str(base.parent)])  # the long models live outside the data dir
    worker = celery_worker(name="limited", env={"ALLOY_TASK_TIME_LIMIT_S": "2", "ALLOY_DATA_DIRS": roots})
    job_id = job_store.submit(long_recipe(base, fts, data / "late"))
    job = job_store.wait_for(job_id, timeout=60)
    assert (job.status, job.error_code) == ("failed", "time_limit_exceeded"), worker.log()[-3000:]
    assert "task_time_limit_s=2" in job.error_detail
    assert not (data / "late").exists() and stray_files(data) == []
    assert worker.alive()
