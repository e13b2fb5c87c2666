"""Real services for the service tests: redis-server, `celery worker` and uvicorn subprocesses, a SQLite job store.

No mocks and no ``task_always_eager``: every process is the one production runs, on loopback ports chosen free.
Fixtures (exposed through tests/conftest.py or imported by a test package's conftest):

* ``redis_server`` — a private redis-server (no persistence) with ``.url``, ``.restart()``, ``.stop()``.
* ``alloy_env`` — env vars of one deployment under ``tmp_path`` (SQLite, Redis broker, short heartbeat/reaper
  intervals), ``alloy_settings`` — the same as a ``Settings`` for in-process calls.
* ``job_store`` — a migrated SQLite job store with helpers to create tokens, insert and enqueue jobs, wait on rows.
* ``celery_worker`` — factory: ``celery_worker(name="w1")`` starts a worker subprocess and waits until ready.
* ``api_server`` — factory: ``api_server()`` starts uvicorn on a free port and waits for /healthz.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
TERMINAL = ("succeeded", "failed", "cancelled")

# Short intervals so crash recovery is observable in seconds (production defaults are 10 s / 120 s).
FAST_TIMINGS = {
    "ALLOY_HEARTBEAT_INTERVAL_S": "0.5",
    "ALLOY_HEARTBEAT_STALE_S": "4",
    "ALLOY_PROGRESS_INTERVAL_S": "0.2",
    "ALLOY_REAPER_INTERVAL_S": "0.5",
    "ALLOY_QUEUED_RESEND_S": "4",
    "ALLOY_MAX_ATTEMPTS": "3",
    "ALLOY_TASK_TIME_LIMIT_S": "300",
    "ALLOY_EVENTS_POLL_S": "0.1",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    predicate: Callable[[], Any], *, timeout: float, interval: float = 0.1, what: str = "condition"
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# --- redis ------------------------------------------------------------------------------------------------------


@dataclass
class RedisServer:
    directory: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        if not Path(REDIS_SERVER).exists():
            pytest.skip("redis-server is not installed (apt-get install redis-server)")
        self.directory.mkdir(parents=True, exist_ok=True)
        # no RDB/AOF: a restart loses every queued message, the worst case the job row must survive
        self.process = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
                "--protected-mode",
                "yes",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self.ping, timeout=10, what="redis-server")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


# --- one deployment's configuration ----------------------------------------------------------------------------


@pytest.fixture
def broker_kind() -> str:
    """``redis`` (production) or ``filesystem`` (embedded default); override with
    ``@pytest.mark.parametrize("broker_kind", [...])``."""
    return "redis"


@pytest.fixture
def alloy_env(tmp_path: Path, redis_server: RedisServer, broker_kind: str) -> dict[str, str]:
    """Env of a deployment: SQLite job store + a Redis (or filesystem://) broker under tmp_path; data dir
    ``tmp_path/data``."""
    home = tmp_path / "home"
    data = tmp_path / "data"
    data.mkdir(parents=True, exist_ok=True)
    env = {key: value for key, value in os.environ.items() if not key.startswith("ALLOY_")}
    env.update(FAST_TIMINGS)
    env.update(
        {
            "ALLOY_HOME": str(home),
            "ALLOY_DATABASE_URL": f"sqlite:///{home / 'alloy.db'}",
            "ALLOY_BROKER_URL": redis_server.url
            if broker_kind == "redis"
            else f"filesystem://{home / 'broker'}",
            "ALLOY_DATA_DIRS": str(data),
            "ALLOY_KERNELS": "torch",
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            "PYTHONUNBUFFERED": "1",
            # the Hub is never reached from tests
            "HF_HUB_OFFLINE": "1",
        }
    )
    return env


def settings_from_env(env: Mapping[str, str]) -> Any:
    from app.core.config import Settings

    fields = {
        key.removeprefix("ALLOY_").lower(): value for key, value in env.items() if key.startswith("ALLOY_")
    }
    known = set(Settings.model_fields)
    return Settings(**{key: value for key, value in fields.items() if key in known})


@pytest.fixture
def alloy_settings(alloy_env: dict[str, str]) -> Any:
    return settings_from_env(alloy_env)


# --- the job store ---------------------------------------------------------------------------------------------


class JobStore:
    """A migrated job store plus what tests need to drive it without the API."""

    def __init__(self, settings: Any) -> None:
        from app.db import get_engine, init_db

        self.settings = settings
        self.engine = get_engine(settings.database_url)
        init_db(self.engine)
        self._owner: str | None = None

    def session(self) -> Any:
        from app.db import session_factory

        return session_factory(self.engine)()

    def create_token(self, *, name: str = "tests", admin: bool = True) -> str:
        from app.services.tokens import create_token

        with self.session() as session:
            return create_token(session, name=name, admin=admin)

    def owner_id(self) -> str:
        if self._owner is None:
            from app.models import ApiToken

            self.create_token(name="owner")
            with self.session() as session:
                from sqlalchemy import select

                self._owner = session.scalars(select(ApiToken.id).order_by(ApiToken.created_at)).first()
        assert self._owner is not None
        return self._owner

    def insert_job(self, recipe: Mapping[str, Any], *, priority: int = 5, kind: str = "merge") -> str:
        from app.models import Job

        text = json.dumps(recipe, sort_keys=True)
        job = Job(
            kind=kind,
            owner_token_id=self.owner_id(),
            recipe_json=text,
            recipe_digest=str(hash(text)),
            priority=priority,
        )
        with self.session() as session:
            session.add(job)
            session.commit()
            return job.id

    def submit(self, recipe: Mapping[str, Any], *, priority: int = 5, hf_token: str | None = None) -> str:
        """Insert, commit, then enqueue (the order the API uses)."""
        from app.core.queue import enqueue_job

        job_id = self.insert_job(recipe, priority=priority)
        enqueue_job(job_id, priority=priority, hf_token=hf_token, settings=self.settings)
        return job_id

    def job(self, job_id: str) -> Any:
        from app import crud

        with self.session() as session:
            return crud.get_job(session, job_id=job_id)

    def wait_for(
        self,
        job_id: str,
        statuses: tuple[str, ...] = TERMINAL,
        *,
        timeout: float = 60,
        where: Callable[[Any], bool] | None = None,
    ) -> Any:
        def ready() -> Any:
            job = self.job(job_id)
            if job is not None and job.status in statuses and (where is None or where(job)):
                return job
            return None

        return wait_until(ready, timeout=timeout, interval=0.05, what=f"job {job_id} in {statuses}")


@pytest.fixture
def job_store(alloy_settings: Any) -> JobStore:
    return JobStore(alloy_settings)


# --- worker and API subprocesses -------------------------------------------------------------------------------


class ServiceProcess:
    def __init__(self, command: list[str], *, env: Mapping[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        # own process group: kill9() takes the whole worker (main process and pool children) down at once
        self.process = subprocess.Popen(
            command,
            env=dict(env),
            cwd=REPO_ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill9(self) -> None:
        """SIGKILL the whole process group: no shutdown code runs, like an OOM kill or a power cut."""
        if self.alive():
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self, *, grace: float = 10) -> None:
        if self.alive():
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.kill9()
        self._log.close()


class WorkerProcess(ServiceProcess):
    def wait_ready(self, *, timeout: float = 60) -> WorkerProcess:
        def ready() -> bool:
            if not self.alive():
                raise RuntimeError(f"worker exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            return " ready." in self.log()

        wait_until(ready, timeout=timeout, what="celery worker ready")
        return self

    def pool_pids(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.pid)], capture_output=True, text=True).stdout
        return [int(pid) for pid in out.split()]


@pytest.fixture
def celery_worker(alloy_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    from app.serve import worker_command

    started: list[WorkerProcess] = []

    def start(
        *,
        name: str = "w1",
        queues: tuple[str, ...] = ("merge", "io"),
        concurrency: int = 1,
        env: Mapping[str, str] | None = None,
        wait: bool = True,
    ) -> WorkerProcess:
        command = worker_command(queues=queues, concurrency=concurrency, name=f"{name}-{free_port()}@%h")
        worker = WorkerProcess(
            command, env={**alloy_env, **(env or {})}, log_path=tmp_path / f"worker-{name}.log"
        )
        started.append(worker)
        return worker.wait_ready() if wait else worker

    yield start
    for worker in started:
        worker.stop(grace=5)


class ApiProcess(ServiceProcess):
    def __init__(self, *, env: Mapping[str, str], log_path: Path) -> None:
        self.port = free_port()
        command = [
            sys.executable,
            "-m",
            "uvicorn",
            "app.main:create_app",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--log-level",
            "warning",
        ]
        super().__init__(command, env=env, log_path=log_path)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, *, timeout: float = 60) -> ApiProcess:
        import httpx

        def ready() -> bool:
            if not self.alive():
                raise RuntimeError(f"API exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            try:
                return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, timeout=timeout, what="API /healthz")
        return self


@pytest.fixture
def api_server(
    alloy_env: dict[str, str], tmp_path: Path, job_store: JobStore
) -> Iterator[Callable[..., ApiProcess]]:
    started: list[ApiProcess] = []

    def start(*, env: Mapping[str, str] | None = None) -> ApiProcess:
        api = ApiProcess(env={**alloy_env, **(env or {})}, log_path=tmp_path / f"api-{len(started)}.log")
        started.append(api)
        return api.wait_ready()

    yield start
    for api in started:
        api.stop(grace=5)


def wait_for_http_status(
    client: Any,
    job_id: str,
    statuses: tuple[str, ...] = TERMINAL,
    *,
    timeout: float = 60,
    where: Callable[[dict[str, Any]], bool] | None = None,
) -> dict[str, Any]:
    """Poll GET /v1/merges/{id} until the job is in one of ``statuses`` (and ``where(body)``); returns the body."""

    def ready() -> dict[str, Any] | None:
        body = client.get(f"/v1/merges/{job_id}").raise_for_status().json()
        return body if body["status"] in statuses and (where is None or where(body)) else None

    return wait_until(ready, timeout=timeout, interval=0.1, what=f"job {job_id} in {statuses}")
