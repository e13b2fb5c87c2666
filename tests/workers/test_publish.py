"""One publish path: the CLI and the worker push the same recipe with the same card lineage and commit message
(they used to differ: the CLI sent the recipe's Hub lineage and method, the worker only the base)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from app import crud
from tests.merge_ops.test_hub import _model
from tests.utils.hub_server import WRITE_TOKEN
from workers.publish import push_to_hub


def _front(card: str) -> dict:
    return yaml.safe_load(card.split("---")[1])


def test_cli_and_worker_publish_the_same_lineage_and_message(
    job_store, alloy_settings, hub_server, tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    recipe = {
        "method": "ties",
        "base": "hf://alloy/base@main",
        "models": [{"source": "hf://alloy/ft-a@main"}, {"source": str(tmp_path / "local-ft")}],
        "params": {"density": 0.5},
        "output": {"hub": {"repo": "alloy/by-worker"}},
    }
    folder = _model(tmp_path / "merged")
    job_id = job_store.insert_job(recipe)
    with job_store.session() as session:
        assert crud.claim_job(session, job_id=job_id, worker="w") is not None
    outcome = push_to_hub(job_id, output_path=str(folder), hf_token=WRITE_TOKEN, settings=alloy_settings)
    assert outcome.status == "succeeded", job_store.job(job_id).error_detail

    # the CLI's path: the same publish function on the same folder and recipe
    script = (
        "import sys; from pathlib import Path; from merge_ops.hub import HubClient, publish_merge; "
        "from merge_ops.recipe import load_recipe; "
        "r = load_recipe(sys.argv[1]); "
        f"publish_merge(HubClient(token={WRITE_TOKEN!r}), Path(sys.argv[2]), r)"
    )
    cli_recipe = tmp_path / "cli.yaml"
    cli_recipe.write_text(yaml.safe_dump({**recipe, "output": {"hub": {"repo": "alloy/by-cli"}}}))
    env = {"HF_ENDPOINT": hub_server.url, "HF_HUB_OFFLINE": "0", "PATH": "/usr/bin:/bin"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    run = subprocess.run(
        [sys.executable, "-c", script, str(cli_recipe), str(folder)], env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr

    worker_card = _front(hub_server.read("alloy/by-worker", "README.md").decode())
    cli_card = _front(hub_server.read("alloy/by-cli", "README.md").decode())
    assert worker_card == cli_card
    assert worker_card["base_model"] == ["alloy/base", "alloy/ft-a"]
    assert "ties" in worker_card["tags"]
    messages = {
        hub_server.commits[hub_server.head(repo)].message for repo in ("alloy/by-worker", "alloy/by-cli")
    }
    assert messages == {"Alloy merge (ties)"}
