"""The CLI's help screens start without the heavy engine modules (issue 13: imports under 1.5 s).

A structural check, not a timing: ``python -X importtime`` lists every module a command imported; torch,
safetensors, transformers and the pydantic recipe models must not be among them for ``--help``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = (
    "torch",
    "safetensors",
    "transformers",
    "pydantic",
    "numpy",
    "merge_ops.pipeline",
    "merge_ops.recipe",
)


def imported_modules(*argv: str) -> set[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "app.cli", *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage: alloy" in proc.stdout
    modules = {
        line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")
    }
    assert "argparse" in modules  # the listing is real: the CLI's own imports are in it
    return modules


@pytest.mark.parametrize("argv", [("merge", "--help"), ("--help",), ("extract", "--help")])
def test_help_imports_no_engine(argv: tuple[str, ...]) -> None:
    modules = imported_modules(*argv)
    loaded = sorted(m for m in modules if m.split(".")[0] in HEAVY or m in HEAVY)
    assert loaded == [], f"`alloy {' '.join(argv)}` imported {loaded[:10]}"
