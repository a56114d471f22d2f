"""One rooted error tree: every exception the service raises on purpose is a QvqError with a stable code.

    QvqError (code, retryable)
    +-- RequestError        request.invalid, model.unknown, conversation.not_found (refused at submit)
    |   +-- ConflictError       the task is not in a state that allows this (HTTP 409)
    |   |   +-- TaskIdTaken         a caller-chosen task id that exists
    |   |   +-- IdempotencyMismatch idempotency.mismatch: a key used again with a different request
    |   +-- NotificationError   a webhook body that is no object-store notification
    +-- JsonTooDeep         a JSON body nested deeper than its limit (also a ValueError; HTTP 400)
    +-- UnsafeURL           a URL the SSRF guard refuses (reason: invalid | refused | not_found | unresolved)
    +-- ImageError          image.*, images.token_budget_exceeded (caught in the worker, before the model)
    +-- ModelError          model.* (the QVQ call)
    +-- BudgetError         budget.exceeded
    +-- InternalError       internal
    +-- StreamStopped       not a failure: a run was told to stop (cancel, time limit, lease lost)
    +-- StoreRejected       store.rejected: the database refused a result for good; the task fails once
    +-- StoreUnavailable    the database could not be reached: nothing terminal was written, run it later
    +-- EnqueueError        the queue could not take a task (Redis or the broker is down); nothing was lost
    +-- WaitTimeout         a follower or result wait ran out of time (also a TimeoutError)
    +-- ConfigError         a bad setting, raised when settings are read (also a ValueError)
    +-- LocalServiceError   the demo's or the tests' local service (Redis, worker) could not start
    +-- ApiCallError        an answer of the HTTP API, by status: raised by the routes and mapped back
        |                   to the same class by the HTTP client (`status`, `field`)
        +-- AuthError           auth.required, auth.invalid, auth.forbidden (401, 403)
        +-- NotFoundError       task.not_found (404); also a KeyError, as Client.get raises it
        +-- UnavailableError    unavailable (503, or the API cannot be reached): retryable

Third-party exceptions are translated to these at the one adapter that calls them (`raise ... from exc`).
"""

from __future__ import annotations

from typing import Any

from contracts.redaction import redact

#: code -> retryable: the stable strings of the README's error table.
ERROR_CODES: dict[str, bool] = {
    "request.invalid": False,
    "model.unknown": False,
    "image.not_found": False,
    "image.access_denied": False,
    "image.fetch_failed": True,
    "image.too_large": False,
    "image.unsupported_format": False,
    "image.corrupt": False,
    "image.too_small": False,
    "image.bad_aspect_ratio": False,
    "image.too_many_pixels": False,
    "images.token_budget_exceeded": False,
    "model.rate_limited": True,
    "model.unavailable": True,
    "model.timeout": True,
    "model.rejected": False,
    "model.stream_broken": True,
    "budget.exceeded": False,
    "conversation.not_found": False,
    "idempotency.mismatch": False,
    "internal": False,
    "store.rejected": False,
    # HTTP only: what the API answers, mapped back by the HTTP client
    "auth.required": False,
    "auth.invalid": False,
    "auth.forbidden": False,
    "task.not_found": False,
    "batch.not_found": False,
    "events.expired": False,
    "request.too_large": False,
    "request.unsupported_media_type": False,
    "unavailable": True,
    # never on the wire: a setting, a wait that ran out of time
    "config.invalid": False,
    "wait.timeout": False,
}


class QvqError(Exception):
    """Base of every error the project raises on purpose."""

    default_code = "internal"

    def __init__(self, message: str, *, code: str | None = None, retryable: bool | None = None) -> None:
        message = redact(message)  # a message is logged, stored and published: no URL query, no key
        super().__init__(message)
        self.code = code or self.default_code
        if self.code not in ERROR_CODES:
            raise ValueError(f"unknown error code {self.code!r}")
        self.message = message
        self.retryable = ERROR_CODES[self.code] if retryable is None else retryable

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "retryable": self.retryable}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r})"


