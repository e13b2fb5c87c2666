"""Fixtures shared by every suite: the local Hub server, Redis, Celery workers and the API (tests/utils/)."""

pytest_plugins = ["tests.utils.hub_fixtures", "tests.utils.services"]
