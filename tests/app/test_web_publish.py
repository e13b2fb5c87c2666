"""A failed Hub push keeps the finished merge (issue 16, defect 3), in headless Chromium against the real API, a
real Celery worker, Redis and the local Hub-compatible server: the job shows the local folder and the report,
and "Retry the upload" pushes the same folder as one new commit without merging again."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.app import test_web_form as web
from tests.app.test_web_form import (
    Deployment,
    choose_local_source,
    running_deployment,
    screenshot,
    wait_for_job_page,
    wait_for_status,
)
from tests.utils.hub_server import WRITE_TOKEN, HubServer

pytestmark = pytest.mark.browser
# test_web_form's browser and page fixtures, over this module's own deployment (with a local Hub server)
browser, page, artifacts = web.browser, web.page, web.artifacts


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    server = HubServer(tmp_path_factory.mktemp("hub"))
    server.add_token(WRITE_TOKEN, write=["alloy"])
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _publish_models(data: Path) -> None:
    from tests.utils.factories import make_llama_like

    base = make_llama_like(data / "base", layers=2, hidden=16, vocab=32, seed=0)
    make_llama_like(data / "ft1", perturb_from=base, seed=1, scale=0.02)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, hub: HubServer) -> Iterator[Deployment]:
    with running_deployment(
        tmp_path_factory.mktemp("web-publish"),
        env_extra={"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0"},
        make_models=_publish_models,
    ) as d:
        yield d


def test_a_failed_push_shows_the_merge_and_retries_only_the_upload(
    page: Any, deployment: Deployment, hub: HubServer, artifacts: Path
) -> None:
    repo = "alloy/web-retry"
    # the Hub refuses the first commit (not a transient error: the job fails at once)
    fault = hub.inject("POST", f"/api/models/{repo}/commit/", status=403, times=1)
    page.select_option("#method", "task_arithmetic")
    choose_local_source(page, "#base-row", deployment.data / "base")
    page.locator("#models-list > .model-row:nth-child(2) .remove").click()
    choose_local_source(page, "#models-list > .model-row:nth-child(1)", deployment.data / "ft1")
    page.check("input[name=dest][value=hub]")
    page.fill("#hub-repo", repo)
    page.click("#tokens summary")
    page.fill("#hf-token", WRITE_TOKEN)
    page.click("#submit")
    job_id = wait_for_job_page(page)
    assert wait_for_status(page, "succeeded|failed|cancelled") == "failed", deployment.logs()
    assert fault.hits == 1
    # the finished merge is not hidden: its folder, its report and a retry of the upload alone
    error = page.text_content("#job-error")
    assert "The merge finished and is kept at" in error and repo in error, error
    assert "Output:" in page.text_content("#job-output")
    page.wait_for_selector("#job-report-details:not([hidden])")
    page.wait_for_selector("#job-retry-publish:not([hidden])")
    folder = Path(page.text_content("#job-output").removeprefix("Output: ").strip())
    report = folder / "alloy-report.json"
    merged_at = report.stat().st_mtime_ns
    screenshot(page, artifacts / "publish-failed-1280.png")

    page.click("#job-retry-publish")
    page.wait_for_function(
        "() => document.querySelector('#job-progress').dataset.status === 'succeeded'", timeout=60_000
    )
    assert "Open on the Hub" in page.text_content("#job-output")
    assert report.stat().st_mtime_ns == merged_at  # the same folder was pushed: no second merge
    commits = hub.requests(method="POST", path_contains=f"/api/models/{repo}/commit/")
    assert [r.status for r in commits] == [403, 200], commits
    assert job_id[:8] in page.text_content("#job-title")
    screenshot(page, artifacts / "publish-retried-1280.png")
