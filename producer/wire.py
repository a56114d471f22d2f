"""How errors travel over HTTP, both ways, from one table: the API answers a QvqError with its status and
`{"error": {"code", "message", "field"}}`; the HTTP client raises the same kind of error from that answer.

    status  codes                                                 error class
    404     task.not_found                                        NotFoundError (also a KeyError)
    404     conversation.not_found, image.not_found (an upload)   RequestError
    409     request.invalid (state, taken id), idempotency.mismatch  ConflictError
    422     request.invalid, model.unknown, image.*               RequestError
    401/403 auth.*                                                AuthError
    413     request.too_large, image.too_large                    ApiCallError
    503     unavailable                                           UnavailableError
    500     internal                                              ApiCallError
"""

from __future__ import annotations

from typing import Any

from contracts.errors import (
    ERROR_CODES,
    ApiCallError,
    AuthError,
    ConflictError,
    EnqueueError,
    NotFoundError,
    QvqError,
    RequestError,
    StoreUnavailable,
    UnavailableError,
)

#: Request errors whose code means "not there" rather than "not valid".
NOT_FOUND_CODES = frozenset({"conversation.not_found", "image.not_found"})
_BY_STATUS: dict[int, type[ApiCallError]] = {401: AuthError, 403: AuthError, 404: NotFoundError,
                                              503: UnavailableError}


def status_of(exc: QvqError) -> int:
    """The HTTP status the API answers an error with."""
    if isinstance(exc, ApiCallError):
        return exc.status
    if isinstance(exc, ConflictError):
        return 409
    if isinstance(exc, RequestError):
        return 404 if exc.code in NOT_FOUND_CODES else 422
    if isinstance(exc, EnqueueError | StoreUnavailable):
        return 503
    return 500


def body_of(exc: QvqError) -> dict[str, Any]:
    return {"error": {"code": exc.code, "message": exc.message, "field": getattr(exc, "field", None)}}


def error_from(status: int, data: Any) -> QvqError:
    """The error an API answer stands for (`data`: its JSON body, or None)."""
    detail: dict[str, Any] = data["error"] if isinstance(data, dict) and isinstance(data.get("error"), dict) else {}
    code, message, field = detail.get("code"), str(detail.get("message") or f"HTTP {status}"), detail.get("field")
    if status == 409:
        return _request_error(ConflictError, message, field, code)
    if status == 422 or (status == 400 and code == "request.invalid") or (status == 404 and code in NOT_FOUND_CODES):
        return _request_error(RequestError, message, field, code)
    kind = _BY_STATUS.get(status, ApiCallError)
    return kind(message, code=code, status=status, field=field)


def _request_error(kind: type[RequestError], message: str, field: str | None, code: Any) -> RequestError:
    error = kind(message, field=field, code=code if code in ERROR_CODES else None)
    error.message = message  # the API's message names the field already
    error.args = (message,)
    return error
