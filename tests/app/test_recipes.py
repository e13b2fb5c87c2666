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
    response = api.client.post("/v1/recipes/validate?preflight=false", json=recipe(), headers=api.headers())
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
        assert response.json()["recipe"]["models"][0]["source"] == "hf://org/model@main"
        missing = api.post_recipe(recipe(models=[{"source": "hf://org/missing"}]))
        assert missing.status_code == 422 and missing.json()["code"] == "hub_not_found"
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


def test_validate_runs_the_workers_preflight_and_lists_every_problem(api: Api) -> None:
    from tests.utils.factories import make_llama_like

    data = api.data
    base = make_llama_like(data / "real" / "base", hidden=16, seed=0)
    make_llama_like(data / "real" / "ft1", perturb_from=base, seed=1)
    make_llama_like(data / "real" / "wide", hidden=32, seed=2)  # shapes differ from the base's
    (data / "taken").mkdir()
    (data / "taken" / "x.txt").write_text("not empty")
    good = recipe(base="real/base", models=[{"source": "real/ft1"}], output={"path": "fresh"})
    ok = api.client.post("/v1/recipes/validate", json=good, headers=api.headers())
    assert ok.status_code == 200, ok.text
    bad = recipe(
        base="real/base",
        models=[{"source": "real/ft1"}, {"source": "real/wide"}],
        output={"path": "taken"},
    )
    response = api.client.post("/v1/recipes/validate", json=bad, headers=api.headers())
    assert response.status_code == 422, response.text
    errors = response.json()["errors"]
    locs = {tuple(e["loc"]) for e in errors}
    assert ("models", "1", "source") in locs and ("output", "path") in locs, errors
    assert any("shape" in e["msg"] for e in errors) and any("not empty" in e["msg"] for e in errors)
    # a Hub destination without any Hub token would fail at the push: said now, next to the repo field
    hub = recipe(base="real/base", models=[{"source": "real/ft1"}], output={"hub": {"repo": "org/merged"}})
    no_token = api.client.post("/v1/recipes/validate", json=hub, headers=api.headers())
    assert no_token.status_code == 422
    assert [tuple(e["loc"]) for e in no_token.json()["errors"]] == [("output", "hub", "repo")]
    with_token = api.client.post(
        "/v1/recipes/validate", json=hub, headers=api.headers(**{"X-HF-Token": "hf_x"})
    )
    assert with_token.status_code == 200, with_token.text
    # an empty folder is no checkpoint: named, not a raw library message
    empty = api.client.post("/v1/recipes/validate", json=recipe(output={"path": "o2"}), headers=api.headers())
    assert empty.status_code == 422
    assert {tuple(e["loc"]) for e in empty.json()["errors"]} >= {("base",), ("models", "0", "source")}


def test_plan_returns_the_dry_run(api: Api) -> None:
    from tests.utils.factories import make_llama_like

    base = make_llama_like(api.data / "p" / "base", layers=2, hidden=16, seed=0)
    make_llama_like(api.data / "p" / "ft1", perturb_from=base, seed=1)
    body = recipe(base="p/base", models=[{"source": "p/ft1"}], output={"path": "p-out"})
    response = api.client.post("/v1/recipes/plan", json=body, headers=api.headers())
    assert response.status_code == 200, response.text
    plan = response.json()["plan"]
    merged = [t for t in plan["tensors"] if t["action"] == "merge"]
    assert merged and any(t["action"] == "copy" for t in plan["tensors"])  # position_ids is an int buffer
    assert plan["estimated_peak_bytes"] > 0 and plan["bytes_written"] > 0
    assert response.json()["recipe"]["base"] == str((api.data / "p" / "base").resolve())


def test_mergekit_references_resolve_inside_the_data_folders(api: Api) -> None:
    (api.data / "small" / "ft1").mkdir(parents=True)
    config = "merge_method: linear\nparameters: {weight: 1.0}\nmodels:\n  - model: small/ft1\n  - model: org/on-the-hub\n"
    response = api.client.post(
        "/v1/recipes/import", content=config, headers=api.headers(**{"Content-Type": "application/yaml"})
    )
    assert response.status_code == 200, response.text
    sources = [m["source"] for m in response.json()["models"]]
    # mergekit: a path that exists is local; anything else is a repo id
    assert sources[0] == "small/ft1" and sources[1].startswith("hf://org/on-the-hub")
