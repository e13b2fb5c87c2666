"""Rate limiting, body size and body syntax: all answered as problem details."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from app.core.ratelimit import SlidingWindowLimiter
from tests.app.conftest import Api, recipe, start_api


@pytest.fixture
def limited(tmp_path: Path, database_url: str) -> Iterator[Api]:
    yield from start_api(tmp_path, database_url, rate_limit_per_minute=2, max_body_bytes=2048)


def test_submissions_are_rate_limited_per_token(limited: Api) -> None:
    for seed in range(2):
        assert limited.post_recipe(recipe(seed=seed)).status_code == 202
    response = limited.post_recipe(recipe(seed=9))
    assert response.status_code == 429
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == "rate_limited"
    assert 1 <= int(response.headers["retry-after"]) <= 60
    # batches count as submissions; reads are not limited; other tokens have their own window
    assert (
        limited.client.post(
            "/v1/batches", json={"recipes": [recipe()]}, headers=limited.headers()
        ).status_code
        == 429
    )
    assert limited.client.get("/v1/merges", headers=limited.headers()).status_code == 200
    assert limited.post_recipe(recipe(seed=9), token=limited.other).status_code == 202


def test_sliding_window_frees_slots_as_time_passes() -> None:
    now = [0.0]
    limiter = SlidingWindowLimiter(2, window_s=60, clock=lambda: now[0])
    assert limiter.acquire("t") is None
    now[0] = 30
    assert limiter.acquire("t") is None
    assert limiter.acquire("t") == pytest.approx(30)
    now[0] = 60.5  # the first hit left the window
    assert limiter.acquire("t") is None
    assert limiter.acquire("t") == pytest.approx(29.5)
    assert limiter.acquire("other") is None


def test_oversized_body_is_413(limited: Api) -> None:
    big = recipe(filters={"include": ["x" * 4000]})
    response = limited.post_recipe(big)
    assert response.status_code == 413 and response.json()["code"] == "payload_too_large"
    # without Content-Length (chunked) the stream is cut at the limit too
    chunks = (b'{"method": "ties", "pad": "' + b"x" * 1000 + b'"}' for _ in range(3))
    response = limited.client.post(
        "/v1/merges", content=chunks, headers=limited.headers(**{"Content-Type": "application/json"})
    )
    assert response.status_code == 413
    assert limited.messages() == []


@pytest.mark.parametrize(
    "content,content_type,status,code",
    [
        (b'{"method": "ties",', "application/json", 400, "malformed_body"),
        (b"method: [ties\n", "application/yaml", 400, "malformed_body"),
        (b"\xff\xfe\x00", "application/json", 400, "malformed_body"),
        (b"[1, 2]", "application/json", 422, "invalid_recipe"),
        (b"just text", "application/yaml", 422, "invalid_recipe"),
        (b"method=ties", "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
    ],
)
def test_malformed_bodies(api: Api, content: bytes, content_type: str, status: int, code: str) -> None:
    response = api.client.post(
        "/v1/merges", content=content, headers=api.headers(**{"Content-Type": content_type})
    )
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["code"] == code and problem["status"] == status
    assert {"type", "title", "detail"} <= set(problem) and "Traceback" not in response.text


def test_unknown_route_and_method_are_problems(api: Api) -> None:
    response = api.client.get("/v1/nothing-here", headers=api.headers())
    assert response.status_code == 404 and response.headers["content-type"] == "application/problem+json"
    response = api.client.put("/healthz")
    assert response.status_code == 405 and response.json()["code"] == "method_not_allowed"
