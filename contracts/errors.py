"""One rooted error tree; every code is a stable string from the design.

    QvqError (code, retryable)
    +-- RequestError      request.invalid, model.unknown, conversation.not_found (caught at submit)
    +-- ImageError        image.*, images.token_budget_exceeded (caught in the worker, before the model)
    +-- ModelError        model.*                             (the QVQ call)
    +-- BudgetError       budget.exceeded
    +-- InternalError     internal
    +-- ApiCallError      an HTTP API's answer (producer/http_client.py), by status:
        +-- AuthError         auth.required, auth.invalid, auth.forbidden (401, 403)
        +-- NotFoundError     task.not_found (404); also a KeyError, as Client.get raises
        +-- UnavailableError  unavailable (503, or the API cannot be reached): retryable

Third-party exceptions are translated to these at the one adapter that calls them.
"""

from __future__ import annotations

from typing import Any

#: code -> retryable, as promised in design.md.
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
    "internal": False,
    # HTTP only (design.md): what the API answers, mapped back by the HTTP client
    "auth.required": False,
    "auth.invalid": False,
    "auth.forbidden": False,
    "task.not_found": False,
    "events.expired": False,
    "request.too_large": False,
    "request.unsupported_media_type": False,
    "unavailable": True,
}


class QvqError(Exception):
    """Base of every error the project raises on purpose."""

    default_code = "internal"

    def __init__(self, message: str, *, code: str | None = None, retryable: bool | None = None) -> None:
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


class ApiCallError(QvqError):
    """An error the HTTP API answered (or the API could not be reached); `status` is the HTTP status."""

    default_code = "internal"

    def __init__(self, message: str, *, code: str | None = None, status: int = 0,
                 field: str | None = None) -> None:
        self.status = status
        self.field = field
        super().__init__(message, code=code if code in ERROR_CODES else None)


class AuthError(ApiCallError):
    default_code = "auth.invalid"


class NotFoundError(ApiCallError, KeyError):
    default_code = "task.not_found"

    def __str__(self) -> str:  # KeyError would quote the message
        return self.message


class UnavailableError(ApiCallError):
    default_code = "unavailable"


class ConfigError(ValueError):
    """A setting has a bad value; raised when settings are read, so a process fails at start."""
