"""A recipe with ``output.hub``: the merge worker hands the finished folder to the io queue, whose worker pushes it
to a (local, Hub-compatible) server in one commit and finishes the row with the commit and URL."""

from __future__ import annotations

import re

import pytest

from tests.utils.hub_server import WRITE_TOKEN

from .helpers import make_models, task_arithmetic_recipe

pytestmark = pytest.mark.slow


def test_hub_output_is_pushed_by_the_io_worker(job_store, celery_worker, alloy_settings, hub_server):
    data = alloy_settings.data_dirs[0]
    base, fts = make_models(data / "models")
    recipe = task_arithmetic_recipe(base, fts, data / "out")
    recipe["output"]["hub"] = {"repo": "alloy/merged-e2e", "private": True}
    env = {"HF_ENDPOINT": hub_server.url, "HF_HUB_OFFLINE": "0"}
    merge_worker = celery_worker(name="merge-only", queues=("merge",), env=env)
    io_worker = celery_worker(name="io-only", queues=("io",), env=env)
    job_id = job_store.submit(recipe, hf_token=WRITE_TOKEN)
    job = job_store.wait_for(job_id, timeout=120)
    assert job.status == "succeeded", (job.error_code, job.error_detail, io_worker.log()[-3000:])
    assert re.fullmatch(r"[0-9a-f]{40}", job.output_commit)
    assert job.output_url.startswith(hub_server.url) and job.output_commit in job.output_url
    assert job.output_path and (data / "out" / "alloy-report.json").exists()
    assert (
        "Task alloy.publish_job[" in io_worker.log() and "Task alloy.publish_job[" not in merge_worker.log()
    )
    # the token travelled in the messages only
    assert (
        WRITE_TOKEN not in (job.report_json or "") and WRITE_TOKEN not in merge_worker.log() + io_worker.log()
    )
