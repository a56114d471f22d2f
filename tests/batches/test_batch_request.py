"""The batch request's rules and the estimate's arithmetic, without services."""

from __future__ import annotations

import io
from decimal import Decimal

import pytest
from PIL import Image

from contracts.batches.estimate import Estimate, pixel_size
from contracts.batches.request import parse_batch
from contracts.errors import RequestError
from contracts.tokens import image_tokens


@pytest.mark.parametrize(("raw", "field"), [
    ({"prompt": "q"}, "source"),
    ({"prompt": "q", "source": "s3://bucket/p/", "items": ["s3://bucket/a.png"]}, "source"),
    ({"prompt": "q", "source": "https://example.com/p/"}, "source"),
    ({"prompt": "q", "source": "s3://B/p/"}, "source"),
    ({"prompt": "q", "items": []}, "items"),
    ({"prompt": "q", "items": ["s3://bucket/a.png", "file:///etc/passwd"]}, "items[1]"),
    ({"prompt": "q", "items": ["s3://bucket/a.png"], "suffix": ".png"}, "suffix"),
    ({"prompt": "q", "source": "s3://bucket/p/", "max_cost_cny": "0"}, "max_cost_cny"),
    ({"prompt": "q", "source": "s3://bucket/p/", "max_cost_cny": "NaN"}, "max_cost_cny"),
    ({"prompt": "q", "source": "s3://bucket/p/", "max_cost_cny": True}, "max_cost_cny"),
    ({"prompt": "q", "source": "s3://bucket/p/", "batch_id": "../x"}, "batch_id"),
    ({"prompt": "q", "source": "s3://bucket/p/", "batch_id": "x" * 101}, "batch_id"),
    ({"prompt": "q", "source": "s3://bucket/p/", "dry_run": "yes"}, "dry_run"),
    ({"prompt": "q", "source": "s3://bucket/p/", "model": "gpt-4o"}, "model"),
    ({"prompt": " ", "source": "s3://bucket/p/"}, "prompt"),
    ({"prompt": "q", "source": "s3://bucket/p/", "images": []}, "images"),
])
def test_a_bad_field_is_refused_by_name(raw: dict[str, object], field: str) -> None:
    with pytest.raises(RequestError) as refused:
        parse_batch(raw)
    assert refused.value.field == field


def test_items_become_jobs_with_the_batch_and_an_idempotency_key_per_version() -> None:
    request = parse_batch({"prompt": "Colour?", "items": ["s3://bucket/a.png"], "tenant": "acme", "cache": True,
                           "max_cost_cny": "12.5", "batch_id": "shift-1"})
    assert request.max_cost_cny == Decimal("12.5") and request.cache and request.tenant == "acme"
    first, again = request.item_job("s3://bucket/a.png", "etag-1"), request.item_job("s3://bucket/a.png", "etag-1")
    changed = request.item_job("s3://bucket/a.png", "etag-2")
    assert first.batch_id == "shift-1" and first.cache and first.tenant == "acme" and first.images == ("s3://bucket/a.png",)
    assert first.idempotency_key == again.idempotency_key != changed.idempotency_key
    assert first.task_id != again.task_id
    assert "batch_id" in first.to_payload() and "cache" in first.to_payload()


def test_a_listed_key_is_checked_by_the_job_rule() -> None:
    request = parse_batch({"prompt": "q", "source": "s3://bucket/p/"})
    with pytest.raises(RequestError):
        request.item_job("s3://bucket/p/a\x00.png")


def _png(size: tuple[int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size).save(out, "PNG")
    return out.getvalue()


def test_pixel_size_from_the_first_bytes_only() -> None:
    assert pixel_size(_png((640, 480))[:64]) == (640, 480)
    assert pixel_size(b"not an image") is None


def test_the_range_holds_the_point_and_widens_for_what_was_not_read() -> None:
    exact = Estimate("qvq-plus", "Colour?", high_resolution=False)
    for size in ((640, 480), (64, 48)):
        exact.add(image_tokens(*size))
    wide = Estimate("qvq-plus", "Colour?", high_resolution=False)
    wide.add(image_tokens(640, 480))
    wide.add(None)
    wide.add_unsampled()
    assert exact.cost_min < exact.cost_max and exact.to_dict()["unread"] == 0 and "sampled" not in exact.to_dict()
    assert wide.to_dict()["unread"] == 1 and wide.to_dict()["sampled"] == 2
    assert wide.cost_min <= exact.cost_min + Decimal("0.01") and wide.cost_max > exact.cost_max
    assert exact.to_dict()["image_tokens"] == image_tokens(640, 480) + image_tokens(64, 48)
