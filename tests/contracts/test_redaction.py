"""contracts/redaction.py: the one function every log line and stored error goes through."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from contracts.errors import ImageError, InternalError
from contracts.redaction import redact, shown_url

SECRET = "s3cr3t-VALUE-42"


@pytest.mark.parametrize("text", [
    f"callback refused: http://127.0.0.1:9/hook?token={SECRET} is a private address",
    f"https://user:{SECRET}@example.com/a.png",
    f"https://bucket.s3.amazonaws.com/a.png?X-Amz-Signature={SECRET}&X-Amz-Expires=60",
    f"GET /v1/tasks?api%5Fkey={SECRET}&from_seq=3 HTTP/1.1",
    f"/v1/tasks/x/events?API_KEY={SECRET}",
    f"Authorization: Bearer {SECRET}",
    f"oss://bucket/key.png#frag?password={SECRET}",
])
def test_secrets_are_gone_and_the_rest_stays(text: str) -> None:
    shown = redact(text)
    assert SECRET not in shown
    assert redact(shown) == shown  # idempotent


def test_what_is_not_secret_is_kept() -> None:
    assert redact("/v1/tasks?status=failed&from_seq=3") == "/v1/tasks?status=failed&from_seq=3"
    assert redact("s3://photos/in/a.png: not found") == "s3://photos/in/a.png: not found"
    assert shown_url("https://h.example:8443/cb?t=1#x") == "https://h.example:8443/cb?..."
    assert shown_url("http://[::1]:80/a") == "http://[::1]:80/a"


def test_every_error_message_is_redacted_at_construction() -> None:
    error = ImageError(f"HTTP 403 from https://cdn.example.com/a.png?sig={SECRET}", code="image.access_denied")
    assert SECRET not in error.message and SECRET not in str(error) and SECRET not in str(error.to_dict())
    assert SECRET not in InternalError(f"crashed fetching http://x/?api_key={SECRET}").message


@given(st.text(max_size=200))
def test_redact_never_raises_and_is_idempotent(text: str) -> None:
    once = redact(text)
    assert redact(once) == once
