"""The model call's errors: every failure of the openai SDK and httpx read as one of our codes."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from contracts.errors import ModelError
from worker.stream.model import map_error

REQUEST = httpx.Request("POST", "https://dashscope.example/compatible-mode/v1/chat/completions")


# -- map_error -------------------------------------------------------------------------------------
def _status_error(status: int, message: str, code: str = "", headers: dict[str, str] | None = None) -> Any:
    response = httpx.Response(status, headers=headers or {}, request=REQUEST,
                              json={"error": {"message": message, "code": code}})
    kinds = {400: openai.BadRequestError, 401: openai.AuthenticationError, 403: openai.PermissionDeniedError,
             404: openai.NotFoundError, 429: openai.RateLimitError, 500: openai.InternalServerError}
    kind = kinds.get(status, openai.APIStatusError)
    return kind(message, response=response, body={"error": {"message": message, "code": code}})


@pytest.mark.parametrize(("exc", "started", "code", "retryable"), [
    (_status_error(429, "Requests rate limit exceeded, please try again later.", "Throttling.RateQuota"),
     False, "model.rate_limited", True),
    (_status_error(429, "Free allocated quota exceeded.", "AllocationQuota.FreeTierOnly"),
     False, "model.rate_limited", False),
    (_status_error(429, "Access denied, please make sure your account is in good standing (Arrearage)."),
     False, "model.rate_limited", False),
    (_status_error(500, "An internal error has occured, please try again later.", "InternalError"),
     False, "model.unavailable", True),
    (_status_error(503, "The model is unavailable.", "ModelUnavailable"), False, "model.unavailable", True),
    (_status_error(400, "Input data may contain inappropriate content.", "data_inspection_failed"),
     False, "model.rejected", False),
    (_status_error(400, "This model only support stream mode.", "invalid_parameter_error"),
     False, "model.rejected", False),
    (_status_error(401, "Incorrect API key provided.", "invalid_api_key"), False, "model.rejected", False),
    (_status_error(404, "The model does not exist.", "model_not_found"), False, "model.rejected", False),
    (_status_error(408, "Request timed out."), False, "model.timeout", True),
    (openai.APITimeoutError(REQUEST), False, "model.timeout", True),
    (openai.APIConnectionError(request=REQUEST), False, "model.unavailable", True),
    (openai.APIConnectionError(request=REQUEST), True, "model.stream_broken", True),
    (httpx.ReadTimeout("no data", request=REQUEST), True, "model.timeout", True),
    (httpx.RemoteProtocolError("peer closed connection without sending complete message body"), True,
     "model.stream_broken", True),
    (httpx.ConnectError("connection refused"), False, "model.unavailable", True),
    (openai.APIError("An error occurred during streaming", REQUEST, body=None), True, "model.stream_broken", True),
])
def test_map_error_classifies_model_failures(exc: BaseException, started: bool, code: str, retryable: bool) -> None:
    error = map_error(exc, started=started)
    assert isinstance(error, ModelError)
    assert (error.code, error.retryable) == (code, retryable), error


def test_map_error_reads_retry_after() -> None:
    error = map_error(_status_error(429, "slow down", headers={"retry-after": "7"}), started=False)
    assert error.retry_after_s == 7.0
    assert map_error(_status_error(503, "busy", headers={"retry-after": "2.5"}), started=False).retry_after_s == 2.5
    assert map_error(_status_error(429, "slow down", headers={"retry-after": "soon"}), started=False).retry_after_s is None
    assert map_error(_status_error(429, "slow down"), started=False).retry_after_s is None
