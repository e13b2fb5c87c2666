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


def test_hub_sources_are_pinned_at_submission(api: Api) -> None:
    from app.api.deps import get_pinner
    from merge_ops.errors import HubNotFoundError
    from merge_ops.recipe import HubSource

    def pin(source: HubSource) -> HubSource:
        if source.repo == "org/missing":
            raise HubNotFoundError(f"{source.repo} not found", repo=source.repo)
        return source.model_copy(update={"revision": "c" * 40})

    api.client.app.dependency_overrides[get_pinner] = lambda: pin
    try:
        response = api.post_recipe(recipe(models=[{"source": "hf://org/model@main"}, {"source": "ft1"}]))
        assert response.status_code == 202, response.text
        assert response.json()["pinned_sources"] == {"hf://org/model@main": f"hf://org/model@{'c' * 40}"}
        # the stored recipe itself is pinned: the worker runs exactly what it reads from the row
        assert response.json()["recipe"]["models"][0]["source"] == f"hf://org/model@{'c' * 40}"
        missing = api.post_recipe(recipe(models=[{"source": "hf://org/missing"}]))
        assert missing.status_code == 422 and missing.json()["code"] == "hub_not_found"
    finally:
        api.client.app.dependency_overrides.clear()


def test_pins_reach_the_worker_however_the_source_is_written(api: Api) -> None:
    """A source without a revision, or written as {repo, revision}, is pinned in the stored recipe (it used to
    be recorded under its normalised URI and then looked up by the string the user wrote: it ran unpinned)."""
    from app.api.deps import get_pinner
    from merge_ops.recipe import HubSource, Recipe

    def pin(source: HubSource) -> HubSource:
        return source.model_copy(update={"revision": source.repo[-1] * 40})

    api.client.app.dependency_overrides[get_pinner] = lambda: pin
    try:
        body = recipe(
            models=[
                {"source": "hf://org/model-a"},
                {"source": {"repo": "org/model-b", "revision": "v1"}},
                {"source": "ft1"},
            ]
        )
        response = api.post_recipe(body)
        assert response.status_code == 202, response.text
        job = response.json()
        assert job["pinned_sources"] == {
            "hf://org/model-a@main": "hf://org/model-a@" + "a" * 40,
            "hf://org/model-b@v1": "hf://org/model-b@" + "b" * 40,
        }
        from app.db import get_engine, session_scope
        from app.models import Job

        with session_scope(get_engine(api.settings.database_url)) as session:
            stored = Recipe.model_validate_json(session.get(Job, job["id"]).recipe_json)
        assert stored.models[0].source == "hf://org/model-a@" + "a" * 40
        assert stored.models[1].source == HubSource(repo="org/model-b", revision="b" * 40)
    finally:
        api.client.app.dependency_overrides.clear()


def test_the_api_never_imports_torch(tmp_path) -> None:
    import subprocess
    import sys
    from pathlib import Path

    script = f"""
import sys
from pathlib import Path
sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
from tests.app.conftest import start_api
for api in start_api(Path({str(tmp_path)!r})):
    ok = api.client.post("/v1/merges", content={MERGEKIT!r},
                         headers=api.headers(**{{"Content-Type": "application/yaml"}}))
    assert ok.status_code == 202, ok.text
    assert api.client.get("/v1/methods", headers=api.headers()).status_code == 200
assert "torch" not in sys.modules, "the API process imported torch"
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)


def test_import_returns_mergekit_warnings(api: Api) -> None:
    lenient = MERGEKIT + "nomalize: true\n"
    response = api.client.post(
        "/v1/recipes/import", content=lenient, headers=api.headers(**{"Content-Type": "application/yaml"})
    )
    assert response.status_code == 200, response.text
    warnings = response.json()["warnings"]
    assert [w["loc"] for w in warnings] == [["nomalize"]] and "normalize" in warnings[0]["msg"]
