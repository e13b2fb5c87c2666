"""POST/GET/DELETE /v1/merges against a real SQLite store and filesystem broker (no worker)."""

from __future__ import annotations

import json
import threading
import time

import yaml

from app import crud
from tests.app.conftest import Api, recipe


def _job_id(response) -> str:
    return response.json()["id"]


def test_submit_json_creates_queued_job_and_enqueues_after_commit(api: Api) -> None:
    response = api.post_recipe(recipe())
    assert response.status_code == 202
    body = response.json()
    assert body["status"] == "queued" and body["kind"] == "merge"
    assert response.headers["location"] == body["url"] and body["url"].endswith(f"/v1/merges/{body['id']}")
    # local paths are stored absolute, inside the data dir
    assert body["recipe"]["base"] == str((api.data / "base").resolve())
    assert body["recipe"]["output"]["path"] == str((api.data / "out" / "merged").resolve())
    [message] = api.messages()
    assert message["task"] == "alloy.run_job" and message["args"] == [body["id"]] and message["kwargs"] == {}
    with api.client.app.state.sessionmaker() as session:  # the row existed when the message was sent
        assert crud.get_job(session, job_id=body["id"]).status == "queued"
    fetched = api.client.get(body["url"], headers=api.headers())
    assert fetched.status_code == 200 and fetched.json()["id"] == body["id"]


def test_submit_yaml(api: Api) -> None:
    text = yaml.safe_dump(recipe(method="ties", params={"density": 0.3}))
    response = api.client.post(
        "/v1/merges", content=text, headers=api.headers(**{"Content-Type": "application/yaml"})
    )
    assert response.status_code == 202, response.text
    assert response.json()["recipe"]["method"] == "ties"
    assert response.json()["recipe"]["params"] == {"density": 0.3}


def test_submit_mergekit_yaml_is_translated(api: Api) -> None:
    text = """
merge_method: ties
base_model: base
models:
  - model: ft1
    parameters: {weight: 1.0, density: 0.5}
  - model: ft2
    parameters: {weight: 0.5, density: 0.5}
dtype: bfloat16
"""
    response = api.client.post(
        "/v1/merges", content=text, headers=api.headers(**{"Content-Type": "application/yaml"})
    )
    assert response.status_code == 202, response.text
    stored = response.json()["recipe"]
    assert stored["method"] == "ties" and stored["dtype"] == "bfloat16"
    assert stored["base"] == str((api.data / "base").resolve())
    assert [m["source"] for m in stored["models"]] == [str((api.data / n).resolve()) for n in ("ft1", "ft2")]


def test_invalid_recipe_lists_every_error_and_creates_no_job(api: Api) -> None:
    bad = {
        "method": "ties",
        "models": [{"source": "ft1", "weight": 1000}],
        "params": {"density": 2},
        "weights": [1, 2],
        "seed": -1,
    }
    response = api.post_recipe(bad)
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["code"] == "invalid_recipe" and problem["status"] == 422
    locs = {tuple(error["loc"]) for error in problem["errors"]}
    assert {("base",), ("models", "0", "weight"), ("params", "density"), ("weights",), ("seed",)} <= locs
    assert api.messages() == []
    assert api.client.get("/v1/merges", headers=api.headers()).json()["items"] == []


def test_unknown_method_is_422(api: Api) -> None:
    response = api.post_recipe(recipe(method="nope"))
    assert response.status_code == 422 and ["method"] in [e["loc"] for e in response.json()["errors"]]


def test_idempotency_key_returns_existing_job(api: Api) -> None:
    first = api.post_recipe(recipe(), **{"Idempotency-Key": "abc-1"})
    again = api.post_recipe(recipe(), **{"Idempotency-Key": "abc-1"})
    assert first.status_code == again.status_code == 202
    assert _job_id(first) == _job_id(again) and again.headers["idempotent-replayed"] == "true"
    assert len(api.messages()) == 1
    # the same key with another recipe is a client bug, not a new job
    other = api.post_recipe(recipe(seed=7), **{"Idempotency-Key": "abc-1"})
    assert other.status_code == 409 and other.json()["code"] == "idempotency_key_reused"
    # keys are per token: another caller's identical key is independent
    theirs = api.post_recipe(recipe(), token=api.other, **{"Idempotency-Key": "abc-1"})
    assert theirs.status_code == 202 and _job_id(theirs) != _job_id(first)


