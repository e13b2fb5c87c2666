"""A burst of requests never waits on the job store's connection pool (64 clients stalled after 15 submissions:
SQLAlchemy's default pool of 5 + 10 connections, each held by a request for its whole duration)."""

from __future__ import annotations

from fastapi.security import HTTPAuthorizationCredentials

from app.api.deps import require_token
from app.main import REQUEST_THREADS
from tests.app.conftest import Api


def test_the_pool_has_a_connection_for_every_request_thread(api: Api) -> None:
    pool = api.client.app.state.engine.pool
    assert pool.size() >= REQUEST_THREADS


def test_the_token_lookup_gives_its_connection_back(api: Api) -> None:
    session = api.client.app.state.sessionmaker()
    try:
        secret = api.headers()["Authorization"].split()[1]
        token = require_token(session, HTTPAuthorizationCredentials(scheme="Bearer", credentials=secret))
        assert token.id  # still readable (expire_on_commit=False)
        assert not session.in_transaction()  # no connection held while the request validates its body
    finally:
        session.close()
