"""POST /v1/recipes/validate, /v1/recipes/import and /v1/analyses."""

from __future__ import annotations

import yaml

from tests.app.conftest import Api, recipe

MERGEKIT = """
merge_method: dare_ties
base_model: base
models:
  - model: ft1
    parameters: {weight: 0.7, density: 0.5}
  - model: ft2
    parameters: {weight: 0.3, density: 0.5}
"""


def test_validate_returns_the_normalized_recipe_without_a_job(api: Api) -> None:
    response = api.client.post("/v1/recipes/validate", json=recipe(), headers=api.headers())
    assert response.status_code == 200
    normalized = response.json()
    assert normalized["base"] == str((api.data / "base").resolve())
    assert normalized["output"]["shard_size"] == 5 * 10**9
    assert api.messages() == [] and api.client.get("/v1/merges", headers=api.headers()).json()["items"] == []
    bad = api.client.post("/v1/recipes/validate", json=recipe(base="/etc"), headers=api.headers())
    assert bad.status_code == 422 and bad.json()["code"] == "path_not_allowed"
    # the normalized recipe is accepted as is
    assert api.post_recipe(normalized).status_code == 202


def test_import_translates_mergekit_without_path_checks(api: Api) -> None:
    response = api.client.post(
        "/v1/recipes/import", content=MERGEKIT, headers=api.headers(**{"Content-Type": "application/yaml"})
    )
    assert response.status_code == 200, response.text
    imported = response.json()
    assert imported["method"] == "dare_ties" and imported["base"] == "base"
    assert [m["source"] for m in imported["models"]] == ["ft1", "ft2"]
    alloy_yaml = yaml.safe_dump(recipe(base="not/there"))
    same = api.client.post(
        "/v1/recipes/import", content=alloy_yaml, headers=api.headers(**{"Content-Type": "application/yaml"})
    )
    assert same.status_code == 200 and same.json()["base"] == "not/there"
    invalid = api.client.post("/v1/recipes/import", json={"method": "ties"}, headers=api.headers())
    assert invalid.status_code == 422 and invalid.json()["errors"]


def test_analysis_becomes_an_analyze_job(api: Api) -> None:
    response = api.client.post(
        "/v1/analyses", json={"sources": ["ft1", "ft2"], "base": "base"}, headers=api.headers()
    )
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["kind"] == "analyze" and job["status"] == "queued"
    assert job["recipe"] == {
        "sources": [str((api.data / n).resolve()) for n in ("ft1", "ft2")],
        "base": str((api.data / "base").resolve()),
        "allow_pickle": False,
    }
    assert [m["args"] for m in api.messages()] == [[job["id"]]]
    listed = api.client.get("/v1/merges", params={"kind": "analyze"}, headers=api.headers()).json()["items"]
    assert [j["id"] for j in listed] == [job["id"]]
    bad = api.client.post("/v1/analyses", json={"sources": ["../x"], "base": "/etc"}, headers=api.headers())
    assert bad.status_code == 422
    assert {tuple(e["loc"]) for e in bad.json()["errors"]} == {("sources", "0"), ("base",)}
    empty = api.client.post("/v1/analyses", json={"sources": []}, headers=api.headers())
    assert empty.status_code == 422
