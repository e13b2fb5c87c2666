"""Fixtures for API tests: a real SQLite job store and a real filesystem:// broker in a temp dir (enqueue writes
actual Celery messages, which tests read back), no worker."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from app.core.config import Settings
from app.db import make_engine
from app.main import create_app
from app.services.tokens import create_token


@dataclass
class Api:
    client: TestClient
    settings: Settings
    data: Path
    user: str
    other: str
    admin: str

    def headers(self, token: str | None = None, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.user}", **extra}

    def post_recipe(self, recipe: dict[str, Any], *, token: str | None = None, **headers: str) -> Any:
        return self.client.post("/v1/merges", json=recipe, headers=self.headers(token, **headers))

    def messages(self) -> list[dict[str, Any]]:
        """The Celery messages enqueued so far: {task, args, kwargs, priority, queue}."""
        folder = Path(self.settings.broker_transport_options()["data_folder_out"])
        found = []
        for path in sorted(folder.glob("*.msg"), key=lambda p: p.stat().st_mtime_ns):
            message = json.loads(path.read_text())
            args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
            found.append(
                {
                    "task": message["headers"]["task"],
                    "args": args,
                    "kwargs": kwargs,
                    "priority": message["properties"].get("priority"),
                    "file": path.name,
                    "raw": path.read_text(),
                }
            )
        return found


#: A SQLAlchemy URL of a throwaway Postgres database; when set, every API test also runs against it.
POSTGRES_URL = os.environ.get("ALLOY_TEST_POSTGRES")
STORES = ["sqlite", *(["postgres"] if POSTGRES_URL else [])]


def reset_postgres(url: str) -> None:
    """Drop Alloy's tables so each test migrates an empty database (the URL must name a test database)."""
    engine = make_engine(url)
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE IF EXISTS jobs, batches, api_tokens, alembic_version CASCADE"))
    engine.dispose()


@pytest.fixture(params=STORES)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgres":
        assert POSTGRES_URL is not None
        reset_postgres(POSTGRES_URL)
        return POSTGRES_URL
    return f"sqlite:///{tmp_path / 'alloy.db'}"


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "home": tmp_path / "home",
        "database_url": f"sqlite:///{tmp_path / 'alloy.db'}",
        "broker_url": f"filesystem://{tmp_path / 'broker'}",
        "data_dirs": [tmp_path / "data"],
        "rate_limit_per_minute": 1000,
        "pin_hub_sources": False,
        "events_poll_s": 0.05,
        "readiness_timeout_s": 0.2,
    }
    values.update(overrides)
    return Settings(**values)


def start_api(tmp_path: Path, database_url: str | None = None, **overrides: Any) -> Iterator[Api]:
    data = tmp_path / "data"
    for name in ("base", "ft1", "ft2", "ft3"):
        (data / name).mkdir(parents=True, exist_ok=True)
    if database_url:
        overrides["database_url"] = database_url
    settings = make_settings(tmp_path, **overrides)
    app = create_app(settings)
    with TestClient(app) as client:
        with app.state.sessionmaker() as session:
            user = create_token(session, name="user")
            other = create_token(session, name="other")
            admin = create_token(session, name="admin", admin=True)
        yield Api(client=client, settings=settings, data=data, user=user, other=other, admin=admin)


@pytest.fixture
def api(tmp_path: Path, database_url: str) -> Iterator[Api]:
    yield from start_api(tmp_path, database_url)


def recipe(**changes: Any) -> dict[str, Any]:
    """A valid task-arithmetic recipe over the fixture folders."""
    base: dict[str, Any] = {
        "method": "task_arithmetic",
        "base": "base",
        "models": [{"source": "ft1"}, {"source": "ft2", "weight": 0.5}],
        "params": {"lambda": 0.8},
        "output": {"path": "out/merged"},
    }
    base.update(changes)
    return base
