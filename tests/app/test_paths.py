"""Local sources and outputs stay inside ALLOY_DATA_DIRS: '..', symlinks out and absolute paths elsewhere are 422."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from app.services.paths import confine_path
from tests.app.conftest import Api, recipe


def _errors(response) -> dict[tuple[str, ...], str]:
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "path_not_allowed"
    return {tuple(e["loc"]): e["msg"] for e in response.json()["errors"]}


def test_dotdot_is_refused_even_when_it_lands_inside(api: Api) -> None:
    errors = _errors(api.post_recipe(recipe(base="ft1/../base", models=[{"source": "../../etc"}])))
    assert ("base",) in errors and ("models", "0", "source") in errors
    assert "'..'" in errors[("base",)]
    assert api.messages() == []


def test_symlink_out_of_the_roots_is_refused(api: Api, tmp_path: Path) -> None:
    outside = tmp_path / "outside" / "secret_model"
    outside.mkdir(parents=True)
    os.symlink(outside, api.data / "link")
    os.symlink(tmp_path / "outside", api.data / "outdir")
    errors = _errors(api.post_recipe(recipe(base="link", output={"path": "outdir/merged"})))
    assert set(errors) == {("base",), ("output", "path")}
    # an absolute path through the symlink is caught too
    errors = _errors(api.post_recipe(recipe(base=str(api.data / "link"))))
    assert set(errors) == {("base",)}


def test_symlink_inside_the_roots_is_followed(api: Api) -> None:
    os.symlink(api.data / "ft1", api.data / "alias")
    response = api.post_recipe(recipe(models=[{"source": "alias"}]))
    assert response.status_code == 202
    assert response.json()["recipe"]["models"][0]["source"] == str((api.data / "ft1").resolve())


def test_absolute_paths_elsewhere_are_refused(api: Api, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    errors = _errors(api.post_recipe(recipe(base=str(elsewhere), output={"path": "/etc/merged"})))
    assert set(errors) == {("base",), ("output", "path")}
    assert api.post_recipe(recipe(base=str(api.data / "base"))).status_code == 202


def test_missing_source_is_refused_hub_sources_are_not_paths(api: Api) -> None:
    errors = _errors(api.post_recipe(recipe(models=[{"source": "nope"}, {"source": "hf://org/model@main"}])))
    assert set(errors) == {("models", "0", "source")}
    response = api.post_recipe(
        recipe(
            models=[{"source": "hf://org/model@main"}, {"source": {"repo": "org/other", "revision": "v1"}}]
        )
    )
    assert response.status_code == 202
    assert response.json()["recipe"]["models"][0]["source"] == "hf://org/model@main"


def test_confine_path_tries_roots_in_order(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    (second / "model").mkdir(parents=True)
    first.mkdir()
    assert confine_path("model", roots=[first, second], must_exist=True) == (second / "model").resolve()
    # outputs that don't exist yet go to the first root
    assert (
        confine_path("new/out", roots=[first, second], must_exist=False) == (first / "new" / "out").resolve()
    )
    with pytest.raises(ValueError):
        confine_path("missing", roots=[first, second], must_exist=True)
    with pytest.raises(ValueError):
        confine_path(str(tmp_path), roots=[first, second], must_exist=False)


def test_slice_sources_are_confined_and_the_stored_recipe_still_validates(api: Api) -> None:
    """A sliced recipe through the API: its slices' paths are confined, and the stored recipe (which carries the
    models derived from the slices) validates again in the worker. Both used to fail: confining re-validated a
    dump with models and slices, a 422 "set either models or slices" for every sliced recipe."""
    from merge_ops.recipe import Recipe

    sliced = recipe(
        models=None,
        slices=[{"sources": [{"source": "base", "layers": [0, 1]}, {"source": "ft1", "layers": [0, 1]}]}],
    )
    del sliced["models"]
    response = api.post_recipe(sliced)
    assert response.status_code == 202, response.text
    stored = Recipe.model_validate(response.json()["recipe"])
    assert stored.slices is not None
    assert stored.slices[0].sources[1].source == str((api.data / "ft1").resolve())
    assert [m.source for m in stored.models] == [str((api.data / "ft1").resolve())]
    errors = _errors(
        api.post_recipe(
            {
                **sliced,
                "slices": [
                    {"sources": [{"source": "base", "layers": [0, 1]}, {"source": "../x", "layers": [0, 1]}]}
                ],
            }
        )
    )
    assert set(errors) == {("slices", "0", "sources", "1", "source")}


def test_lora_and_tokenizer_sources_are_confined(api: Api) -> None:
    errors = _errors(
        api.post_recipe(
            recipe(
                base_lora="/etc",
                models=[{"source": "ft1", "lora": "../adapter"}],
                tokenizer={"source": "/etc/tok"},
            )
        )
    )
    assert set(errors) == {("base_lora",), ("models", "0", "lora"), ("tokenizer", "source")}
