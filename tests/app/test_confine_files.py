"""Issue 17, item 8: files inside an accepted source folder may not link out of the data dirs, and with no
ALLOY_DATA_DIRS the working directory is not a data dir."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from app.core.config import Settings
from app.models import Job
from merge_ops.confine import check_recipe_files, escaping_files
from merge_ops.errors import UnsafeCheckpointError
from merge_ops.recipe import load_recipe
from tests.app.conftest import Api, recipe


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("token=hf_xxx")
    (outside / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    return outside


def _jobs(api: Api) -> int:
    with api.client.app.state.sessionmaker() as session:
        return session.query(Job).count()


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json", "vocab.txt"])
def test_a_file_linked_out_of_a_source_folder_is_refused(api: Api, secret: Path, name: str) -> None:
    target = secret / ("model.safetensors" if name.endswith(".safetensors") else "secret.txt")
    (api.data / "ft1" / name).symlink_to(target)
    response = api.post_recipe(recipe())
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["code"] == "path_not_allowed"
    assert body["errors"][0]["loc"] == ["models", "0", "source"] and name in body["errors"][0]["msg"]
    assert _jobs(api) == 0


def test_links_that_stay_inside_the_data_dirs_are_fine(api: Api) -> None:
    (api.data / "shared").mkdir()
    (api.data / "shared" / "config.json").write_text("{}")
    (api.data / "ft1" / "config.json").symlink_to(api.data / "shared" / "config.json")
    assert api.post_recipe(recipe()).status_code == 202


def test_a_linked_evaluator_model_file_is_refused(api: Api, secret: Path) -> None:
    (api.data / "d.jsonl").write_text('{"text": "a"}\n')
    (api.data / "ft1" / "tokenizer.json").symlink_to(secret / "secret.txt")
    evaluator = {"kind": "causal_lm_loss", "data": "d.jsonl", "model": "ft1"}
    response = api.post_recipe(
        recipe(
            method="greedy_soup",
            params={},
            models=[{"source": "ft2"}, {"source": "base"}],
            evaluator=evaluator,
        )
    )
    assert response.status_code == 422 and response.json()["errors"][0]["loc"] == ["evaluator", "model"]


def test_an_output_under_a_file_is_refused_at_submission(api: Api) -> None:
    (api.data / "afile").write_text("x")
    response = api.post_recipe(recipe(output={"path": "afile/out"}))
    assert response.status_code == 422 and "is a file" in response.json()["detail"]


def test_the_worker_checks_again_at_run_time(api: Api, secret: Path) -> None:
    # accepted while the folder is clean, then a link appears before the worker runs
    stored = api.post_recipe(recipe()).json()["recipe"]
    (api.data / "ft2" / "model.safetensors").symlink_to(secret / "model.safetensors")
    with pytest.raises(UnsafeCheckpointError, match="ft2|model.safetensors") as caught:
        check_recipe_files(load_recipe(stored), roots=api.settings.data_dirs)
    assert caught.value.code == "unsafe_checkpoint"
    assert caught.value.context["errors"][0]["loc"] == ["models", "1", "source"]


def test_escaping_files_names_each_link(tmp_path: Path, secret: Path) -> None:
    root = tmp_path / "root"
    (root / "m").mkdir(parents=True)
    (root / "m" / "ok.json").write_text("{}")
    (root / "m" / "a.json").symlink_to(secret / "secret.txt")
    (root / "m" / "dangling").symlink_to(tmp_path / "nowhere")
    found = escaping_files(root / "m", roots=[root])
    assert found == [f"a.json -> {secret / 'secret.txt'}", f"dangling -> {tmp_path / 'nowhere'}"]
    assert escaping_files(root / "m" / "ok.json", roots=[root]) == []


def test_default_data_dirs_do_not_include_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ALLOY_DATA_DIRS", raising=False)
    monkeypatch.chdir("/")
    settings = Settings(home=tmp_path / "home")
    assert settings.data_dirs == [tmp_path / "home" / "data"]
    assert Path("/") not in settings.data_dirs and Path(os.getcwd()) not in settings.data_dirs

    from app.services.errors import PathNotAllowedError
    from app.services.jobs import prepare_recipe

    with pytest.raises(PathNotAllowedError) as caught:
        prepare_recipe(
            {
                "method": "task_arithmetic",
                "base": "/etc/passwd",
                "models": [{"source": "etc"}],
                "output": {"path": "/root/.ssh/merged"},
            },
            settings=settings,
        )
    locs = {tuple(e["loc"]) for e in caught.value.context["errors"]}
    assert {("base",), ("output", "path")} <= locs
