"""``import kernels`` asks torch for transparent huge pages on large CPU allocations (fewer page faults per merged
tensor), unless the user chose otherwise; either way results are the same."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROBE = "import os, kernels; print(os.environ['THP_MEM_ALLOC_ENABLE'])"


def _probe(env_value: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    env["PYTHONPATH"] = str(ROOT)
    if env_value is not None:
        env["THP_MEM_ALLOC_ENABLE"] = env_value
    proc = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


def test_huge_pages_on_by_default() -> None:
    assert _probe(None) == "1"


def test_users_choice_is_kept() -> None:
    assert _probe("0") == "0"
