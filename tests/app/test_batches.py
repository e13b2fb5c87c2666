"""POST/GET /v1/batches: each recipe becomes a job, all validated first, priorities passed to the queue."""

from __future__ import annotations

import yaml

from app import crud
from tests.app.conftest import Api, recipe


def test_batch_creates_one_job_per_recipe(api: Api) -> None:
    recipes = [recipe(seed=i) for i in range(3)] + [yaml.safe_dump(recipe(method="ties"))]
    response = api.client.post("/v1/batches", json={"recipes": recipes, "priority": 8}, headers=api.headers())
    assert response.status_code == 202, response.text
    batch = response.json()
    assert response.headers["location"] == batch["url"]
    assert batch["total"] == 4 and batch["counts"]["queued"] == 4 and batch["priority"] == 8
    assert all(job["batch_id"] == batch["id"] and job["priority"] == 8 for job in batch["jobs"])
    messages = api.messages()
    assert sorted(m["args"][0] for m in messages) == sorted(job["id"] for job in batch["jobs"])
    assert {m["priority"] for m in messages} == {8}


def test_batch_counts_follow_the_jobs(api: Api) -> None:
    batch = api.client.post(
        "/v1/batches", json={"recipes": [recipe(seed=i) for i in range(3)]}, headers=api.headers()
    ).json()
    first, second, third = (job["id"] for job in batch["jobs"])
    with api.client.app.state.sessionmaker() as session:
        crud.claim_job(session, job_id=first, worker="w")
        crud.finish_job(session, job_id=first, status="succeeded", output_path="/o")
        crud.claim_job(session, job_id=second, worker="w")
    api.client.delete(f"/v1/merges/{third}", headers=api.headers())
    status = api.client.get(f"/v1/batches/{batch['id']}", headers=api.headers()).json()
    assert status["counts"] == {"queued": 0, "running": 1, "succeeded": 1, "failed": 0, "cancelled": 1}
    listed = api.client.get("/v1/merges", params={"batch_id": batch["id"]}, headers=api.headers()).json()
    assert {job["id"] for job in listed["items"]} == {first, second, third}


def test_batch_is_all_or_nothing(api: Api) -> None:
    recipes = [recipe(), {"method": "ties"}, recipe(base="../x")]
    response = api.client.post("/v1/batches", json={"recipes": recipes}, headers=api.headers())
    assert response.status_code == 422
    locs = [error["loc"] for error in response.json()["errors"]]
    assert ["recipes", "1", "base"] in locs and ["recipes", "2", "base"] in locs
    assert not any(loc[:2] == ["recipes", "0"] for loc in locs)
    assert api.messages() == []
    assert api.client.get("/v1/merges", headers=api.headers()).json()["items"] == []


def test_batch_request_shape_is_validated(api: Api) -> None:
    for body in ({"recipes": []}, {"recipes": [recipe()], "priority": 12}, {"jobs": []}, [recipe()]):
        response = api.client.post("/v1/batches", json=body, headers=api.headers())
        assert response.status_code == 422 and response.json()["errors"], body
    response = api.client.get("/v1/batches/nope", headers=api.headers())
    assert response.status_code == 404 and response.json()["code"] == "batch_not_found"


def test_jobs_carry_the_names_given_at_submit(api: Api) -> None:
    named = api.client.post(
        "/v1/merges", params={"name": "math+code v2"}, json=recipe(seed=11), headers=api.headers()
    )
    assert named.status_code == 202 and named.json()["name"] == "math+code v2"
    listed = api.client.get("/v1/merges", headers=api.headers()).json()["items"]
    assert [j["name"] for j in listed if j["id"] == named.json()["id"]] == ["math+code v2"]
    body = {"recipes": [recipe(seed=12), recipe(seed=13)], "names": ["lambda=0.3", "lambda=0.9"]}
    batch = api.client.post("/v1/batches", json=body, headers=api.headers())
    assert batch.status_code == 202, batch.text
    assert sorted(j["name"] for j in batch.json()["jobs"]) == ["lambda=0.3", "lambda=0.9"]
    short = api.client.post(
        "/v1/batches", json={"recipes": [recipe(seed=14)], "names": ["a", "b"]}, headers=api.headers()
    )
    assert short.status_code == 422
