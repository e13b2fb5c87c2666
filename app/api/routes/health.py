"""Public probes: /healthz (process up), /readyz (database, broker, workers), /metrics (Prometheus)."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from sqlalchemy.orm import Session

from app.api.openapi_docs import PROBLEM_CONTENT
from app.api.problems import problem_body, problem_response
from app.core import queue
from app.core.config import Settings
from app.core.readiness import Checks
from app.schemas import Check, Health, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="Liveness")
def healthz() -> Health:
    return Health(status="ok")


class _NotSeen(Exception):
    pass


def _check(probe: Callable[[], str]) -> Check:
    try:
        return Check(ok=True, detail=probe())
    except _NotSeen as exc:
        return Check(ok=False, detail=str(exc))
    except Exception as exc:  # a probe failure is the answer, not an error; type name only, no secrets
        return Check(ok=False, detail=f"unreachable ({type(exc).__name__})")


def probe_readiness(settings: Settings, sessionmaker: Callable[[], Session]) -> Checks:
    """One readiness probe (run by ``app.core.readiness.ReadinessProbe``, one at a time, off the request path)."""
    timeout = settings.readiness_timeout_s

    def database() -> str:
        with sessionmaker() as session:
            session.execute(text("SELECT 1"))
        return "ok"

    def broker() -> str:
        queue.check_broker(settings, timeout_s=timeout)
        return "ok"

    def workers() -> str:
        try:
            names = queue.ping_workers(settings, timeout_s=timeout)
        finally:
            # the filesystem broker keeps a ping for every worker name ever bound, read or not
            queue.sweep_control_messages(settings, older_than_s=max(10.0, 4 * timeout))
        if not names:
            raise _NotSeen(f"no worker answered a ping within {timeout}s")
        return f"{len(names)} worker(s): {', '.join(names)}"

    checks = {"database": _check(database), "broker": _check(broker)}
    checks["workers"] = (
        _check(workers) if checks["broker"].ok else Check(ok=False, detail="broker unreachable")
    )
    return checks


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="Readiness",
    responses={503: {"description": "A dependency is down; `checks` says which", "content": PROBLEM_CONTENT}},
)
async def readyz(request: Request) -> Response:
    """200 when the database and broker answer and at least one worker replied to a ping; else 503. The answer
    is cached for a few seconds (``ALLOY_READINESS_CACHE_S``) and never takes much longer than the probe's
    timeouts, however many callers ask at once."""
    checks = await request.app.state.readiness.checks()
    if all(check.ok for check in checks.values()):
        return JSONResponse(Readiness(status="ready", checks=checks).model_dump())
    failing = ", ".join(name for name, check in checks.items() if not check.ok)
    body = problem_body(
        "not_ready",
        f"not ready: {failing}",
        checks={name: check.model_dump() for name, check in checks.items()},
    )
    return problem_response(body)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={
        200: {
            "content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
            "description": "Prometheus text exposition.",
        }
    },
)
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics_registry), media_type=CONTENT_TYPE_LATEST)
