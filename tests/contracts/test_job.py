from __future__ import annotations

from typing import Any

import pytest

from contracts.errors import RequestError
from contracts.job import JobRequest, parse_job


def _job(**fields: Any) -> dict[str, Any]:
    return {"images": ["s3://bucket/key.png"], "prompt": "What is this?", **fields}


def test_a_minimal_request_gets_an_id_and_the_default_model() -> None:
    job = parse_job(_job(), default_model="qvq-plus")
    assert job.model == "qvq-plus" and len(job.task_id) == 36 and job.enqueued_at > 0


def test_the_payload_round_trips() -> None:
    job = parse_job(_job(tenant="t1", metadata={"a": 1}, high_resolution=True))
    assert JobRequest.from_payload(job.to_payload()) == job


@pytest.mark.parametrize(("fields", "field", "code"), [
    ({"model": "qvq-ultra"}, "model", "model.unknown"),
    ({"model": "qvq-72b-preview"}, "model", "model.unknown"),
    ({"images": []}, "images", "request.invalid"),
    ({"images": "s3://b/k"}, "images", "request.invalid"),
    ({"images": ["s3://bucket"]}, "images[0]", "request.invalid"),
    ({"images": ["ftp://host/x.png"]}, "images[0]", "request.invalid"),
    ({"images": [""]}, "images[0]", "request.invalid"),
    ({"prompt": "  "}, "prompt", "request.invalid"),
    ({"high_resolution": "yes"}, "high_resolution", "request.invalid"),
    ({"callback_url": "not a url"}, "callback_url", "request.invalid"),
    ({"metadata": [1]}, "metadata", "request.invalid"),
    ({"task_id": "has space"}, "task_id", "request.invalid"),
    ({"colour": "red"}, "colour", "request.invalid"),
])
def test_bad_input_names_the_field(fields: dict[str, Any], field: str, code: str) -> None:
    with pytest.raises(RequestError) as caught:
        parse_job(_job(**fields))
    assert caught.value.field == field and caught.value.code == code
    assert field in str(caught.value)


def test_a_conversation_turn_may_have_no_images() -> None:
    assert parse_job(_job(images=[], conversation_id="c1")).images == ()


def test_an_old_payload_version_is_refused() -> None:
    payload = parse_job(_job()).to_payload() | {"version": 99}
    with pytest.raises(RequestError, match="version"):
        JobRequest.from_payload(payload)
