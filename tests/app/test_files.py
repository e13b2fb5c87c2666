"""POST /v1/files: held-out JSONL uploads are validated, size-limited and stored content-addressed."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.app.conftest import Api, recipe, start_api

ROWS = b'{"text": "good", "label": 1}\n\n{"text": "bad", "label": 0}\n'


def _upload(api: Api, body: bytes, *, media_type: str = "application/x-ndjson", token: str | None = None):
    return api.client.post(
        "/v1/files", content=body, headers=api.headers(token, **{"Content-Type": media_type})
    )


def test_upload_is_stored_content_addressed_under_the_first_data_dir(api: Api) -> None:
    response = _upload(api, ROWS)
    assert response.status_code == 201, response.text
    digest = hashlib.sha256(ROWS).hexdigest()
    expected = (api.data / "uploads" / f"{digest}.jsonl").resolve()
    assert response.json() == {"path": str(expected), "sha256": digest, "bytes": len(ROWS), "lines": 2}
    assert expected.read_bytes() == ROWS
    # same bytes, same file; application/jsonl is accepted too
    again = _upload(api, ROWS, media_type="application/jsonl; charset=utf-8")
    assert again.status_code == 201 and again.json() == response.json()
    assert sorted(p.name for p in expected.parent.iterdir()) == [expected.name]


def test_uploaded_path_is_accepted_as_evaluator_data(api: Api) -> None:
    path = _upload(api, ROWS).json()["path"]
    evaluator = {"kind": "causal_lm_loss", "data": path}
    response = api.post_recipe(recipe(method="greedy_soup", params={}, evaluator=evaluator))
    assert response.status_code == 202, response.text
    assert response.json()["recipe"]["evaluator"]["data"] == path


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"\xff\xfe not utf-8\n", "not UTF-8"),
        (b'{"text": "a"}\n{"text": \n', "line 2 is not JSON"),
        (b'{"text": "a"}\n[1, 2]\n', "line 2 is not a JSON object"),
        (b"\n  \n", "no JSON objects"),
    ],
)
def test_invalid_jsonl_is_422_and_nothing_is_stored(api: Api, body: bytes, fragment: str) -> None:
    response = _upload(api, body)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["code"] == "invalid_upload"
    assert fragment in response.json()["detail"]
    assert not (api.data / "uploads").exists() or not any((api.data / "uploads").iterdir())


def test_wrong_media_type_and_missing_token_are_refused(api: Api) -> None:
    assert _upload(api, ROWS, media_type="application/json").status_code == 415
    response = api.client.post("/v1/files", content=ROWS, headers={"Content-Type": "application/x-ndjson"})
    assert response.status_code == 401


@pytest.fixture
def small_api(tmp_path: Path) -> Iterator[Api]:
    yield from start_api(tmp_path, max_upload_bytes=2048)


def test_upload_over_the_limit_is_413(small_api: Api) -> None:
    row = json.dumps({"text": "x" * 100}).encode() + b"\n"
    assert _upload(small_api, row * 10).status_code == 201
    response = _upload(small_api, row * 30)
    assert response.status_code == 413
    assert response.json()["code"] == "payload_too_large"
