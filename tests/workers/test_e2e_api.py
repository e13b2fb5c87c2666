"""End to end through HTTP: uvicorn API + real celery workers + Redis + SQLite, outputs checked against torch."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.utils.services import wait_for_http_status

from .helpers import (
    assert_output_matches,
    expected_task_arithmetic,
    long_recipe,
    make_models,
    stray_files,
    task_arithmetic_recipe,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def client_for(job_store: Any) -> Iterator[Any]:
    clients: list[httpx.Client] = []

    def make(api: Any) -> httpx.Client:
        token = job_store.create_token(name="e2e")
        client = httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def read_status_events(client: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    """The ``status`` events of GET /v1/merges/{id}/events, until the server ends the stream."""
    events: list[dict[str, Any]] = []
    event = None
    with client.stream("GET", f"/v1/merges/{job_id}/events", timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("event:"):
                event = line.removeprefix("event:").strip()
            elif line.startswith("data:") and event == "status":
                events.append(json.loads(line.removeprefix("data:")))
    return events


def test_submit_over_http_streams_progress_and_produces_the_right_output(
    api_server, celery_worker, client_for, alloy_env, alloy_settings, long_models
):
    base, fts = long_models
    data = alloy_settings.data_dirs[0]
    # the long models live outside the deployment's data dir; allow them as sources
    env = {"ALLOY_DATA_DIRS": os.pathsep.join([str(data), str(base.parent)])}
    api = api_server(env=env)
    celery_worker(name="http", env=env)
    client = client_for(api)
    recipe = long_recipe(base, fts, data / "merged", lam=0.4, weights=[1.0, -0.5, 0.25])
    response = client.post("/v1/merges", json=recipe)
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]

    events = read_status_events(client, job_id)
    statuses = [e["status"] for e in events]
    assert statuses[-1] == "succeeded", events[-1]
    assert statuses == sorted(statuses, key=["queued", "running", "succeeded"].index)
    fractions = [
        e["progress"]["fraction"] for e in events if e["status"] == "running" and e["progress"]["fraction"]
    ]
    assert any(0 < f < 1 for f in fractions), "no intermediate progress event"
    assert fractions == sorted(fractions)

    body = client.get(f"/v1/merges/{job_id}").json()
    assert body["progress"]["tensors_done"] == body["progress"]["tensors_total"] > 0
    assert Path(body["output"]["path"]) == (data / "merged").resolve()
    assert client.get(f"/v1/merges/{job_id}/report").json()["method"] == "stages"
    assert_output_matches(
        data / "merged", expected_task_arithmetic(base, fts, lam=0.4, weights=[1.0, -0.5, 0.25])
    )
    assert stray_files(data) == []


def test_batch_of_twenty_with_mixed_priorities_all_succeed_most_urgent_first(
    api_server, celery_worker, client_for, alloy_settings
):
    data = alloy_settings.data_dirs[0]
    base, fts = make_models(data / "models")
    client = client_for(api_server())
    priorities = [(0, 5, 9)[i % 3] for i in range(20)]
    # submitted while no worker runs, so the order they run in is the broker's priority order
    ids = []
    for i, priority in enumerate(priorities):
        recipe = task_arithmetic_recipe(base, fts, None, lam=round(0.05 * (i + 1), 2))
        response = client.post("/v1/merges", json=recipe, params={"priority": priority})
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])
    celery_worker(name="batch")
    bodies = [wait_for_http_status(client, job_id, timeout=180) for job_id in ids]
    assert [b["status"] for b in bodies] == ["succeeded"] * 20, [b["error"] for b in bodies]
    for body in bodies:
        assert_output_matches(
            Path(body["output"]["path"]),
            expected_task_arithmetic(base, fts, lam=body["recipe"]["params"]["lambda"], weights=[1.0, 1.0]),
        )
    started = {
        p: sorted(b["started_at"] for b, q in zip(bodies, priorities, strict=True) if q == p) for p in (0, 9)
    }
    assert started[9][-1] < started[0][0], "a priority-0 job started before a priority-9 job"
    assert stray_files(data) == []


def test_cancel_a_queued_and_a_running_job_over_http(
    api_server, celery_worker, client_for, alloy_settings, long_models
):
    base, fts = long_models
    data = alloy_settings.data_dirs[0]
    env = {"ALLOY_DATA_DIRS": os.pathsep.join([str(data), str(base.parent)])}
    client = client_for(api_server(env=env))
    worker = celery_worker(name="cancel", env=env)
    running = client.post("/v1/merges", json=long_recipe(base, fts, data / "running")).json()["id"]
    queued = client.post("/v1/merges", json=long_recipe(base, fts, data / "queued")).json()["id"]
    wait_for_http_status(
        client, running, ("running",), timeout=60, where=lambda body: body["progress"]["tensors_done"] >= 1
    )
    assert client.delete(f"/v1/merges/{queued}").json()["status"] == "cancelled"
    client.delete(f"/v1/merges/{running}").raise_for_status()
    body = wait_for_http_status(client, running, timeout=60)
    assert body["status"] == "cancelled"
    assert body["progress"]["tensors_done"] < body["progress"]["tensors_total"]
    small = make_models(data / "small")
    after = client.post("/v1/merges", json=task_arithmetic_recipe(*small, data / "after")).json()["id"]
    assert wait_for_http_status(client, after, timeout=60)["status"] == "succeeded"
    never_ran = client.get(f"/v1/merges/{queued}").json()
    assert never_ran["status"] == "cancelled" and never_ran["started_at"] is None
    assert not (data / "running").exists() and not (data / "queued").exists()
    assert stray_files(data) == []
    assert worker.alive()
