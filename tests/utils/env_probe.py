"""Run a line of Python in a fresh interpreter with one environment variable set or unset, and return what it
printed: for settings read once per process (when a library loads), which an in-process test can't see."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def probe(code: str, *, variable: str, value: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != variable}
    env["PYTHONPATH"] = str(ROOT)
    if value is not None:
        env[variable] = value
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()