def test_identical_recipe_while_active_returns_existing_job(api: Api) -> None:
    first = api.post_recipe(recipe())
    # spelled differently (absolute path, explicit defaults) but the same normalized recipe
    same = recipe(base=str(api.data / "base"), seed=0)
    again = api.post_recipe(same)
    assert _job_id(again) == _job_id(first) and len(api.messages()) == 1
    # once the job ended, the same recipe runs again
    api.client.delete(f"/v1/merges/{_job_id(first)}", headers=api.headers())
    third = api.post_recipe(recipe())
    assert third.status_code == 202 and _job_id(third) != _job_id(first) and len(api.messages()) == 2


def test_list_filters_by_status_and_paginates(api: Api) -> None:
    ids = [_job_id(api.post_recipe(recipe(seed=i))) for i in range(5)]
    api.client.delete(f"/v1/merges/{ids[0]}", headers=api.headers())
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = api.client.get("/v1/merges", params=params, headers=api.headers()).json()
        assert len(page["items"]) <= 2
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))  # newest first, each once
    queued = api.client.get("/v1/merges", params={"status": "queued"}, headers=api.headers()).json()
    assert {item["id"] for item in queued["items"]} == set(ids[1:])
    cancelled = api.client.get("/v1/merges", params={"status": "cancelled"}, headers=api.headers()).json()
    assert [item["id"] for item in cancelled["items"]] == [ids[0]]
    bad = api.client.get("/v1/merges", params={"cursor": "not-a-cursor"}, headers=api.headers())
    assert bad.status_code == 400 and bad.json()["code"] == "invalid_cursor"
    wrong_status = api.client.get("/v1/merges", params={"status": "done"}, headers=api.headers())
    assert wrong_status.status_code == 422 and wrong_status.json()["code"] == "validation_error"


def test_cancel_queued_job_never_starts(api: Api) -> None:
    job_id = _job_id(api.post_recipe(recipe()))
    response = api.client.delete(f"/v1/merges/{job_id}", headers=api.headers())
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled" and response.json()["finished_at"] is not None
    with api.client.app.state.sessionmaker() as session:
        # the message is still in the broker; the worker re-checks the row and cannot claim it
        assert crud.claim_job(session, job_id=job_id, worker="w1") is None
        assert crud.is_cancel_requested(session, job_id=job_id)
    again = api.client.delete(f"/v1/merges/{job_id}", headers=api.headers())
    assert again.status_code == 200 and again.json()["status"] == "cancelled"


def test_cancel_running_job_sets_cancel_requested(api: Api) -> None:
    job_id = _job_id(api.post_recipe(recipe()))
    with api.client.app.state.sessionmaker() as session:
        assert crud.claim_job(session, job_id=job_id, worker="w1") is not None
    response = api.client.delete(f"/v1/merges/{job_id}", headers=api.headers())
    assert response.status_code == 200
    assert response.json()["status"] == "running" and response.json()["cancel_requested"] is True
    with api.client.app.state.sessionmaker() as session:
        assert crud.is_cancel_requested(session, job_id=job_id)
        crud.finish_job(
            session, job_id=job_id, status="cancelled", error={"code": "cancelled", "detail": "stopped"}
        )
    assert api.client.get(f"/v1/merges/{job_id}", headers=api.headers()).json()["status"] == "cancelled"


def test_cancel_finished_job_is_409(api: Api) -> None:
    job_id = _job_id(api.post_recipe(recipe()))
    with api.client.app.state.sessionmaker() as session:
        crud.claim_job(session, job_id=job_id, worker="w1")
        crud.finish_job(session, job_id=job_id, status="succeeded", output_path="/x")
    response = api.client.delete(f"/v1/merges/{job_id}", headers=api.headers())
    assert response.status_code == 409 and response.json()["code"] == "job_not_cancellable"


