"""Issue 17 (weak): a full checkpoint marked ``alloy_format: task_vector`` is refused, not merged as a delta."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import save_file

from merge_ops.artifacts import extract_task_vector
from merge_ops.compressed import FORMAT_KEY, TASK_VECTOR_FORMAT
from merge_ops.errors import IncompatibleModelsError
from merge_ops.pipeline import run_merge
from merge_ops.recipe import load_recipe
from tests.utils.factories import load_all, make_llama_like


def test_a_full_checkpoint_marked_as_task_vector_is_refused(tmp_path: Path) -> None:
    base = make_llama_like(tmp_path / "base")
    ft = make_llama_like(tmp_path / "ft", perturb_from=base, seed=1)
    fake = tmp_path / "fake-tv"
    fake.mkdir()
    save_file(load_all(ft), str(fake / "model.safetensors"), metadata={FORMAT_KEY: TASK_VECTOR_FORMAT})
    recipe = load_recipe(
        {
            "method": "task_arithmetic",
            "base": str(base),
            "models": [{"source": str(fake)}],
            "output": {"path": str(tmp_path / "out")},
        }
    )
    with pytest.raises(IncompatibleModelsError, match="looks like full weights"):
        run_merge(recipe)
    assert not (tmp_path / "out").exists()


def test_a_real_task_vector_still_merges(tmp_path: Path) -> None:
    base = make_llama_like(tmp_path / "base")
    ft = make_llama_like(tmp_path / "ft", perturb_from=base, seed=1)
    extract_task_vector(base, ft, out=tmp_path / "tv")
    recipe = load_recipe(
        {
            "method": "task_arithmetic",
            "base": str(base),
            "models": [{"source": str(tmp_path / "tv")}],
            "output": {"path": str(tmp_path / "out")},
        }
    )
    run_merge(recipe)
    assert (tmp_path / "out" / "alloy-report.json").exists()
