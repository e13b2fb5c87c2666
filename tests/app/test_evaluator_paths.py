"""A greedy-soup evaluator's ``data`` and ``model`` are confined to ALLOY_DATA_DIRS like sources are."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tests.app.conftest import Api, recipe


def _soup(**evaluator: Any) -> dict[str, Any]:
    return recipe(method="greedy_soup", params={}, evaluator={"kind": "causal_lm_loss", **evaluator})


def _errors(response: Any) -> dict[tuple[str, ...], str]:
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "path_not_allowed"
    return {tuple(e["loc"]): e["msg"] for e in response.json()["errors"]}


def test_relative_evaluator_paths_are_rewritten_to_absolute_realpaths(api: Api) -> None:
    (api.data / "heldout.jsonl").write_text('{"text": "a"}\n')
    response = api.post_recipe(_soup(data="heldout.jsonl", model="base"))
    assert response.status_code == 202, response.text
    evaluator = response.json()["recipe"]["evaluator"]
    assert evaluator["data"] == str((api.data / "heldout.jsonl").resolve())
    assert evaluator["model"] == str((api.data / "base").resolve())
    # the spelling does not change the job: an absolute path is the same submission
    again = api.post_recipe(_soup(data=str(api.data / "heldout.jsonl"), model=str(api.data / "base")))
    assert again.status_code == 202 and again.json()["id"] == response.json()["id"]


def test_dotdot_symlink_out_absolute_elsewhere_and_missing_are_422(api: Api, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jsonl").write_text('{"text": "a"}\n')
    os.symlink(outside / "secret.jsonl", api.data / "link.jsonl")
    cases = [
        {"data": "base/../heldout.jsonl", "model": "../outside"},
        {"data": "link.jsonl", "model": str(outside)},
        {"data": str(outside / "secret.jsonl"), "model": "no-such-model"},
    ]
    for evaluator in cases:
        errors = _errors(api.post_recipe(_soup(**evaluator)))
        assert set(errors) == {("evaluator", "data"), ("evaluator", "model")}, evaluator
    assert "'..'" in _errors(api.post_recipe(_soup(data="base/../x.jsonl")))[("evaluator", "data")]
    assert api.messages() == []


def test_validate_reports_evaluator_paths_with_the_other_paths(api: Api) -> None:
    response = api.client.post(
        "/v1/recipes/validate", json=_soup(data="/etc/passwd") | {"base": "../base"}, headers=api.headers()
    )
    assert set(_errors(response)) == {("base",), ("evaluator", "data")}
