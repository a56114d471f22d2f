"""URLs in a job request (callback_url, https image references) are checked at submit, as the worker's
SSRF guard will parse them (the address checks themselves happen in the worker, at request time)."""

from __future__ import annotations

from typing import Any

import pytest

from contracts.errors import RequestError
from contracts.job import MAX_CALLBACK_URL_CHARS, parse_job


def _job(**fields: Any) -> dict[str, Any]:
    return {"images": ["s3://bucket/key.png"], "prompt": "What is this?", **fields}


def refusal(**fields: Any) -> RequestError:
    with pytest.raises(RequestError) as caught:
        parse_job(_job(**fields))
    assert caught.value.code == "request.invalid"
    return caught.value


@pytest.mark.parametrize(("url", "says"), [
    ("https://example.com:99999/hook", "port 99999"),
    ("https://example.com:0/hook", "port 0"),
    ("https://example.com:http/hook", "not a valid URL"),
    ("https://user:secret@example.com/hook", "credentials"),
    ("https://token@example.com/hook", "credentials"),
    ("ftp://example.com/hook", "http(s)"),
    ("example.com/hook", "http(s)"),
    ("https:///hook", "no host"),
    ("https://exa%20mple.com/hook", "host name"),
    ("https://example.com/\nhook", "control characters"),
    ("https://example.com/" + "a" * MAX_CALLBACK_URL_CHARS, f"{MAX_CALLBACK_URL_CHARS} characters"),
    (42, "http(s) URL"),
])
def test_a_bad_callback_url_is_refused_at_submit(url: Any, says: str) -> None:
    error = refusal(callback_url=url)
    assert error.field == "callback_url" and says in error.message
    assert "secret" not in error.message


@pytest.mark.parametrize("url", [
    "https://example.com/hook", "http://example.com:8080/hook?token=abc", "https://example.com:65535/x",
    "https://[2606:4700:4700::1111]/hook", "https://bücher.example/hook",
    "http://127.0.0.1:9000/hook",  # allowed at submit; the worker refuses it unless QVQ_ALLOW_PRIVATE_URLS
])
def test_a_good_callback_url_is_kept_as_given(url: str) -> None:
    assert parse_job(_job(callback_url=url)).callback_url == url


@pytest.mark.parametrize(("ref", "says"), [
    ("https://example.com:99999/a.png", "port 99999"),
    ("http://example.com:0/a.png", "port 0"),
    ("https://example.com:abc/a.png", "not a valid URL"),
    ("https:///a.png", "no host"),
    ("https://exa%20mple.com/a.png", "host name"),
])
def test_a_bad_image_url_is_refused_at_submit_naming_its_index(ref: str, says: str) -> None:
    error = refusal(images=["s3://bucket/ok.png", ref])
    assert error.field == "images[1]" and says in error.message


def test_good_image_urls_are_kept_as_given() -> None:
    refs = ["https://example.com/a.png", "https://example.com:8443/my photo.png", "s3://b/k", "/tmp/a.png"]
    assert parse_job(_job(images=refs)).images == tuple(refs)
