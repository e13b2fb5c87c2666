"""Property-based API test: schemathesis generates requests from the app's OpenAPI document and checks that no
response is a 5xx and that each conforms to the documented status codes, content types and schemas."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import checks
from sqlalchemy import delete

from app.db import init_db
from app.main import create_app
from app.models import Batch, Job
from app.services.tokens import create_token
from tests.app.conftest import make_settings
from tests.utils.hub_server import HubServer

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


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    server = HubServer(tmp_path_factory.mktemp("hub"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def alloy_schema(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hub: HubServer) -> Any:
    # no worker runs here: /readyz's 503 is tested in test_health; let it answer 200 so 5xx stays a failure
    monkeypatch.setattr("app.core.queue.ping_workers", lambda settings, timeout_s: ["celery@test"])
    # the Hub search talks to the local Hub server: the default endpoint is unreachable from CI, and
    # huggingface_hub's retries made each generated search wait out the 10 s read timeout
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    for name in ("base", "ft1"):
        (tmp_path / "data" / name).mkdir(parents=True, exist_ok=True)
    app = create_app(
        make_settings(
            tmp_path,
            rate_limit_per_minute=100_000,
            validate_rate_limit_per_minute=100_000,
            events_max_s=0.5,  # a stream on a job that never ends (no worker here) closes quickly
            max_body_bytes=64_000,
        )
    )
    init_db(app.state.engine)  # the ASGI transport does not run the lifespan
    with app.state.sessionmaker() as session:
        _state["token"] = create_token(session, name="schemathesis", admin=True)
    _state["sessionmaker"] = app.state.sessionmaker
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


def _merge(seed: int) -> dict[str, Any]:
    return {"method": "task_arithmetic", "base": "base", "models": [{"source": "ft1"}], "seed": seed}


VALID_BODIES = {
    "POST /v1/merges": _merge,
    "POST /v1/batches": lambda seed: {"recipes": [_merge(seed), _merge(seed + 1)]},
    "POST /v1/analyses": lambda seed: {"sources": ["ft1"], "base": "base", "priority": seed % 10},
}


@pytest.mark.slow
def test_api_statefully_has_no_server_errors(alloy_schema: Any) -> None:
    """Chains calls along the schema's links (submit -> get, report, events, cancel; batch -> get), with the
    rate limits raised so that sequences reach the later steps; every response checked as above."""
    token = _state["token"]

    class AlloyStateMachine(alloy_schema.as_state_machine()):  # type: ignore[misc]
        def setup(self) -> None:
            # Hypothesis replays a scenario from its recorded choices and requires the same draws: the links it
            # follows depend on the responses, so each scenario starts from an empty job store (jobs left by an
            # earlier scenario changed list contents and quotas, and made the replay draw differently)
            with _state["sessionmaker"].begin() as session:
                session.execute(delete(Job))
                session.execute(delete(Batch))

        def before_call(self, case: Any) -> None:
            case.headers = {**(case.headers or {}), "Authorization": f"Bearer {token}"}
            # generated recipes are nearly always (rightly) 422, so the links would rarely be followed: make
            # every other producer call a valid one, varied by the generated body
            valid = VALID_BODIES.get(case.operation.label)
            if valid is not None and hash(repr(case.body)) % 2 == 0:
                case.body = valid(abs(hash(repr(case.body))) % 1000)
                case.media_type = "application/json"

        def validate_response(self, response: Any, case: Any, **kwargs: Any) -> None:
            case.validate_response(response, checks=CHECKS)

    AlloyStateMachine.run(
        settings=settings(
            max_examples=30,
            stateful_step_count=6,
            deadline=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
    )
