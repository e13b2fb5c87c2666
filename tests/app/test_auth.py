"""Bearer tokens: every /v1 route is 401 without one; callers see only their own jobs; admins see all."""

from __future__ import annotations

import re

import pytest
from sqlalchemy import select

from app.models import ApiToken
from app.services.tokens import revoke_token
from tests.app.conftest import Api, recipe

PUBLIC = {"/healthz", "/readyz", "/metrics"}


def _v1_routes(api: Api) -> list[tuple[str, str]]:
    routes = []
    for path, operations in api.client.app.openapi()["paths"].items():
        if path.startswith("/v1"):
            concrete = re.sub(r"\{[^}]+\}", "00000000-0000-0000-0000-000000000000", path)
            routes += [(method.upper(), concrete) for method in operations]
    return routes


def test_every_v1_route_needs_a_token(api: Api) -> None:
    routes = _v1_routes(api)
    assert len(routes) >= 12
    for method, path in routes:
        for headers in ({}, {"Authorization": "Bearer alloy_wrong"}, {"Authorization": "Basic dXNlcjpwYXNz"}):
            response = api.client.request(method, path, headers=headers, json=recipe())
            assert response.status_code == 401, (method, path, headers)
            assert response.headers["content-type"] == "application/problem+json"
            assert response.headers["www-authenticate"].startswith("Bearer")
            assert response.json()["code"] == "unauthorized"


def test_public_routes_need_no_token(api: Api) -> None:
    assert api.client.get("/healthz").json() == {"status": "ok"}
    assert api.client.get("/metrics").status_code == 200
    assert api.client.get("/readyz").status_code in (200, 503)


def test_revoked_token_is_rejected(api: Api) -> None:
    with api.client.app.state.sessionmaker() as session:
        token = session.scalars(select(ApiToken).where(ApiToken.name == "other")).one()
        assert revoke_token(session, token_id=token.id)
    response = api.client.get("/v1/methods", headers=api.headers(api.other))
    assert response.status_code == 401


def test_tokens_are_stored_hashed(api: Api) -> None:
    with api.client.app.state.sessionmaker() as session:
        hashes = session.scalars(select(ApiToken.token_hash)).all()
    assert len(hashes) == 3 and all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes)
    assert not {api.user, api.other, api.admin} & set(hashes)


@pytest.mark.parametrize(
    "suffix,method", [("", "GET"), ("/report", "GET"), ("/events", "GET"), ("", "DELETE")]
)
def test_other_callers_get_404_for_my_jobs(api: Api, suffix: str, method: str) -> None:
    job_id = api.post_recipe(recipe()).json()["id"]
    response = api.client.request(method, f"/v1/merges/{job_id}{suffix}", headers=api.headers(api.other))
    assert response.status_code == 404 and response.json()["code"] == "job_not_found"
    # and the job is untouched
    assert api.client.get(f"/v1/merges/{job_id}", headers=api.headers()).json()["status"] == "queued"


def test_lists_show_own_jobs_admin_sees_all(api: Api) -> None:
    mine = api.post_recipe(recipe()).json()["id"]
    theirs = api.post_recipe(recipe(), token=api.other).json()["id"]
    assert [j["id"] for j in api.client.get("/v1/merges", headers=api.headers()).json()["items"]] == [mine]
    assert [
        j["id"] for j in api.client.get("/v1/merges", headers=api.headers(api.other)).json()["items"]
    ] == [theirs]
    everything = api.client.get("/v1/merges", headers=api.headers(api.admin)).json()["items"]
    assert {j["id"] for j in everything} == {mine, theirs}
    assert api.client.get(f"/v1/merges/{theirs}", headers=api.headers(api.admin)).status_code == 200
    cancelled = api.client.delete(f"/v1/merges/{theirs}", headers=api.headers(api.admin))
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"


def test_batches_are_private(api: Api) -> None:
    batch = api.client.post("/v1/batches", json={"recipes": [recipe()]}, headers=api.headers()).json()
    assert api.client.get(f"/v1/batches/{batch['id']}", headers=api.headers(api.other)).status_code == 404
    assert api.client.get(f"/v1/batches/{batch['id']}", headers=api.headers(api.admin)).status_code == 200