def test_progress_output_report_and_failed_job_problem(api: Api) -> None:
    ok_id = _job_id(api.post_recipe(recipe(seed=1)))
    bad_id = _job_id(api.post_recipe(recipe(seed=2)))
    report = api.client.get(f"/v1/merges/{ok_id}/report", headers=api.headers())
    assert report.status_code == 409 and report.json()["code"] == "report_not_ready"
    with api.client.app.state.sessionmaker() as session:
        crud.claim_job(session, job_id=ok_id, worker="w1")
        crud.record_progress(
            session, job_id=ok_id, done=3, total=12, bytes_done=300, bytes_total=1200, eta_s=9.0
        )
    progress = api.client.get(f"/v1/merges/{ok_id}", headers=api.headers()).json()["progress"]
    assert progress == {
        "tensors_done": 3,
        "tensors_total": 12,
        "bytes_done": 300,
        "bytes_total": 1200,
        "eta_s": 9.0,
        "fraction": 0.25,
        "phase": None,
    }
    with api.client.app.state.sessionmaker() as session:
        crud.finish_job(
            session,
            job_id=ok_id,
            status="succeeded",
            output_path=str(api.data / "out"),
            report={"method": "task_arithmetic", "tensors": 12},
        )
        crud.claim_job(session, job_id=bad_id, worker="w1")
        crud.finish_job(
            session,
            job_id=bad_id,
            status="failed",
            error={
                "code": "incompatible_models",
                "detail": "shape mismatch in layer.0.weight",
                "context": {"tensor": "layer.0.weight"},
            },
        )
    done = api.client.get(f"/v1/merges/{ok_id}", headers=api.headers()).json()
    assert done["status"] == "succeeded" and done["output"]["path"] == str(api.data / "out")
    assert done["progress"]["fraction"] == 1.0 and done["duration_s"] is not None and done["error"] is None
    assert api.client.get(f"/v1/merges/{ok_id}/report", headers=api.headers()).json() == {
        "method": "task_arithmetic",
        "tensors": 12,
    }
    failed = api.client.get(f"/v1/merges/{bad_id}", headers=api.headers()).json()
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "incompatible_models" and failed["error"]["status"] == 422
    assert failed["error"]["detail"] == "shape mismatch in layer.0.weight"


def _read_events(response) -> list[dict]:
    events = []
    for block in response.text.split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if line and not line.startswith(":"))
        if lines.get("event") == "status":
            events.append(json.loads(lines["data"]))
    return events


def test_events_stream_until_the_job_ends(api: Api) -> None:
    job_id = _job_id(api.post_recipe(recipe()))
    sessionmaker = api.client.app.state.sessionmaker

    def worker() -> None:
        # each state lasts several event polls (0.1 s), so a loaded CI machine still sees every one
        time.sleep(0.2)
        with sessionmaker() as session:
            crud.claim_job(session, job_id=job_id, worker="w1")
            time.sleep(0.5)
            crud.record_progress(session, job_id=job_id, done=1, total=2)
            time.sleep(0.5)
            crud.finish_job(session, job_id=job_id, status="succeeded", output_path="/out")

    thread = threading.Thread(target=worker)
    thread.start()
    response = api.client.get(f"/v1/merges/{job_id}/events", headers=api.headers())
    thread.join()
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    statuses = [event["status"] for event in _read_events(response)]
    assert statuses[0] == "queued" and statuses[-1] == "succeeded" and "running" in statuses
    assert any(event["progress"]["tensors_done"] == 1 for event in _read_events(response))


def test_events_of_finished_job_send_one_event(api: Api) -> None:
    job_id = _job_id(api.post_recipe(recipe()))
    api.client.delete(f"/v1/merges/{job_id}", headers=api.headers())
    events = _read_events(api.client.get(f"/v1/merges/{job_id}/events", headers=api.headers()))
    assert [event["status"] for event in events] == ["cancelled"]


def test_priority_is_passed_to_the_queue(api: Api) -> None:
    api.post_recipe(recipe())
    api.client.post("/v1/merges", params={"priority": 8}, json=recipe(seed=3), headers=api.headers())
    assert [m["priority"] for m in api.messages()] == [5, 8]
