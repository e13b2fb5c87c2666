"""The engine asks torch's OpenMP threads not to spin between parallel regions (they took a core from the
compiled passes), before torch loads libgomp, unless the user chose otherwise; and the CLI imports the engine
package before torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# the policy as set when torch (and with it libgomp) is imported by the merge pipeline
PROBE = "import sys, os, merge_ops.pipeline; print(os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules)"


def _probe(env_value: str | None, code: str = PROBE) -> str:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = str(ROOT)
    if env_value is not None:
        env["OMP_WAIT_POLICY"] = env_value
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


def test_passive_by_default_and_the_users_choice_is_kept() -> None:
    assert _probe(None) == "PASSIVE True"
    assert _probe("ACTIVE") == "ACTIVE True"


def test_the_engine_package_comes_before_torch() -> None:
    """Whatever imports a merge_ops module runs merge_ops/__init__ first; the CLI's own first import is one."""
    code = (
        "import sys, os, app.cli; "
        "print(os.environ.get('OMP_WAIT_POLICY'), 'merge_ops' in sys.modules, 'torch' in sys.modules)"
    )
    assert _probe(None, code) == "PASSIVE True False"
