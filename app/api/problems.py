"""RFC 9457 problem details: one table from error ``code`` to HTTP status, and the exception handlers.

Routes raise typed errors (``merge_ops.errors`` / ``app.services.errors``); nothing builds HTTPException for a
domain outcome. Responses carry ``code`` (stable), ``detail`` (one line) and, for validation, ``errors``; never a
stack trace: unexpected exceptions become a bare 500 ``internal_error`` (logged server-side).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from merge_ops.errors import MergeError

PROBLEM_MEDIA_TYPE = "application/problem+json"
log = logging.getLogger("alloy.api")

#: code -> HTTP status. Codes not listed fall back to 500 (engine failures shown on a failed job).
STATUS_BY_CODE: dict[str, int] = {
    "invalid_recipe": 422,
    "unknown_method": 422,
    "path_not_allowed": 422,
    "validation_error": 422,
    "source_not_found": 422,
    "unsafe_checkpoint": 422,
    "corrupt_checkpoint": 422,
    "incompatible_models": 422,
    "non_finite_tensor": 422,
    "evaluator_error": 422,
    "invalid_upload": 422,
    "hub_not_found": 422,
    "hub_access_denied": 403,
    "hub_unavailable": 503,
    "hub_error": 502,
    "hub_conflict": 409,
    "invalid_argument": 422,
    "output_error": 409,
    "cancelled": 409,
    "kernel_unavailable": 503,
    "malformed_body": 400,
    "invalid_cursor": 400,
    "unauthorized": 401,
    "not_found": 404,
    "job_not_found": 404,
    "batch_not_found": 404,
    "method_not_allowed": 405,
    "job_not_cancellable": 409,
    "report_not_ready": 409,
    "idempotency_key_reused": 409,
    "payload_too_large": 413,
    "unsupported_media_type": 415,
    "rate_limited": 429,
    "broker_unavailable": 503,
    "not_ready": 503,
    "internal_error": 500,
    # outcomes of a job, shown on a failed job's row (never an answer's status of their own)
    "merge_error": 500,
    "worker_lost": 500,
    "time_limit_exceeded": 500,
}

_TITLES = {
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Payload too large",
    415: "Unsupported media type",
    422: "Unprocessable content",
    429: "Too many requests",
    500: "Internal server error",
    502: "Bad gateway",
    503: "Service unavailable",
}


def status_for(code: str) -> int:
    return STATUS_BY_CODE.get(code, 500)


def problem_body(code: str, detail: str, *, status: int | None = None, **extra: Any) -> dict[str, Any]:
    status = status or status_for(code)
    body: dict[str, Any] = {
        "type": f"urn:alloy:problem:{code}",
        "title": _TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
        "code": code,
    }
    body.update({key: value for key, value in extra.items() if value is not None})
    return body


def error_problem(error: dict[str, Any]) -> dict[str, Any]:
    """Problem details for a ``MergeError.to_dict()`` (a failed job's error); ``errors`` lifted from context."""
    context = error.get("context") or {}
    return problem_body(error["code"], error.get("detail", ""), errors=context.get("errors") or None)


def problem_response(body: dict[str, Any], *, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=body["status"], media_type=PROBLEM_MEDIA_TYPE, headers=headers)


def _merge_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, MergeError)
    headers: dict[str, str] = {}
    extra: dict[str, Any] = {}
    if isinstance(exc.context.get("errors"), list):
        extra["errors"] = exc.context["errors"]
    if exc.code == "rate_limited":
        retry_after = max(1, math.ceil(float(exc.context.get("retry_after_s", 1))))
        headers["Retry-After"] = str(retry_after)
        extra["retry_after_s"] = retry_after
    if exc.code == "unauthorized":
        headers["WWW-Authenticate"] = 'Bearer realm="alloy"'
    body = problem_body(exc.code, exc.detail, **extra)
    if body["status"] >= 500:
        log.warning("request failed with %s: %s", exc.code, exc.detail)
    return problem_response(body, headers=headers)


def _validation_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [{"loc": [str(part) for part in error["loc"]], "msg": error["msg"]} for error in exc.errors()]
    summary = "; ".join(f"{'.'.join(e['loc'])}: {e['msg']}" for e in errors)
    return problem_response(problem_body("validation_error", f"invalid request: {summary}", errors=errors))


def _http_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized"}.get(
        exc.status_code, "http_error"
    )
    detail = exc.detail if isinstance(exc.detail, str) else _TITLES.get(exc.status_code, "error")
    return problem_response(problem_body(code, detail, status=exc.status_code), headers=exc.headers)


def _unexpected_handler(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return problem_response(problem_body("internal_error", "internal server error"))


def install_problem_handlers(app: FastAPI) -> None:
    app.add_exception_handler(MergeError, _merge_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(StarletteHTTPException, _http_handler)
    app.add_exception_handler(Exception, _unexpected_handler)
