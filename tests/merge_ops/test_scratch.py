"""Scratch folders left by killed merges are removed by the next merge into the same output, when their owner
is a dead process of this machine; anything else is left alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from merge_ops.pipeline import run_merge
from merge_ops.recipe import load_recipe
from merge_ops.scratch import _machine, new_scratch, remove_abandoned
from tests.utils.factories import make_llama_like

pytestmark = pytest.mark.skipif(_machine() is None, reason="needs /proc (boot id and pid namespace)")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _scratch(parent: Path, target: str, owner: str, pid: int) -> Path:
    path = parent / f".{target}.alloy-tmp-{owner}-{pid}-0123456789ab"
    path.mkdir()
    (path / "model.safetensors").write_bytes(b"partial")
    return path


def test_only_dead_owners_of_this_machine_are_removed(tmp_path: Path) -> None:
    me = _machine()
    assert me is not None
    dead = _scratch(tmp_path, "out", me, _dead_pid())
    alive = _scratch(tmp_path, "out", me, os.getppid())
    ours = _scratch(tmp_path, "out", me, os.getpid())
    elsewhere = _scratch(tmp_path, "out", "0000000000", _dead_pid())
    other_output = _scratch(tmp_path, "other", me, _dead_pid())
    old_style = tmp_path / ".out.alloy-tmp-0123456789ab"
    old_style.mkdir()
    assert remove_abandoned(tmp_path, "out") == [dead]
    assert not dead.exists()
    assert all(p.exists() for p in (alive, ours, elsewhere, other_output, old_style))
    fresh = new_scratch(tmp_path, "out")
    assert fresh.name.startswith(f".out.alloy-tmp-{me}-{os.getpid()}-") and not fresh.exists()


def test_a_merge_clears_what_a_killed_merge_into_its_output_left(tmp_path: Path) -> None:
    base = make_llama_like(tmp_path / "base", seed=0)
    model = make_llama_like(tmp_path / "a", seed=1, perturb_from=base)
    me = _machine()
    assert me is not None
    left = _scratch(tmp_path, "merged", me, _dead_pid())
    recipe = load_recipe(
        {
            "method": "task_arithmetic",
            "base": str(base),
            "models": [{"source": str(model)}],
            "output": {"path": str(tmp_path / "merged")},
        }
    )
    run_merge(recipe)
    assert not left.exists()
    assert [p.name for p in tmp_path.iterdir() if "alloy-tmp" in p.name] == []
    assert (tmp_path / "merged" / "model.safetensors").is_file()
