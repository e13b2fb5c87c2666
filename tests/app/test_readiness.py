"""/readyz under a flood (issue 17, item 1): against a real uvicorn process, 120 concurrent probes must not hang
the API, must not pile up broker connections, and must not leave ping files behind in the filesystem broker."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from kombu import Connection, Exchange, Queue

from app.core import queue
from app.core.config import Settings
from app.core.readiness import ReadinessProbe
from app.schemas import Check
from tests.utils.services import REPO_ROOT, ApiProcess


def _bind_dead_workers(settings: Settings, names: list[str]) -> None:
    """Bind mailboxes of workers that are gone, as a killed ``alloy worker`` leaves them in the broker."""
    with Connection(
        settings.celery_broker_url(), transport_options=settings.broker_transport_options()
    ) as connection:
        channel = connection.channel()
        exchange = Exchange("celery.pidbox", type="fanout", durable=False, auto_delete=False)
        for name in names:
            Queue(f"{name}.celery.pidbox", exchange=exchange, auto_delete=False)(channel).declare()


def _env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"
    (tmp_path / "data").mkdir(parents=True, exist_ok=True)
    env = {key: value for key, value in os.environ.items() if not key.startswith("ALLOY_")}
    env.update(
        {
            "ALLOY_HOME": str(home),
            "ALLOY_DATABASE_URL": f"sqlite:///{home / 'alloy.db'}",
            "ALLOY_BROKER_URL": f"filesystem://{home / 'broker'}",
            "ALLOY_DATA_DIRS": str(tmp_path / "data"),
            "ALLOY_READINESS_TIMEOUT_S": "0.5",
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        }
    )
    return env


def _control_files(settings: Settings) -> list[str]:
    assert settings.broker_dir is not None
    return [p.name for p in (settings.broker_dir / "queue").iterdir() if p.name.endswith(".pidbox.msg")]


@pytest.mark.slow
def test_a_readyz_flood_leaves_the_api_responsive_and_the_broker_clean(tmp_path: Path) -> None:
    env = _env(tmp_path)
    settings = Settings(
        home=Path(env["ALLOY_HOME"]),
        broker_url=env["ALLOY_BROKER_URL"],
        database_url=env["ALLOY_DATABASE_URL"],
    )
    _bind_dead_workers(settings, [f"dead{i}@host" for i in range(2)])
    api = ApiProcess(env=env, log_path=tmp_path / "api.log").wait_ready()
    try:
        # 120 at once: each holds its connection open until answered (as the flood did)
        with (
            ThreadPoolExecutor(max_workers=120) as pool,
            httpx.Client(timeout=30, limits=httpx.Limits()) as c,
        ):
            started = time.monotonic()
            probes = [pool.submit(c.get, f"{api.url}/readyz") for _ in range(120)]
            time.sleep(0.2)
            health = httpx.get(f"{api.url}/healthz", timeout=5)
            health_s = time.monotonic() - started
            answers = [p.result() for p in probes]
            flood_s = time.monotonic() - started
        assert health.status_code == 200 and health_s < 5
        assert {a.status_code for a in answers} == {503}  # no live worker: not ready, but answered
        assert flood_s < 15, f"120 probes took {flood_s:.1f}s"
        assert httpx.get(f"{api.url}/healthz", timeout=5).status_code == 200
        # cached and single-flight: one probe served the whole flood, so at most one ping per dead worker
        assert len(_control_files(settings)) <= 2
        # a later probe sweeps what the earlier pings left
        for path in (settings.broker_dir / "queue").iterdir():  # type: ignore[operator]
            os.utime(path, (time.time() - 3600, time.time() - 3600))
        time.sleep(5.1)  # past the cache
        assert httpx.get(f"{api.url}/readyz", timeout=10).status_code == 503
        assert len(_control_files(settings)) <= 2
        # and SIGTERM still stops it
        os.killpg(api.process.pid, signal.SIGTERM)
        api.process.wait(timeout=10)
    finally:
        api.stop(grace=5)


def test_sweep_removes_only_old_control_messages(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, broker_url=f"filesystem://{tmp_path / 'broker'}")
    folder = Path(settings.broker_transport_options()["data_folder_out"])
    old_ping = folder / "1_a.dead@host.celery.pidbox.msg"
    new_ping = folder / "2_b.live@host.celery.pidbox.msg"
    task = folder / "3_c.merge.msg"
    for path in (old_ping, new_ping, task):
        path.write_text("{}")
    os.utime(old_ping, (time.time() - 600, time.time() - 600))
    os.utime(task, (time.time() - 600, time.time() - 600))
    assert queue.sweep_control_messages(settings, older_than_s=60) == 1
    assert sorted(p.name for p in folder.iterdir()) == sorted([new_ping.name, task.name])


def test_probe_is_cached_single_flight_and_bounded() -> None:
    release = threading.Event()
    now = [0.0]

    def slow_probe() -> dict[str, Check]:
        release.wait(5)
        return {"database": Check(ok=True, detail="ok")}

    probe = ReadinessProbe(slow_probe, ttl_s=5, wait_s=0.2, clock=lambda: now[0])

    async def flood() -> list[dict[str, Check]]:
        return await asyncio.gather(*(probe.checks() for _ in range(50)))

    started = time.monotonic()
    answers = asyncio.run(flood())
    assert time.monotonic() - started < 2  # bounded by wait_s, not by the hanging probe
    assert probe.probes_started == 1
    assert all(not a["probe"].ok and "did not finish" in a["probe"].detail for a in answers)
    release.set()
    deadline = time.monotonic() + 5
    while probe.probes_started == 1 and time.monotonic() < deadline:
        answer = asyncio.run(probe.checks())
        if "database" in answer:
            break
        time.sleep(0.05)
    assert asyncio.run(probe.checks()) == {"database": Check(ok=True, detail="ok")}
    now[0] = 4.0
    asyncio.run(probe.checks())
    assert probe.probes_started == 1  # still cached
    now[0] = 6.0
    asyncio.run(probe.checks())
    assert probe.probes_started == 2
