"""Property-based API test: schemathesis generates requests from the app's OpenAPI document and checks that no
response is a 5xx and that each conforms to the documented status codes, content types and schemas."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import checks

from app.db import init_db
from app.main import create_app
from app.services.tokens import create_token
from tests.app.conftest import make_settings

_state: dict[str, Any] = {}
# POST /v1/files takes raw JSONL bytes: send generated binary bodies as they are (the route answers 422 or 201)
schemathesis.serializer.alias(["application/x-ndjson", "application/jsonl"], "application/octet-stream")
# Conformance checks only: "positive data acceptance" can't hold because part of a recipe's validity (files that
# exist inside the data dirs, cross-field rules such as a method's minimum model count) is not expressible in JSON
# schema, so a schema-valid recipe may rightly get a 422.
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.response_headers_conformance,
]


@pytest.fixture
def alloy_schema(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    # no worker runs here: /readyz's 503 is tested in test_health; let it answer 200 so 5xx stays a failure
    monkeypatch.setattr("app.core.queue.ping_workers", lambda settings, timeout_s: ["celery@test"])
    for name in ("base", "ft1"):
        (tmp_path / "data" / name).mkdir(parents=True, exist_ok=True)
    app = create_app(make_settings(tmp_path, rate_limit_per_minute=100_000, max_body_bytes=64_000))
    init_db(app.state.engine)  # the ASGI transport does not run the lifespan
    with app.state.sessionmaker() as session:
        _state["token"] = create_token(session, name="schemathesis", admin=True)
    return schemathesis.openapi.from_asgi("/openapi.json", app)


schema = schemathesis.pytest.from_fixture("alloy_schema")


@pytest.mark.slow
@schema.parametrize()
@settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.function_scoped_fixture,
    ],
)
def test_api_conforms_to_its_schema(case: Any) -> None:
    case.call_and_validate(headers={"Authorization": f"Bearer {_state['token']}"}, checks=CHECKS)
