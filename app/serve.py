"""``alloy serve`` and ``alloy worker``: the processes of a deployment.

``serve`` runs the API (uvicorn, ``app.main:create_app``) in this process and a local Celery worker as a child
process consuming both queues; the worker runs the reaper thread (``workers.reaper``). With no configuration that
is a SQLite job store and the ``filesystem://`` broker under ``ALLOY_HOME``: one command, no server. ``--workers
0`` serves the API alone (production: workers are separate ``alloy worker`` processes, e.g. docker/compose.yaml).

Both start Celery through its CLI (``python -m celery -A workers.celery_app``), so the API process never imports
``workers``. SIGINT/SIGTERM stop uvicorn, then the worker gets SIGTERM (warm shutdown: the running task may
finish) and SIGKILL after ``shutdown_grace_s``; a job it was running is requeued by the reaper of the next worker.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

log = logging.getLogger(__name__)

DEFAULT_QUEUES = ("merge", "io")


def worker_command(
    *,
    queues: Sequence[str] = DEFAULT_QUEUES,
    concurrency: int = 1,
    name: str | None = None,
    loglevel: str = "info",
) -> list[str]:
    """The Celery CLI line of one worker: prefork (time limits and worker-lost detection need it), one task per
    pool process, no gossip/mingle chatter (workers share nothing but the broker and the job store)."""
    command = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "workers.celery_app",
        "worker",
        "-Q",
        ",".join(queues),
        "-c",
        str(concurrency),
        "--pool",
        "prefork",
        "--without-gossip",
        "--without-mingle",
        "-l",
        loglevel,
    ]
    if name:
        command += ["-n", name]
    return command


def run_worker(
    *, queues: Sequence[str] = DEFAULT_QUEUES, concurrency: int = 1, name: str | None = None
) -> None:
    """Replace this process by a Celery worker (scale out: one per GPU host, ``-Q merge -c <gpus>``)."""
    _init_job_store()
    command = worker_command(queues=queues, concurrency=concurrency, name=name)
    os.execv(command[0], command)


class LocalWorker:
    """A worker child process, restarted (with backoff) if it dies while the server is up."""

    def __init__(self, command: list[str], *, shutdown_grace_s: float = 20.0) -> None:
        self.command = command
        self.shutdown_grace_s = shutdown_grace_s
        self.process: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._monitor = threading.Thread(target=self._watch, name="alloy-local-worker", daemon=True)

    def start(self) -> None:
        self._spawn()
        self._monitor.start()

    def _spawn(self) -> None:
        # own process group, so a Ctrl-C in the terminal reaches the server first and shutdown stays ordered
        self.process = subprocess.Popen(self.command, start_new_session=True)
        log.info("local worker started (pid %d)", self.process.pid)

    def _watch(self) -> None:
        delay = 1.0
        while not self._stopping.is_set():
            assert self.process is not None
            code = self.process.poll()
            if code is not None and not self._stopping.is_set():
                log.warning("local worker exited with %s; restarting in %.0fs", code, delay)
                if self._stopping.wait(delay):
                    return
                self._spawn()
                delay = min(delay * 2, 60.0)
            elif code is None:
                delay = 1.0
            self._stopping.wait(1.0)

    def stop(self) -> None:
        self._stopping.set()
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=self.shutdown_grace_s)
        except subprocess.TimeoutExpired:
            log.warning("local worker did not stop in %.0fs; killing it", self.shutdown_grace_s)
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _init_job_store() -> None:
    from app.core.config import get_settings
    from app.db import get_engine, init_db

    init_db(get_engine(get_settings().database_url))


def serve(*, host: str = "127.0.0.1", port: int = 8000, workers: int = 1, log_level: str = "info") -> None:
    """Run the API and ``workers`` local merge processes (one worker, prefork concurrency ``workers``)."""
    import uvicorn

    _init_job_store()  # before the worker starts, so both sides see the tables
    local = None
    if workers > 0:
        local = LocalWorker(worker_command(concurrency=workers, name=f"alloy-local-{os.getpid()}@%h"))
        local.start()
    started = time.monotonic()
    # uvicorn handles SIGINT/SIGTERM itself (graceful shutdown), then restores these handlers and re-raises the
    # signal: ours turns it into an exception, so the worker is stopped below instead of being orphaned.
    previous = {sig: signal.signal(sig, _raise_shutdown) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        uvicorn.run("app.main:create_app", factory=True, host=host, port=port, log_level=log_level)
    except _Shutdown:
        pass
    finally:
        if local is not None:
            local.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        log.info("alloy serve stopped after %.0fs", time.monotonic() - started)


class _Shutdown(Exception):
    """SIGINT/SIGTERM reached ``serve`` (after uvicorn's own graceful shutdown)."""


def _raise_shutdown(signum: int, _frame: object) -> None:
    raise _Shutdown(signal.Signals(signum).name)