class RequestError(QvqError):
    """The job request is invalid; the producer refuses it before anything is enqueued."""

    default_code = "request.invalid"

    def __init__(self, message: str, *, field: str | None = None, code: str | None = None) -> None:
        self.field = field
        super().__init__(f"{field}: {message}" if field else message, code=code)


class ConflictError(RequestError):
    """The request is valid, but the task is not in a state that allows it (HTTP 409)."""


class TaskIdTaken(ConflictError):
    """The caller chose a task id that exists already."""


class IdempotencyMismatch(ConflictError):
    """An idempotency key used again with a different request (HTTP 409, naming the first task)."""

    default_code = "idempotency.mismatch"


class NotificationError(RequestError):
    """The body is not a notification in any format this service reads."""


class JsonTooDeep(QvqError, ValueError):
    default_code = "request.invalid"


class UnsafeURL(QvqError, ValueError):
    """A URL the SSRF guard will not request. reason: invalid | refused | not_found | unresolved."""

    default_code = "request.invalid"

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class ImageError(QvqError):
    """An image cannot be fetched or would be refused by the model service."""

    default_code = "image.corrupt"

    def __init__(self, message: str, *, code: str, ref: str | None = None, retryable: bool | None = None) -> None:
        self.ref = ref
        super().__init__(f"{ref}: {message}" if ref else message, code=code, retryable=retryable)


class ModelError(QvqError):
    """The QVQ call failed; retryable or not by its code."""

    default_code = "model.unavailable"

    def __init__(
        self, message: str, *, code: str | None = None, retryable: bool | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(message, code=code, retryable=retryable)


class BudgetError(QvqError):
    default_code = "budget.exceeded"


class InternalError(QvqError):
    default_code = "internal"


class StreamStopped(QvqError):
    """The run was asked to stop (cancel, time limit, lease lost); the partial text is in `result`."""

    def __init__(self, result: Any = None) -> None:
        super().__init__("stream stopped")
        self.result = result


class StoreRejected(QvqError):
    """The database refused a result for good (a value it cannot hold): retrying would only bill again."""

    default_code = "store.rejected"


class StoreUnavailable(QvqError):
    """The database could not be reached: nothing terminal was written; run the task again later."""

    default_code = "unavailable"


class EnqueueError(QvqError):
    """The job could not be handed to the queue (Redis or the broker is unreachable); nothing was lost.

    `message` is safe to show anyone; `detail` (the underlying error, which may name a host) is for logs."""

    default_code = "unavailable"

    def __init__(self, message: str, *, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


class WaitTimeout(QvqError, TimeoutError):
    """A wait for a task's events or result ran out of time."""

    default_code = "wait.timeout"


class ConfigError(QvqError, ValueError):
    """A setting has a bad value; raised when settings are read, so a process fails at start."""

    default_code = "config.invalid"


class LocalServiceError(QvqError, RuntimeError):
    """A local stand-in (embedded Redis, the demo's worker) could not start or died."""


class ApiCallError(QvqError):
    """An error the HTTP API answers (or the API could not be reached); `status` is the HTTP status.

    The routes raise these (one exception handler writes them as {"error": {"code", "message", "field"}})
    and the HTTP client raises the same class again from the answer."""

    default_code = "internal"
    default_status = 500

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None,
                 field: str | None = None, headers: dict[str, str] | None = None) -> None:
        self.status = self.default_status if status is None else status
        self.field = field
        self.headers = headers
        super().__init__(message, code=code if code in ERROR_CODES else None)


class AuthError(ApiCallError):
    default_code = "auth.invalid"
    default_status = 401


class NotFoundError(ApiCallError, KeyError):
    default_code = "task.not_found"
    default_status = 404

    def __str__(self) -> str:  # KeyError would quote the message
        return self.message


class UnavailableError(ApiCallError):
    default_code = "unavailable"
    default_status = 503
