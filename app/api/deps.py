"""Annotated dependencies: settings, DB session, the caller's token, submission rate limit, request bodies."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, Header, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.models import ApiToken
from app.services.errors import (
    InvalidBodyError,
    MalformedBodyError,
    PayloadTooLargeError,
    RateLimitedError,
    UnauthorizedError,
    UnsupportedMediaTypeError,
)
from app.services.jobs import SourcePinner
from app.services.tokens import find_token
from merge_ops.errors import RecipeError
from merge_ops.safe_load import MalformedDocumentError, UnsafeDocumentError, load_json, load_yaml

_bearer = HTTPBearer(auto_error=False, description="An API token from `alloy token create`.")
JSON_TYPES = ("application/json",)
YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")


def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


async def get_session(request: Request) -> AsyncIterator[Session]:
    """The request's session. An async generator on purpose: FastAPI runs a sync dependency's teardown in the
    request thread pool, so under load finished requests kept their connection while waiting for a thread that
    new requests, waiting for a connection, held: a deadlock broken only by the pool's 30 s timeout (64 clients
    stalled after 15 submissions). Here ``close`` (a rollback that returns the connection) runs on the loop."""
    session = request.app.state.sessionmaker()
    try:
        yield session
    finally:
        session.close()


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
SessionDep = Annotated[Session, Depends(get_session)]


def require_token(
    session: SessionDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> ApiToken:
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise UnauthorizedError("a bearer API token is required")
    token = find_token(session, secret=credentials.credentials)
    # end the lookup's read transaction: the connection goes back to the pool while the request validates (CPU
    # work) and is taken again by its next query, instead of being held for the whole request
    session.commit()
    if token is None:
        raise UnauthorizedError("invalid or revoked API token")
    return token


CurrentToken = Annotated[ApiToken, Depends(require_token)]


def limit_submissions(request: Request, token: CurrentToken) -> None:
    retry_after = request.app.state.rate_limiter.acquire(token.id)
    if retry_after is not None:
        raise RateLimitedError("too many submissions for this token; retry later", retry_after_s=retry_after)


SubmissionAllowed = Depends(limit_submissions)


def limit_validations(request: Request, token: CurrentToken) -> None:
    """Validation costs CPU like a submission's (it is the same validation), so it has a window of its own:
    an editor validating as the user types does not use up the token's submissions."""
    retry_after = request.app.state.validation_limiter.acquire(token.id)
    if retry_after is not None:
        raise RateLimitedError("too many validations for this token; retry later", retry_after_s=retry_after)


ValidationAllowed = Depends(limit_validations)


def hf_token_header(
    x_hf_token: Annotated[
        str | None, Header(description="Hugging Face token for private sources or pushes; never stored.")
    ] = None,
) -> str | None:
    return x_hf_token or None


HfToken = Annotated[str | None, Depends(hf_token_header)]
IdempotencyKey = Annotated[
    str | None,
    Header(alias="Idempotency-Key", max_length=255, description="Repeat-safe submission key (per token)."),
]


def get_pinner(settings: SettingsDep, hf_token: HfToken) -> SourcePinner | None:
    """Pins Hub sources to commits at submission, through ``merge_ops.hub`` (no pinning if it isn't installed)."""
    if not settings.pin_hub_sources:
        return None
    try:
        from merge_ops.hub import HubClient
    except ImportError:
        return None
    token = hf_token or (settings.hf_token.get_secret_value() if settings.hf_token else None)
    return HubClient(token=token, cache_dir=settings.hf_cache).resolve


PinnerDep = Annotated[SourcePinner | None, Depends(get_pinner)]


async def read_limited(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"request body over {limit} bytes", limit=limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"request body over {limit} bytes", limit=limit)
        chunks.append(chunk)
    return b"".join(chunks)


def request_media_type(request: Request) -> str:
    return request.headers.get("content-type", "application/json").split(";")[0].strip().lower()


async def parse_body(request: Request, *, allow_yaml: bool) -> Any:
    """The request body as JSON (default) or YAML, size-limited; syntax errors are 400, not 422."""
    media_type = request_media_type(request)
    is_yaml = media_type in YAML_TYPES
    if not (media_type in JSON_TYPES or media_type.endswith("+json") or (allow_yaml and is_yaml)):
        accepted = ", ".join(JSON_TYPES + (YAML_TYPES[:1] if allow_yaml else ()))
        raise UnsupportedMediaTypeError(f"unsupported Content-Type {media_type!r}; send {accepted}")
    raw = await read_limited(request, request.app.state.settings.max_body_bytes)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedBodyError("request body is not UTF-8") from None
    try:
        # bounded parsers: no YAML aliases, nesting, text and numbers checked (merge_ops.safe_load)
        return load_yaml(text) if is_yaml else load_json(text)
    except MalformedDocumentError as exc:
        raise MalformedBodyError(f"request body refused: {exc}") from None
    except UnsafeDocumentError as exc:
        raise InvalidBodyError(
            f"request body refused: {exc}", errors=[{"loc": ["body"], "msg": str(exc)}]
        ) from None


async def recipe_body(request: Request) -> dict[str, Any]:
    body = await parse_body(request, allow_yaml=True)
    if not isinstance(body, dict):
        raise RecipeError(
            "a recipe must be a JSON object or a YAML mapping",
            errors=[{"loc": [], "msg": "expected a mapping"}],
        )
    return body


async def json_body(request: Request) -> Any:
    return await parse_body(request, allow_yaml=False)


RecipeBody = Annotated[dict[str, Any], Depends(recipe_body)]
JsonBody = Annotated[Any, Depends(json_body)]
