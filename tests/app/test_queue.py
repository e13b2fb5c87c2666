"""The Hub token travels only in the queue message; broker failures fail the submission cleanly."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from app.core import queue
from tests.app.conftest import Api, recipe

HF_TOKEN = "hf_SECRETsecretSECRETsecret1234"


def test_hub_token_only_in_the_message(api: Api, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    response = api.post_recipe(recipe(), **{"X-HF-Token": HF_TOKEN})
    assert response.status_code == 202 and HF_TOKEN not in response.text
    [message] = api.messages()
    assert message["kwargs"] == {"hf_token": HF_TOKEN}
    assert HF_TOKEN not in message["raw"]  # body is encoded; the kwargsrepr header is masked
    assert "'***'" in message["raw"]
    with api.client.app.state.engine.connect() as connection:
        dump = "\n".join(str(row) for row in connection.execute(text("SELECT * FROM jobs")))
    assert HF_TOKEN not in dump
    assert HF_TOKEN not in caplog.text
    job = api.client.get(response.json()["url"], headers=api.headers())
    assert HF_TOKEN not in job.text


def test_redis_priorities_are_inverted() -> None:
    assert queue.broker_priority(9, broker_url="redis://x") == 0
    assert queue.broker_priority(0, broker_url="redis://x") == 9
    assert queue.broker_priority(7, broker_url="filesystem://") == 7
    assert queue.broker_priority(42, broker_url="amqp://") == 9


def test_broker_failure_is_503_and_leaves_no_queued_row(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise ConnectionRefusedError("broker down")

    monkeypatch.setattr("app.services.jobs.enqueue_job", broken)
    response = api.post_recipe(recipe(), **{"Idempotency-Key": "k1"})
    assert response.status_code == 503 and response.json()["code"] == "broker_unavailable"
    assert "broker down" not in response.text
    [job] = api.client.get("/v1/merges", headers=api.headers()).json()["items"]
    assert job["status"] == "failed" and job["error"]["code"] == "broker_unavailable"
    monkeypatch.undo()
    # the key was released: the client's retry submits for real
    retry = api.post_recipe(recipe(), **{"Idempotency-Key": "k1"})
    assert retry.status_code == 202 and retry.json()["id"] != job["id"] and len(api.messages()) == 1
