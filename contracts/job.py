"""The job request: validated once by the producer, carried to the worker as a versioned JSON payload."""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import urlparse

from contracts.catalog import MODELS, REFUSED_MODELS
from contracts.errors import RequestError, UnsafeURL
from contracts.json_shape import nesting_depth
from contracts.ssrf import MAX_URL_CHARS, parse_url
from contracts.tenants import SAFE_ID_RULE, is_safe_id
from contracts.text import check_json_text, check_text

PAYLOAD_VERSION = 1
#: The queue message (`{"version": 2, "task_id", "run"}`): which task and run; the worker reads the
#: request itself from the task row (worker/message.py refuses anything else).
MESSAGE_VERSION = 2
TASK_NAME = "qvq.reason"
QUEUE = "qvq"
MAX_IMAGES = 100
MAX_PROMPT_CHARS = 100_000
MAX_ID_CHARS = 128
MAX_CALLBACK_URL_CHARS = 2048
IMAGE_SCHEMES = ("s3", "oss", "https", "http", "file", "upload")
MAX_METADATA_BYTES = 16 * 1024  # metadata is echoed in the result and the terminal event
MAX_METADATA_DEPTH = 8
#: What POST /v1/uploads returns: `upload://<32 hex>`, valid only for the tenant that uploaded it.
UPLOAD_REF = re.compile(r"upload://([0-9a-f]{32})")
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,256}")

_OMITTED_WHEN_UNSET = ("trace", "cache", "batch_id")
_FIELDS = {
    "task_id", "idempotency_key", "model", "images", "prompt", "conversation_id",
    "high_resolution", "tenant", "callback_url", "metadata", "cache",
}


@dataclass(frozen=True)
class JobRequest:
    task_id: str
    model: str
    images: tuple[str, ...]
    prompt: str
    idempotency_key: str | None = None
    conversation_id: str | None = None
    high_resolution: bool = False
    tenant: str | None = None
    callback_url: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    enqueued_at: float = 0.0
    trace: dict[str, str] | None = None  # the caller's traceparent/tracestate (contracts/tracing.py); not a request field
    cache: bool = False  # answer from the result cache when the same request was answered (worker/cache.py)
    batch_id: str | None = None  # the batch this job is an item of (contracts/batches/); not a request field

    def to_payload(self) -> dict[str, Any]:
        # A shallow copy: dataclasses.asdict deep-copies the metadata, 80 us a job (0.8 s of a 10,000-item batch)
        data = {name: getattr(self, name) for name in _FIELD_NAMES}
        data["images"] = list(self.images)
        data["version"] = PAYLOAD_VERSION
        for name in _OMITTED_WHEN_UNSET:  # a worker of an earlier release reads such a payload as before
            if not data[name]:
                del data[name]
        return data

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> JobRequest:
        version = payload.get("version")
        if version != PAYLOAD_VERSION:
            raise RequestError(f"unsupported payload version {version!r}", field="version")
        data = {k: v for k, v in payload.items() if k != "version"}
        data["images"] = tuple(data.get("images") or ())
        return cls(**data)


_FIELD_NAMES = tuple(spec.name for spec in fields(JobRequest))


def parse_job(raw: dict[str, Any], *, default_model: str = "qvq-max", local_files: bool = True) -> JobRequest:
    """Validate a job request (README's table); a bad field raises RequestError naming it.

    `local_files=False` (requests over HTTP): `file://` references and bare paths are refused, since
    they would name files on the server; `upload://` references of POST /v1/uploads stand in for them.
    """
    if not isinstance(raw, dict):
        raise RequestError("the job request must be a JSON object")
    unknown = sorted(set(raw) - _FIELDS)
    if unknown:
        raise RequestError(f"unknown field(s) {', '.join(unknown)}", field=unknown[0])
    conversation_id = _optional_id(raw, "conversation_id")
    return JobRequest(
        task_id=_optional_id(raw, "task_id") or str(uuid.uuid4()),
        model=_model(raw.get("model") or default_model),
        images=_images(raw.get("images"), continuing=conversation_id is not None, local_files=local_files),
        prompt=_prompt(raw.get("prompt")),
        idempotency_key=_idempotency_key(raw.get("idempotency_key")),
        conversation_id=conversation_id,
        high_resolution=_bool(raw, "high_resolution"),
        tenant=_optional_id(raw, "tenant"),
        callback_url=_callback(raw.get("callback_url")),
        metadata=_metadata(raw.get("metadata")),
        enqueued_at=time.time(),
        cache=_bool(raw, "cache"),
    )


