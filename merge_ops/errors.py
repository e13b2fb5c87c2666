"""Typed errors of the merge engine.

Every error carries a stable ``code`` (used by the API's problem details and the job row) and the nearest
builtin as a second base, so callers can catch either. Errors pickle by their constructor arguments so they
cross Celery unchanged. ``app/api/problems.py`` maps codes to HTTP statuses.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

_F = TypeVar("_F", bound=Callable[..., Any])


class MergeError(Exception):
    """Base class. ``code`` is stable; ``detail`` is a one-line human message; ``context`` is JSON-able."""

    code = "merge_error"
    #: Transient errors may succeed on retry (network, broker); everything else fails at once.
    transient = False

    def __init__(self, detail: str, **context: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.context = context

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_error, (type(self), self.detail, self.context))

    def to_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "detail": self.detail,
            **({"context": self.context} if self.context else {}),
        }


def _rebuild_error(cls: type[MergeError], detail: str, context: dict[str, Any]) -> MergeError:
    return cls(detail, **context)


class RecipeError(MergeError, ValueError):
    """The recipe is invalid. ``context['errors']`` lists every problem as ``{loc, msg}``."""

    code = "invalid_recipe"


class UnknownMethodError(RecipeError):
    code = "unknown_method"


class SourceNotFoundError(MergeError, FileNotFoundError):
    code = "source_not_found"


class UnsafeCheckpointError(MergeError, ValueError):
    """Pickle checkpoints without ``allow_pickle``, or a path that escapes its allowed roots."""

    code = "unsafe_checkpoint"


class CorruptCheckpointError(MergeError, ValueError):
    """A safetensors file whose header or offsets can't be trusted (truncated, hostile, unknown dtype)."""

    code = "corrupt_checkpoint"


class IncompatibleModelsError(MergeError, ValueError):
    """Missing tensors, different shapes or dtypes between sources, found in preflight."""

    code = "incompatible_models"


class NonFiniteTensorError(MergeError, ValueError):
    code = "non_finite_tensor"


class OutputError(MergeError, OSError):
    """The destination can't be written (exists and not empty, no space, permission)."""

    code = "output_error"


class MergeCancelled(MergeError):
    code = "cancelled"


class KernelUnavailableError(MergeError, RuntimeError):
    """``ALLOY_KERNELS=triton`` was asked for but Triton can't run here (``kernels.KernelUnavailable``, mapped by
    ``maps_kernel_errors`` at the merge_ops entry points that call into kernels)."""

    code = "kernel_unavailable"


def maps_kernel_errors(fn: _F) -> _F:
    """Decorate a merge_ops entry point: the kernels' own ``KernelUnavailable`` leaves it as
    ``KernelUnavailableError`` (same code, detail and context). kernels imports nothing from merge_ops, and
    this module stays torch-free (the API imports it): the kernels' error class is looked up only once an
    exception is in flight, and if ``kernels.errors`` was never imported no kernel can have raised it."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            kernel_errors = sys.modules.get("kernels.errors")
            if kernel_errors is not None and isinstance(exc, kernel_errors.KernelUnavailable):
                raise KernelUnavailableError(exc.detail, **exc.context) from exc
            raise

    return wrapper  # type: ignore[return-value]


class HubError(MergeError, OSError):
    code = "hub_error"


class HubNotFoundError(HubError):
    code = "hub_not_found"


class HubAccessError(HubError, PermissionError):
    code = "hub_access_denied"


class HubTransientError(HubError):
    code = "hub_unavailable"
    transient = True


class HubConflictError(HubError):
    """A push based on a branch head that moved meanwhile (another push landed first): nothing was written."""

    code = "hub_conflict"


class EvaluatorError(MergeError, ValueError):
    code = "evaluator_error"


class InvalidArgumentError(MergeError, ValueError):
    """An out-of-range argument of an engine call made outside a recipe (the CLI's task-vector tools)."""

    code = "invalid_argument"


class InternalError(MergeError):
    """A bug or an unexpected exception: named (its type and message) on the failed job, never retried."""

    code = "internal_error"

    @classmethod
    def wrapping(cls, exc: BaseException) -> InternalError:
        return cls(f"{type(exc).__name__}: {exc}")


class TimeLimitExceededError(MergeError):
    code = "time_limit_exceeded"


class WorkerLostError(MergeError):
    """The worker running a job died ``attempts`` times without finishing it; the reaper gives up."""

    code = "worker_lost"
