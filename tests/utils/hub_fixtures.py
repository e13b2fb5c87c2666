"""Pytest fixtures for the local Hub server. ``tests/conftest.py`` registers them:

    pytest_plugins = ["tests.utils.hub_fixtures"]

``hub_server`` is a fresh, empty server per test (loopback, free port) with two tokens: ``WRITE_TOKEN`` writes
(and reads) the ``alloy`` namespace, ``READ_TOKEN`` reads nothing private. ``hub_client`` is a ``HubClient``
with the write token, a per-test cache and fast retries, pointed at the server.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.utils.hub_server import READ_TOKEN, WRITE_TOKEN, HubServer


@pytest.fixture
def hub_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    server = HubServer(tmp_path_factory.mktemp("hub-server"))
    server.add_token(WRITE_TOKEN, write=["alloy"])
    server.add_token(READ_TOKEN)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def hub_client(hub_server: HubServer, tmp_path: Path):
    from merge_ops.hub import HubClient

    return HubClient(
        token=WRITE_TOKEN,
        cache_dir=tmp_path / "hf-cache",
        endpoint=hub_server.url,
        backoff_s=0.01,
        timeout_s=5.0,
    )
