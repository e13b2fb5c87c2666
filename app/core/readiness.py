"""A readiness probe that is safe to hammer: cached, single-flight and bounded in time.

``/readyz`` is public. Probing the broker and pinging the workers per request let 120 concurrent calls take all
of the API's request threads, each waiting for a broker connection from a pool of ten, and the API (``/healthz``
included) never answered again. Here one probe runs at a time, in its own thread; its answer is reused for
``ttl_s``; a caller waits for a running probe at most ``wait_s`` and then answers "still probing" (503) without
holding a request thread (the route is async). A probe that hangs therefore costs one thread, not the API.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from app.schemas import Check

Checks = dict[str, Check]


@dataclass(frozen=True)
class _Answer:
    checks: Checks
    at: float


class ReadinessProbe:
    def __init__(
        self,
        probe: Callable[[], Checks],
        *,
        ttl_s: float,
        wait_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._probe = probe
        self._ttl_s = ttl_s
        self._wait_s = wait_s
        self._clock = clock
        self._lock = threading.Lock()
        self._answer: _Answer | None = None
        self._running: Future[Checks] | None = None
        self.probes_started = 0  # for tests and metrics: how many probes actually ran

    def _run(self, future: Future[Checks]) -> None:
        try:
            checks = self._probe()
        except Exception as exc:  # the probe catches per check; this is a last resort, type name only
            checks = {"probe": Check(ok=False, detail=f"probe failed ({type(exc).__name__})")}
        with self._lock:
            self._answer = _Answer(checks, self._clock())
            self._running = None
        future.set_result(checks)

    def _current(self) -> Checks | Future[Checks]:
        with self._lock:
            answer = self._answer
            if answer is not None and self._clock() - answer.at < self._ttl_s:
                return answer.checks
            if self._running is None:
                future: Future[Checks] = Future()
                future.set_running_or_notify_cancel()  # a waiter that gives up can't cancel it
                self._running = future
                self.probes_started += 1
                threading.Thread(target=self._run, args=(future,), name="alloy-readyz", daemon=True).start()
            return self._running

    async def checks(self) -> Checks:
        """The latest checks: cached, or from the running probe, or "still probing" after ``wait_s``."""
        current = self._current()
        if not isinstance(current, Future):
            return current
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(current)), self._wait_s)
        except TimeoutError:
            return {
                "probe": Check(ok=False, detail=f"readiness probe did not finish within {self._wait_s:g}s")
            }