def _model(value: Any) -> str:
    if not isinstance(value, str):
        raise RequestError("must be a string", field="model")
    if value in REFUSED_MODELS:
        raise RequestError(REFUSED_MODELS[value], field="model", code="model.unknown")
    if value not in MODELS:
        raise RequestError(
            f"unknown model {value!r}; expected one of {', '.join(MODELS)}", field="model", code="model.unknown"
        )
    return value


def _images(value: Any, *, continuing: bool, local_files: bool = True) -> tuple[str, ...]:
    if value is None:
        value = []
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise RequestError("must be a list of image references", field="images")
    if not value and not continuing:
        raise RequestError("at least one image is required (unless conversation_id continues a conversation)",
                           field="images")
    if len(value) > MAX_IMAGES:
        raise RequestError(f"at most {MAX_IMAGES} images per job", field="images")
    return tuple(image_ref(ref, index, local_files=local_files) for index, ref in enumerate(value))


def image_ref(ref: Any, index: int, *, local_files: bool = True) -> str:
    """One image reference checked (`images[index]` names it in an error): its form, then its origin."""
    checked = _image_ref(ref, index)
    _check_origin(checked, index, local_files)
    return checked


def _check_origin(ref: str, index: int, local_files: bool) -> None:
    """Local files only from local callers; upload references only in their own form."""
    scheme = urlparse(ref).scheme.lower()
    if scheme == "upload" and not UPLOAD_REF.fullmatch(ref):
        raise RequestError("expected upload://<id> as returned by POST /v1/uploads", field=f"images[{index}]")
    if not local_files and (scheme == "file" or len(scheme) <= 1):
        raise RequestError("files on the server cannot be named over HTTP; upload the image "
                           "(POST /v1/uploads) and pass the upload:// reference it returns", field=f"images[{index}]")


def _image_ref(ref: Any, index: int) -> str:
    name = f"images[{index}]"
    if not isinstance(ref, str) or not ref.strip():
        raise RequestError("must be a non-empty string", field=name)
    check_text(ref, name)
    parsed = urlparse(ref)
    scheme = parsed.scheme.lower()
    if scheme in {"s3", "oss"} and (not parsed.netloc or not parsed.path.strip("/")):
        raise RequestError(f"expected {scheme}://bucket/key, got {ref!r}", field=name)
    if scheme in {"http", "https"}:
        _check_url(ref, field=name)
    if scheme and len(scheme) > 1 and scheme not in IMAGE_SCHEMES:
        raise RequestError(f"unsupported scheme {scheme!r}; use s3://, oss://, https:// or a local file",
                           field=name)
    return ref


def _prompt(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise RequestError("a non-empty question is required", field="prompt")
    if len(value) > MAX_PROMPT_CHARS:
        raise RequestError(f"at most {MAX_PROMPT_CHARS} characters", field="prompt")
    return check_text(value, "prompt")


def _optional_id(raw: dict[str, Any], name: str) -> str | None:
    value = raw.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not is_safe_id(value):
        raise RequestError(f"must be {SAFE_ID_RULE}", field=name)
    return value


def _idempotency_key(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _IDEMPOTENCY_KEY.fullmatch(value):
        raise RequestError("must be 1-256 printable ASCII characters without spaces", field="idempotency_key")
    return value


def _bool(raw: dict[str, Any], name: str) -> bool:
    value = raw.get(name, False)
    if not isinstance(value, bool):
        raise RequestError("must be true or false", field=name)
    return value


def _callback(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise RequestError("must be an http(s) URL", field="callback_url")
    check_text(value, "callback_url")
    _check_url(value, field="callback_url", credentials=False, max_chars=MAX_CALLBACK_URL_CHARS)
    return value


def _check_url(url: str, *, field: str, credentials: bool = True, max_chars: int = MAX_URL_CHARS) -> None:
    """The worker's SSRF guard parses the URL the same way (contracts/ssrf.py); addresses are checked there."""
    try:
        parse_url(url, credentials=credentials, max_chars=max_chars)
    except UnsafeURL as exc:
        raise RequestError(exc.message, field=field) from None


def _metadata(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RequestError("must be a JSON object", field="metadata")
    if nesting_depth(value, MAX_METADATA_DEPTH) > MAX_METADATA_DEPTH:
        raise RequestError(f"nested deeper than {MAX_METADATA_DEPTH} levels", field="metadata")
    check_json_text(value, "metadata")
    size = len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())
    if size > MAX_METADATA_BYTES:
        raise RequestError(f"{size:,} bytes as JSON, over the limit of {MAX_METADATA_BYTES:,}", field="metadata")
    return value


def message_for(task_id: str, run: int) -> dict[str, Any]:
    """The body of the Celery task that runs `run` of a task."""
    return {"version": MESSAGE_VERSION, "task_id": task_id, "run": run}
