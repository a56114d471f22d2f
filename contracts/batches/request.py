"""The batch request (README, Batches): validated once, into a BatchRequest; each item becomes a job request
checked by the job's own rules (contracts/job.py), so an item is exactly a task submitted alone."""

from __future__ import annotations

import hashlib
import re
import time
import uuid
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from contracts.errors import RequestError
from contracts.job import JobRequest, image_ref, parse_job
from contracts.object_store import OBJECT_SCHEMES, scheme_of
from contracts.text import check_text

MAX_BATCH_ID_CHARS = 100  # the callback row names it "batch:<id>" in a 128-character column
MAX_SUFFIX_CHARS = 64
BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,62}")  # as the API schema says; S3 answers the finer rules
_FIELDS = {"batch_id", "source", "suffix", "items", "prompt", "model", "high_resolution", "tenant", "callback_url",
           "max_cost_cny", "cache", "dry_run"}
#: The fields every item's job request takes from the batch.
_JOB_FIELDS = ("prompt", "model", "high_resolution", "tenant", "cache")
_PROBE_REF = "s3://bucket/key"  # stands in for an item while the batch's own fields are checked


@dataclass(frozen=True)
class BatchRequest:
    batch_id: str
    prompt: str
    model: str
    source: str | None = None  # s3://bucket/prefix or oss://...: every object under it (or `items`)
    suffix: str = ""
    items: tuple[str, ...] = ()
    high_resolution: bool = False
    tenant: str | None = None
    callback_url: str | None = None
    max_cost_cny: Decimal | None = None
    cache: bool = False
    dry_run: bool = False

    def to_row(self) -> dict[str, Any]:
        """What the batch row keeps (the items are the tasks themselves)."""
        return {"source": self.source, "suffix": self.suffix, "prompt": self.prompt, "model": self.model,
                "high_resolution": self.high_resolution, "callback_url": self.callback_url,
                "max_cost_cny": None if self.max_cost_cny is None else str(self.max_cost_cny), "cache": self.cache,
                "items_given": bool(self.items)}

    def item_job(self, ref: str, version: str = "", *, local_files: bool = False) -> JobRequest:
        """The job request of one item, its idempotency key made of the batch id and the object's version
        (so submitting the batch again adds only what is new)."""
        if not self.items:  # a listed object's key is checked by the job's rule (refs of `items` already were)
            check_ref(ref, 0, local_files=local_files)
        return JobRequest(task_id=str(uuid.uuid4()), model=self.model, images=(ref,), prompt=self.prompt,
                          idempotency_key=self.item_key(ref, version), high_resolution=self.high_resolution,
                          tenant=self.tenant, enqueued_at=time.time(), cache=self.cache, batch_id=self.batch_id)

    def item_key(self, ref: str, version: str) -> str:
        digest = hashlib.sha256(f"{ref}\n{version}".encode()).hexdigest()[:40]
        return f"batch:{self.batch_id}:{digest}"


def parse_batch(raw: Any, *, default_model: str = "qvq-max", local_files: bool = False) -> BatchRequest:
    """Validate a batch request; a bad field raises RequestError naming it (the job's fields by the job's rules)."""
    if not isinstance(raw, dict):
        raise RequestError("the batch request must be a JSON object")
    unknown = sorted(set(raw) - _FIELDS)
    if unknown:
        raise RequestError(f"unknown field(s) {', '.join(unknown)}", field=unknown[0])
    probe = parse_job({"images": [_PROBE_REF], "callback_url": raw.get("callback_url"),
                       **{name: raw[name] for name in _JOB_FIELDS if name in raw}},
                      default_model=default_model)
    source, items = raw.get("source"), raw.get("items")
    if (source is None) == (items is None):
        raise RequestError("give either `source` (a bucket prefix) or `items` (a list of image references)",
                           field="source")
    if items is not None and raw.get("suffix") is not None:
        raise RequestError("`suffix` filters a `source` listing; give only the `items` you want", field="suffix")
    return BatchRequest(
        batch_id=_batch_id(raw.get("batch_id")), prompt=probe.prompt, model=probe.model,
        source=_source(source) if source is not None else None, suffix=_suffix(raw.get("suffix")),
        items=_items(items, local_files) if items is not None else (),
        high_resolution=probe.high_resolution, tenant=probe.tenant, callback_url=probe.callback_url,
        max_cost_cny=_money(raw.get("max_cost_cny")), cache=probe.cache, dry_run=_flag(raw, "dry_run"),
    )


def _batch_id(value: Any) -> str:
    if value is None:
        return f"b-{uuid.uuid4().hex}"
    if not isinstance(value, str) or len(value) > MAX_BATCH_ID_CHARS or not _is_id(value):
        raise RequestError(f"must be 1-{MAX_BATCH_ID_CHARS} letters, digits, '.', '_' or '-'", field="batch_id")
    return value


def _is_id(value: str) -> bool:
    return bool(value) and all(ch.isascii() and (ch.isalnum() or ch in "._-") for ch in value)


def _source(value: Any) -> str:
    if not isinstance(value, str) or scheme_of(value) not in OBJECT_SCHEMES:
        raise RequestError("expected s3://bucket/prefix or oss://bucket/prefix", field="source")
    check_text(value, "source")
    if not BUCKET_NAME.fullmatch(value.split("://", 1)[1].partition("/")[0]):
        raise RequestError("expected s3://bucket/prefix or oss://bucket/prefix, the bucket named by the S3 rules "
                           "(3-63 lower-case letters, digits, '.' or '-')", field="source")
    return value


def _suffix(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > MAX_SUFFIX_CHARS:
        raise RequestError(f"must be a string of at most {MAX_SUFFIX_CHARS} characters", field="suffix")
    return check_text(value, "suffix")


def _items(value: Any, local_files: bool) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise RequestError("must be a non-empty list of image references", field="items")
    for index, ref in enumerate(value):  # each by the job's own rule for an image reference
        check_ref(ref, index, local_files=local_files)
    return tuple(value)


def check_ref(ref: Any, index: int, *, local_files: bool) -> None:
    """An item's reference, by the job's own rule for an image reference (RequestError naming items[index])."""
    try:
        image_ref(ref, index, local_files=local_files)
    except RequestError as exc:
        raise RequestError(exc.message, field=f"items[{index}]") from None


def _money(value: Any) -> Decimal | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise RequestError("must be an amount in CNY, like \"12.50\"", field="max_cost_cny")
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        raise RequestError("must be an amount in CNY, like \"12.50\"", field="max_cost_cny") from None
    if not amount.is_finite() or amount <= 0:
        raise RequestError("must be a positive amount in CNY", field="max_cost_cny")
    return amount


def _flag(raw: dict[str, Any], name: str) -> bool:
    value = raw.get(name, False)
    if not isinstance(value, bool):
        raise RequestError("must be true or false", field=name)
    return value
