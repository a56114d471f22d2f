"""The service's error answers in OpenAI-compatible mode.

Body: {"error": {"message", "type", "param", "code"}, "id", "request_id"} (qvq-api.md, Errors).
"""

from __future__ import annotations

import uuid
from typing import Any

from starlette.responses import JSONResponse


class ApiError(Exception):
    """An HTTP error answer of the emulated service."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        type_: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.type = type_
        self.headers = headers or {}

    def body(self, request_id: str) -> dict[str, Any]:
        return {
            "error": {"message": self.message, "type": self.type, "param": None, "code": self.code},
            "id": f"chatcmpl-{request_id}",
            "request_id": request_id,
        }

    def response(self) -> JSONResponse:
        request_id = str(uuid.uuid4())
        headers = {"x-request-id": request_id, **self.headers}
        return JSONResponse(self.body(request_id), status_code=self.status, headers=headers)


def invalid_parameter(message: str) -> ApiError:
    return ApiError(400, "invalid_parameter_error", message)


def stream_only() -> ApiError:
    return invalid_parameter(
        "This model only support stream mode, please enable the stream parameter to access the model."
    )


def model_not_found(model: str) -> ApiError:
    return ApiError(
        404, "model_not_found", f"The model `{model}` does not exist or you do not have access to it."
    )


def rate_limited(retry_after_s: float) -> ApiError:
    retry_after = f"{retry_after_s:g}"
    return ApiError(
        429,
        "limit_requests",
        "Requests rate limit exceeded, please try again later.",
        type_="limit_requests",
        headers={"Retry-After": retry_after},
    )


def internal_error() -> ApiError:
    return ApiError(
        500,
        "InternalError",
        "An internal error has occurred, please try again later or contact service support.",
        type_="InternalError",
    )


def model_unavailable() -> ApiError:
    return ApiError(
        503, "ModelUnavailable", "Model is unavailable, please try again later.", type_="ModelUnavailable"
    )


def data_inspection_failed() -> ApiError:
    return ApiError(
        400,
        "data_inspection_failed",
        "Input data may contain inappropriate content.",
        type_="data_inspection_failed",
    )
