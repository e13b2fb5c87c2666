"""Issue 17: no raw library text reaches a user, and the CLI's pickle refusal is one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from huggingface_hub.errors import OfflineModeIsEnabled

from merge_ops.hub import _httpx, map_hub_error
from tests.utils.factories import make_llama_like

ROOT = Path(__file__).resolve().parents[2]


def test_network_errors_say_what_to_do_not_the_library_text() -> None:
    # the httpx flavour huggingface_hub itself raises
    for exc in (
        _httpx.ConnectError("[Errno -2] Name or service not known"),
        ConnectionRefusedError(111, "x"),
    ):
        error = map_hub_error(exc, what="resolve org/m")
        assert error is not None and error.transient
        assert "Errno" not in error.detail and "ConnectError" not in error.detail
        assert "could not reach the Hub" in error.detail and "local path" in error.detail
    offline = map_hub_error(
        OfflineModeIsEnabled(
            "Cannot reach https://huggingface.co: offline mode is enabled. To disable it, "
            "please unset the `HF_HUB_OFFLINE` environment variable."
        ),
        what="download org/m",
    )
    assert offline is not None and "HF_HUB_OFFLINE" not in offline.detail and "offline mode" in offline.detail


class _Payload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("echo pwned",))  # never run: the weights-only loader refuses the global


def test_a_pickle_payload_is_refused_on_one_line(tmp_path: Path) -> None:
    base = make_llama_like(tmp_path / "base", seed=0)
    evil = tmp_path / "evil"
    evil.mkdir()
    torch.save({"x": torch.zeros(1), "y": _Payload()}, evil / "pytorch_model.bin")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "method": "task_arithmetic",
                "base": str(base),
                "models": [{"source": str(evil)}],
                "allow_pickle": True,
                "output": {"path": str(tmp_path / "out")},
            }
        )
    )
    run = subprocess.run(
        [sys.executable, "-m", "app.cli", "merge", str(recipe)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("alloy: error [unsafe_checkpoint]") and "system" in lines[0]
    assert "pwned" not in run.stdout and not (tmp_path / "out").exists()
