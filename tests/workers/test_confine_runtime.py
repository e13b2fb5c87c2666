"""Issue 17, item 8 at run time: the worker re-checks every source file just before the merge, because a link
inside an accepted folder can change after submission."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from workers.pipeline import run_job

from .helpers import make_models, stray_files, task_arithmetic_recipe


def test_a_link_planted_after_submission_fails_the_job(
    job_store: Any, alloy_settings: Any, tmp_path: Path
) -> None:
    data = alloy_settings.data_dirs[0]
    base, fts = make_models(data / "models")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.json").write_text('{"token": "hf_secret"}')
    job_id = job_store.insert_job(task_arithmetic_recipe(base, fts, data / "o"))
    (base / "tokenizer.json").unlink(missing_ok=True)
    (base / "tokenizer.json").symlink_to(outside / "secret.json")  # after submission, before the run
    assert run_job(job_id, settings=alloy_settings).status == "failed"
    job = job_store.job(job_id)
    assert job.error_code == "unsafe_checkpoint" and "tokenizer.json" in job.error_detail
    assert not (data / "o").exists() and stray_files(data) == []


def test_an_output_under_a_file_fails_as_output_error(job_store: Any, alloy_settings: Any) -> None:
    data = alloy_settings.data_dirs[0]
    base, fts = make_models(data / "models")
    (data / "afile").write_text("x")
    job_id = job_store.insert_job(task_arithmetic_recipe(base, fts, data / "afile" / "out"))
    assert run_job(job_id, settings=alloy_settings).status == "failed"
    assert job_store.job(job_id).error_code == "output_error"
