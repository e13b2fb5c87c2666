"""``import kernels`` asks torch for transparent huge pages on large CPU allocations (fewer page faults per merged
tensor), unless the user chose otherwise; either way results are the same."""

from __future__ import annotations

from tests.utils.env_probe import probe

PROBE = "import os, kernels; print(os.environ['THP_MEM_ALLOC_ENABLE'])"


def _probe(env_value: str | None) -> str:
    return probe(PROBE, variable="THP_MEM_ALLOC_ENABLE", value=env_value)


def test_huge_pages_on_by_default() -> None:
    assert _probe(None) == "1"


def test_users_choice_is_kept() -> None:
    assert _probe("0") == "0"
