"""The engine asks torch's OpenMP threads not to spin between parallel regions (they took a core from the
compiled passes), before torch loads libgomp, unless the user chose otherwise; and the CLI imports the engine
package before torch."""

from __future__ import annotations

from tests.utils.env_probe import probe

# the policy as set when torch (and with it libgomp) is imported by the merge pipeline
PROBE = "import sys, os, merge_ops.pipeline; print(os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules)"


def _probe(env_value: str | None, code: str = PROBE) -> str:
    return probe(code, variable="OMP_WAIT_POLICY", value=env_value)


def test_passive_by_default_and_the_users_choice_is_kept() -> None:
    assert _probe(None) == "PASSIVE True"
    assert _probe("ACTIVE") == "ACTIVE True"
    assert _probe(None, "import os, kernels; print(os.environ['OMP_WAIT_POLICY'])") == "PASSIVE"


def test_the_engine_package_comes_before_torch() -> None:
    """Whatever imports a merge_ops module runs merge_ops/__init__ first; the CLI's own first import is one."""
    code = (
        "import sys, os, app.cli; "
        "print(os.environ.get('OMP_WAIT_POLICY'), 'merge_ops' in sys.modules, 'torch' in sys.modules)"
    )
    assert _probe(None, code) == "PASSIVE True False"
