"""`alloy serve` with no configuration: SQLite + filesystem:// broker under ALLOY_HOME, API + local worker, a job
runs end to end, and SIGTERM stops every process it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.utils.services import REPO_ROOT, free_port, wait_for_http_status, wait_until

from .helpers import assert_output_matches, expected_task_arithmetic, make_models, task_arithmetic_recipe

pytestmark = pytest.mark.slow


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _descendants(pid: int) -> list[int]:
    found = []
    for child in _children(pid):
        found += [child, *_descendants(child)]
    return found


def test_serve_embedded_runs_a_merge_and_shuts_down_cleanly(tmp_path: Path):
    home, data = tmp_path / "home", tmp_path / "data"
    data.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALLOY_")}
    # nothing but a home and a data dir: the defaults must give a working service with no server to run
    env.update(
        {
            "ALLOY_HOME": str(home),
            "ALLOY_DATA_DIRS": str(data),
            "ALLOY_KERNELS": "torch",
            "PYTHONPATH": str(REPO_ROOT),
            "PYTHONUNBUFFERED": "1",
        }
    )
    port = free_port()
    log = (tmp_path / "serve.log").open("wb")
    code = f"from app.serve import serve; serve(host='127.0.0.1', port={port}, workers=1)"
    process = subprocess.Popen(
        [sys.executable, "-c", code],
        env=env,
        cwd=REPO_ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            try:
                return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                assert process.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                return False

        wait_until(up, timeout=90, what="alloy serve")
        from app.core.config import Settings
        from app.db import get_engine, session_factory
        from app.services.tokens import create_token

        settings = Settings(home=home, data_dirs=[data])
        assert settings.broker_url.startswith("filesystem://") and settings.database_url.startswith("sqlite")
        with session_factory(get_engine(settings.database_url))() as session:
            token = create_token(session, name="serve")
        base, fts = make_models(data / "models")
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as client:
            response = client.post(
                "/v1/merges", json=task_arithmetic_recipe(base, fts, data / "out", lam=0.3)
            )
            assert response.status_code == 202, response.text
            body = wait_for_http_status(client, response.json()["id"], timeout=120)
        assert body["status"] == "succeeded", (body["error"], (tmp_path / "serve.log").read_text()[-3000:])
        assert_output_matches(data / "out", expected_task_arithmetic(base, fts, lam=0.3, weights=[1.0, 1.0]))
        started = _descendants(process.pid)
        assert started, "serve started no worker process"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            raise
        finally:
            log.close()
    assert process.returncode == 0, (tmp_path / "serve.log").read_text()[-3000:]
    leftover = [
        pid
        for pid in started
        if Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    ]
    assert leftover == [], f"processes left after SIGTERM: {leftover}"
