"""Shared fixtures of the engine's tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.utils.factories import make_llama_like


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    base = make_llama_like(root / "base", seed=0)
    return {
        "base": base,
        "a": make_llama_like(root / "a", seed=1, perturb_from=base),
        "b": make_llama_like(root / "b", seed=2, perturb_from=base, sharded_max_bytes=4096),
        "c": make_llama_like(root / "c", seed=3, perturb_from=base),
    }
