"""/healthz, /readyz (each check reported) and /metrics computed from the job store."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from app import crud
from tests.app.conftest import Api, recipe


def test_healthz(api: Api) -> None:
    assert api.client.get("/healthz").json() == {"status": "ok"}


def test_readyz_without_workers_is_503_with_each_check(api: Api) -> None:
    response = api.client.get("/readyz")
    assert response.status_code == 503 and response.headers["content-type"] == "application/problem+json"
    checks = response.json()["checks"]
    assert checks["database"]["ok"] and checks["broker"]["ok"]
    assert not checks["workers"]["ok"] and "no worker" in checks["workers"]["detail"]


def test_readyz_when_a_worker_answers(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("app.core.queue.ping_workers", lambda settings, timeout_s: ["celery@gpu0"])
    response = api.client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ready",
        "checks": {
            "database": {"ok": True, "detail": "ok"},
            "broker": {"ok": True, "detail": "ok"},
            "workers": {"ok": True, "detail": "1 worker(s): celery@gpu0"},
        },
    }


def test_readyz_reports_an_unreachable_broker(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(settings: object, timeout_s: float) -> None:
        raise ConnectionRefusedError("redis://:password@host")

    monkeypatch.setattr("app.core.queue.check_broker", refuse)
    response = api.client.get("/readyz")
    assert response.status_code == 503
    checks = response.json()["checks"]
    assert checks["broker"] == {"ok": False, "detail": "unreachable (ConnectionRefusedError)"}
    assert not checks["workers"]["ok"] and "password" not in response.text


def _samples(api: Api) -> dict[tuple[str, tuple], float]:
    text = api.client.get("/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_from_the_job_store(api: Api) -> None:
    ids = [api.post_recipe(recipe(seed=i)).json()["id"] for i in range(3)]
    with api.client.app.state.sessionmaker() as session:
        crud.claim_job(session, job_id=ids[0], worker="w")
        crud.record_progress(session, job_id=ids[0], done=2, total=2, bytes_done=4096, bytes_total=4096)
        crud.finish_job(session, job_id=ids[0], status="succeeded")
        crud.claim_job(session, job_id=ids[1], worker="w")
    samples = _samples(api)
    assert samples[("alloy_jobs", (("kind", "merge"), ("status", "queued")))] == 1
    assert samples[("alloy_jobs", (("kind", "merge"), ("status", "running")))] == 1
    assert samples[("alloy_jobs", (("kind", "merge"), ("status", "succeeded")))] == 1
    assert samples[("alloy_queue_depth", ())] == 1
    assert samples[("alloy_merge_duration_seconds_count", ())] == 1
    assert samples[("alloy_merge_duration_seconds_bucket", (("le", "+Inf"),))] == 1
    assert samples[("alloy_merge_duration_seconds_bucket", (("le", "60.0"),))] == 1
    assert samples[("alloy_merged_bytes_total", ())] == 4096
