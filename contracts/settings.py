"""The one settings object, read from the environment once (names and defaults from design.md)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from functools import lru_cache
from typing import Any

from contracts.errors import ConfigError
from contracts.flow import (
    DEFAULT_MODEL_LIMITS,
    ModelLimit,
    TenantLimit,
    parse_model_limits,
    parse_tenant_limits,
)

DASHSCOPE_BASE_URL = "https://dashscope.aliyuncs.com/compatible-mode/v1"
SECRET_FIELDS = {"dashscope_api_key", "oss_access_key_secret", "webhook_secret", "api_keys"}


@dataclass(frozen=True)
class Settings:
    redis_url: str = "redis://localhost:6379/0"
    broker_url: str = ""  # CELERY_BROKER_URL; empty means REDIS_URL
    database_url: str = "sqlite:///qvq.db"
    dashscope_api_key: str = ""
    base_url: str = DASHSCOPE_BASE_URL
    model: str = "qvq-max"
    s3_endpoint_url: str = ""
    oss_endpoint_url: str = ""
    oss_access_key_id: str = ""
    oss_access_key_secret: str = ""
    oss_region: str = ""
    allow_local_files: bool = False
    allow_private_urls: bool = False
    allowed_buckets: tuple[str, ...] = ()
    image_delivery: str = "inline"
    event_ttl_s: int = 86_400
    webhook_secret: str = ""
    api_keys: tuple[str, ...] = ()
    api_insecure: bool = False
    max_request_bytes: int = 1024 * 1024
    upload_url: str = ""  # s3://bucket/prefix, or a local directory; empty: <temp dir>/qvq-uploads
    upload_ttl_s: int = 86_400
    cors_origins: tuple[str, ...] = ()
    log_format: str = "console"
    log_level: str = "INFO"
    worker_concurrency: int = 200
    coalesce_ms: float = 50.0
    coalesce_chars: int = 256
    max_attempts: int = 4
    retry_base_s: float = 1.0
    retry_max_s: float = 60.0
    stall_timeout_s: float = 60.0
    task_timeout_s: float = 1800.0
    visibility_timeout_s: int = 7200
    lease_ttl_s: float = 30.0
    fetch_timeout_s: float = 20.0
    max_image_bytes: int = 10 * 1024 * 1024
    # flow control (contracts/flow.py): per model family, per tenant
    model_limits: dict[str, ModelLimit] = field(default_factory=lambda: dict(DEFAULT_MODEL_LIMITS),
                                                  compare=False)
    tenant_limits: dict[str, TenantLimit] = field(default_factory=dict, compare=False)
    # The model limiter: QVQ_FLOW_CONTROL=1/0; unset, it is on for the real service (DASHSCOPE_API_KEY) or
    # when QVQ_MODEL_LIMITS is set, and off against the emulator (which has no limit unless told).
    flow_control: bool = False
    flow_margin_ms: int = 150  # added to the limiter's 1 s and 60 s windows: jitter between our grant and the service
    extra: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def celery_broker_url(self) -> str:
        return self.broker_url or self.redis_url

    @property
    def uses_real_service(self) -> bool:
        return bool(self.dashscope_api_key)

    def with_overrides(self, **changes: Any) -> Settings:
        return replace(self, **changes)

    def __repr__(self) -> str:
        shown = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in SECRET_FIELDS and value:
                value = "***"
            if f.name != "extra":
                shown.append(f"{f.name}={value!r}")
        return f"Settings({', '.join(shown)})"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, (var, parse) in _ENV.items():
            raw = env.get(var)
            if raw is None or raw == "":
                continue
            try:
                values[name] = parse(raw)
            except ValueError as exc:
                raise ConfigError(f"{var}={raw!r}: {exc}") from exc
        if "flow_control" not in values:
            values["flow_control"] = bool(values.get("dashscope_api_key")) or "model_limits" in values
        settings = cls(**values)
        _check(settings)
        return settings


def _bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError("expected a boolean (1/0, true/false)")


def _list(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def _positive_float(raw: str) -> float:
    value = float(raw)
    if value <= 0:
        raise ValueError("must be positive")
    return value


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value <= 0:
        raise ValueError("must be positive")
    return value


_ENV: dict[str, tuple[str, Any]] = {
    "redis_url": ("REDIS_URL", str),
    "broker_url": ("CELERY_BROKER_URL", str),
    "database_url": ("DATABASE_URL", str),
    "dashscope_api_key": ("DASHSCOPE_API_KEY", str),
    "base_url": ("QVQ_BASE_URL", str),
    "model": ("QVQ_MODEL", str),
    "s3_endpoint_url": ("S3_ENDPOINT_URL", str),
    "oss_endpoint_url": ("OSS_ENDPOINT_URL", str),
    "oss_access_key_id": ("OSS_ACCESS_KEY_ID", str),
    "oss_access_key_secret": ("OSS_ACCESS_KEY_SECRET", str),
    "oss_region": ("OSS_REGION", str),
    "allow_local_files": ("QVQ_ALLOW_LOCAL_FILES", _bool),
    "allow_private_urls": ("QVQ_ALLOW_PRIVATE_URLS", _bool),
    "allowed_buckets": ("QVQ_ALLOWED_BUCKETS", _list),
    "image_delivery": ("QVQ_IMAGE_DELIVERY", str),
    "event_ttl_s": ("QVQ_EVENT_TTL_S", _positive_int),
    "webhook_secret": ("QVQ_WEBHOOK_SECRET", str),
    "api_keys": ("QVQ_API_KEYS", _list),
    "api_insecure": ("QVQ_API_INSECURE", _bool),
    "max_request_bytes": ("QVQ_MAX_REQUEST_BYTES", _positive_int),
    "upload_url": ("QVQ_UPLOAD_URL", str),
    "upload_ttl_s": ("QVQ_UPLOAD_TTL_S", _positive_int),
    "cors_origins": ("QVQ_CORS_ORIGINS", _list),
    "log_format": ("LOG_FORMAT", str),
    "log_level": ("LOG_LEVEL", str),
    "worker_concurrency": ("QVQ_WORKER_CONCURRENCY", _positive_int),
    "coalesce_ms": ("QVQ_COALESCE_MS", float),
    "coalesce_chars": ("QVQ_COALESCE_CHARS", _positive_int),
    "max_attempts": ("QVQ_MAX_ATTEMPTS", _positive_int),
    "retry_base_s": ("QVQ_RETRY_BASE_S", float),
    "retry_max_s": ("QVQ_RETRY_MAX_S", _positive_float),
    "stall_timeout_s": ("QVQ_STALL_TIMEOUT_S", _positive_float),
    "task_timeout_s": ("QVQ_TASK_TIMEOUT_S", _positive_float),
    "visibility_timeout_s": ("QVQ_VISIBILITY_TIMEOUT_S", _positive_int),
    "lease_ttl_s": ("QVQ_LEASE_TTL_S", _positive_float),
    "fetch_timeout_s": ("QVQ_FETCH_TIMEOUT_S", _positive_float),
    "model_limits": ("QVQ_MODEL_LIMITS", parse_model_limits),
    "tenant_limits": ("QVQ_TENANT_LIMITS", parse_tenant_limits),
    "flow_control": ("QVQ_FLOW_CONTROL", _bool),
    "flow_margin_ms": ("QVQ_FLOW_MARGIN_MS", int),
}


def _check(settings: Settings) -> None:
    from contracts.catalog import MODELS

    if settings.model not in MODELS:
        raise ConfigError(f"QVQ_MODEL={settings.model!r}: not one of {', '.join(MODELS)}")
    if settings.image_delivery not in {"inline", "presigned"}:
        raise ConfigError(f"QVQ_IMAGE_DELIVERY={settings.image_delivery!r}: expected inline or presigned")
    if settings.log_format not in {"json", "console"}:
        raise ConfigError(f"LOG_FORMAT={settings.log_format!r}: expected json or console")
    if not 0 <= settings.flow_margin_ms <= 5000:
        raise ConfigError(f"QVQ_FLOW_MARGIN_MS={settings.flow_margin_ms}: expected 0 to 5000")
    if settings.coalesce_ms < 0:
        raise ConfigError("QVQ_COALESCE_MS must be >= 0")
    from contracts.tenants import KeyRing

    KeyRing.parse(settings.api_keys)  # a malformed entry fails at start, without showing the key
    if settings.upload_url.startswith(("oss://", "http://", "https://", "file://")):
        raise ConfigError(f"QVQ_UPLOAD_URL={settings.upload_url!r}: expected s3://bucket/prefix or a directory")
    if settings.visibility_timeout_s <= settings.task_timeout_s:
        raise ConfigError(
            f"QVQ_VISIBILITY_TIMEOUT_S ({settings.visibility_timeout_s}) must exceed QVQ_TASK_TIMEOUT_S "
            f"({settings.task_timeout_s:g}), or a running task is delivered a second time"
        )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once."""
    return Settings.from_env()


def reset_settings() -> None:
    get_settings.cache_clear()
