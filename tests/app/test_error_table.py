"""Every typed error code has its HTTP status in the one table (a code missing there answered a bare 500)."""

from __future__ import annotations

import app.services.errors as service_errors
import merge_ops.errors as engine_errors
from app.api.problems import STATUS_BY_CODE


def _codes(module: object, base: type) -> set[str]:
    classes = [v for v in vars(module).values() if isinstance(v, type) and issubclass(v, base)]
    return {c.code for c in classes}


def test_every_error_code_has_a_status() -> None:
    codes = _codes(engine_errors, engine_errors.MergeError) | _codes(service_errors, engine_errors.MergeError)
    assert "hub_conflict" in codes and "worker_lost" in codes and "internal_error" in codes
    assert sorted(codes - set(STATUS_BY_CODE)) == []
    assert STATUS_BY_CODE["hub_conflict"] == 409


def test_the_cli_reports_a_bad_compression_argument_in_one_line(tmp_path) -> None:
    """compress_task_vector raised ValueError, which ended in a traceback; it is a typed error now."""
    import subprocess
    import sys

    import torch

    from tests.utils.factories import make_checkpoint

    tv = make_checkpoint(tmp_path / "tv", {"w": torch.ones(4, 4)}, metadata={"alloy_format": "task_vector"})
    run = subprocess.run(
        [sys.executable, "-m", "app.cli", "compress", str(tv), "--out", str(tmp_path / "c"), "--alpha", "-1"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 1, run.stderr
    assert run.stderr.strip().splitlines() == [
        "alloy: error [invalid_argument]: alpha must be positive, got -1.0"
    ]
