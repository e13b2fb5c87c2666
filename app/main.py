"""The FastAPI application factory: ``create_app(settings)``; ``uvicorn app.main:app`` builds one from the
environment on first access (no import-time side effects)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool

from app.api.deps import require_token
from app.api.metrics import make_registry
from app.api.openapi_docs import extra_components
from app.api.problems import install_problem_handlers
from app.api.routes import analyses, batches, files, health, merges, methods, recipes, sources
from app.core.config import Settings, get_settings
from app.core.ratelimit import SlidingWindowLimiter
from app.core.readiness import ReadinessProbe
from app.db import init_db, make_engine, pool_for_threads, session_factory

API_VERSION = "1.0.0"
DESCRIPTION = """Model merging as a service: submit a recipe, follow the job, fetch the merged model.

Every `/v1` route needs `Authorization: Bearer <token>` (`alloy token create`). Errors are RFC 9457
`application/problem+json` with a stable `code`."""


def _operation_id(route: APIRoute) -> str:
    return f"{route.tags[0]}-{route.name}" if route.tags else route.name


def _v1_router() -> APIRouter:
    # the token dependency on the whole router: no /v1 route can be reached without a valid token
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_token)])
    for module in (merges, batches, methods, recipes, analyses, files, sources):
        v1.include_router(module.router)
    return v1


def _install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for name, definition in extra_components().items():
                components.setdefault(name, definition)
            schema["components"]["schemas"] = dict(sorted(components.items()))
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


#: anyio's default thread limiter, which runs FastAPI's sync endpoints and dependencies
REQUEST_THREADS = 40


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    # a connection for every request thread (anyio's default limiter: 40), so a burst of requests never waits on
    # the pool (with SQLAlchemy's default 5 + 10, the 16th concurrent request waited pool_timeout = 30 s)
    engine = make_engine(settings.database_url, **pool_for_threads(settings.database_url, REQUEST_THREADS))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(init_db, engine)
        yield
        engine.dispose()

    app = FastAPI(
        title="Alloy",
        version=API_VERSION,
        description=DESCRIPTION,
        lifespan=lifespan,
        generate_unique_id_function=_operation_id,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessionmaker = session_factory(engine)
    app.state.rate_limiter = SlidingWindowLimiter(settings.rate_limit_per_minute, window_s=60.0)
    app.state.validation_limiter = SlidingWindowLimiter(
        settings.validate_rate_limit_per_minute, window_s=60.0
    )
    app.state.readiness = ReadinessProbe(
        lambda: health.probe_readiness(settings, app.state.sessionmaker),
        ttl_s=settings.readiness_cache_s,
        # database, broker and ping each bounded by the timeout, plus slack for a slow connect
        wait_s=3 * settings.readiness_timeout_s + 1.0,
    )
    app.state.metrics_registry = make_registry(app.state.sessionmaker)
    install_problem_handlers(app)
    app.include_router(health.router)
    app.include_router(_v1_router())
    try:
        from app.web import router as web_router
    except ModuleNotFoundError as exc:  # the web form is optional; a broken one must still fail loudly
        if exc.name != "app.web":
            raise
    else:
        app.include_router(web_router)
    _install_openapi(app)
    return app


def __getattr__(name: str) -> Any:
    if name == "app":
        return create_app()
    raise AttributeError(name)
