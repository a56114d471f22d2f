"""The job request: validated once by the producer, carried to the worker as a versioned JSON payload."""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlparse

from contracts.catalog import MODELS, REFUSED_MODELS
from contracts.errors import RequestError
from contracts.ssrf import MAX_URL_CHARS, UnsafeURL, parse_url

PAYLOAD_VERSION = 1
TASK_NAME = "qvq.reason"
QUEUE = "qvq"
MAX_IMAGES = 100
MAX_PROMPT_CHARS = 100_000
MAX_ID_CHARS = 128
MAX_CALLBACK_URL_CHARS = 2048
IMAGE_SCHEMES = ("s3", "oss", "https", "http", "file")

_FIELDS = {
    "task_id", "idempotency_key", "model", "images", "prompt", "conversation_id",
    "high_resolution", "tenant", "callback_url", "metadata",
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

    def to_payload(self) -> dict[str, Any]:
        data = asdict(self)
        data["images"] = list(self.images)
        data["version"] = PAYLOAD_VERSION
        return data

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> JobRequest:
        version = payload.get("version")
        if version != PAYLOAD_VERSION:
            raise RequestError(f"unsupported payload version {version!r}", field="version")
        data = {k: v for k, v in payload.items() if k != "version"}
        data["images"] = tuple(data.get("images") or ())
        return cls(**data)


def parse_job(raw: dict[str, Any], *, default_model: str = "qvq-max") -> JobRequest:
    """Validate a job request (design.md's table); a bad field raises RequestError naming it."""
    if not isinstance(raw, dict):
        raise RequestError("the job request must be a JSON object")
    unknown = sorted(set(raw) - _FIELDS)
    if unknown:
        raise RequestError(f"unknown field(s) {', '.join(unknown)}", field=unknown[0])
    conversation_id = _optional_id(raw, "conversation_id")
    return JobRequest(
        task_id=_optional_id(raw, "task_id") or str(uuid.uuid4()),
        model=_model(raw.get("model") or default_model),
        images=_images(raw.get("images"), continuing=conversation_id is not None),
        prompt=_prompt(raw.get("prompt")),
        idempotency_key=_optional_id(raw, "idempotency_key", limit=256),
        conversation_id=conversation_id,
        high_resolution=_bool(raw, "high_resolution"),
        tenant=_optional_id(raw, "tenant"),
        callback_url=_callback(raw.get("callback_url")),
        metadata=_metadata(raw.get("metadata")),
        enqueued_at=time.time(),
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


def _images(value: Any, *, continuing: bool) -> tuple[str, ...]:
    if value is None:
        value = []
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise RequestError("must be a list of image references", field="images")
    if not value and not continuing:
        raise RequestError("at least one image is required (unless conversation_id continues a conversation)",
                           field="images")
    if len(value) > MAX_IMAGES:
        raise RequestError(f"at most {MAX_IMAGES} images per job", field="images")
    return tuple(_image_ref(ref, index) for index, ref in enumerate(value))


def _image_ref(ref: Any, index: int) -> str:
    name = f"images[{index}]"
    if not isinstance(ref, str) or not ref.strip():
        raise RequestError("must be a non-empty string", field=name)
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
    return value


def _optional_id(raw: dict[str, Any], name: str, limit: int = MAX_ID_CHARS) -> str | None:
    value = raw.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise RequestError("must be a non-empty string", field=name)
    if len(value) > limit or any(ch.isspace() or ord(ch) < 32 for ch in value):
        raise RequestError(f"at most {limit} characters, no spaces or control characters", field=name)
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
    return value
