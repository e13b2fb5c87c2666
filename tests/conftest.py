"""Fixtures shared by every suite: the local Hub server (tests/utils/hub_fixtures.py)."""

pytest_plugins = ["tests.utils.hub_fixtures"]
