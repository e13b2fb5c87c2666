"""Service-level outcomes as typed errors (same base and ``code`` contract as ``merge_ops.errors``), so routes
raise them and one table in ``app/api/problems.py`` turns every error into problem details."""

from __future__ import annotations

from merge_ops.errors import MergeError, RecipeError


class PathNotAllowedError(RecipeError):
    """A local source or output path escapes the configured data dirs (``..``, a symlink out, absolute elsewhere)."""

    code = "path_not_allowed"


class MalformedBodyError(MergeError, ValueError):
    code = "malformed_body"


class InvalidBodyError(MergeError, ValueError):
    """The body parses but holds a value no route accepts (a lone surrogate, NUL, a non-finite number)."""

    code = "validation_error"


class InvalidUploadError(MergeError, ValueError):
    """An uploaded held-out file is not UTF-8 JSONL with one object per non-blank line."""

    code = "invalid_upload"


class UnsupportedMediaTypeError(MergeError, ValueError):
    code = "unsupported_media_type"


class PayloadTooLargeError(MergeError, ValueError):
    code = "payload_too_large"


class UnauthorizedError(MergeError, PermissionError):
    code = "unauthorized"


class JobNotFoundError(MergeError, LookupError):
    code = "job_not_found"


class BatchNotFoundError(MergeError, LookupError):
    code = "batch_not_found"


class JobNotCancellableError(MergeError, ValueError):
    code = "job_not_cancellable"


class ReportNotReadyError(MergeError, LookupError):
    code = "report_not_ready"


class IdempotencyKeyReusedError(MergeError, ValueError):
    """The same ``Idempotency-Key`` was sent earlier with a different recipe."""

    code = "idempotency_key_reused"


class InvalidCursorError(MergeError, ValueError):
    code = "invalid_cursor"


class RateLimitedError(MergeError):
    """Too many submissions; ``context['retry_after_s']`` says when the next one is accepted."""

    code = "rate_limited"


class BrokerUnavailableError(MergeError, ConnectionError):
    code = "broker_unavailable"
    transient = True
