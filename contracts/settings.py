"""The one settings object, read from the environment once (names and defaults from the README's
settings table). Each setting is declared once, as a field whose metadata names its variable and its
parser; `from_env` reads exactly those.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from functools import lru_cache
from typing import Any

from contracts import backoff
from contracts.catalog import MODELS
from contracts.errors import ConfigError
from contracts.flow import (
    DEFAULT_MODEL_LIMITS,
    ModelLimit,
    TenantLimit,
    parse_model_limits,
    parse_tenant_limits,
)
from contracts.image_formats import MAX_IMAGE_BYTES
from contracts.job import QUEUE
from contracts.redis_url import check_broker_url, check_redis_url
from contracts.tenants import SAFE_ID_RULE, KeyRing, is_safe_id
from contracts.triggers import TriggerRule, parse_triggers

DASHSCOPE_BASE_URL = "https://dashscope.aliyuncs.com/compatible-mode/v1"
Parse = Callable[[str], Any]


def setting(var: str, default: Any = None, parse: Parse = str, *, secret: bool = False,
            factory: Callable[[], Any] | None = None) -> Any:
    """A settings field read from the environment variable `var` with `parse` (ValueError: a bad value)."""
    meta = {"env": var, "parse": parse, "secret": secret}
    if factory is not None:
        return field(default_factory=factory, compare=False, metadata=meta)
    return field(default=default, metadata=meta)


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


def _port(raw: str) -> int:
    value = int(raw)
    if not 0 <= value <= 65535:
        raise ValueError("expected a port number (0 turns it off)")
    return value


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value <= 0:
        raise ValueError("must be positive")
    return value


#: PostgreSQL URLs as other tools write them, mapped to the driver this project installs (psycopg 3).
_POSTGRES_SCHEMES = ("postgres://", "postgresql://")


def _database_url(raw: str) -> str:
    for scheme in _POSTGRES_SCHEMES:
        if raw.startswith(scheme):
            return "postgresql+psycopg://" + raw[len(scheme):]
    if "://" not in raw:
        raise ValueError("expected an SQLAlchemy URL such as sqlite:///qvq.db or postgresql://user@host/db")
    return raw


def _queue_name(raw: str) -> str:
    name = raw.strip()
    if not name or any(ch.isspace() for ch in name):
        raise ValueError("expected a queue name without spaces")
    return name


@dataclass(frozen=True)
class Settings:
    # one server, or a master behind Sentinel (contracts/redis_url.py lists the forms)
    redis_url: str = setting("REDIS_URL", "redis://localhost:6379/0", check_redis_url)
    broker_url: str = setting("CELERY_BROKER_URL", "", check_broker_url)  # empty means REDIS_URL
    database_url: str = setting("DATABASE_URL", "sqlite:///qvq.db", _database_url)
    dashscope_api_key: str = setting("DASHSCOPE_API_KEY", "", secret=True)
    base_url: str = setting("QVQ_BASE_URL", DASHSCOPE_BASE_URL)
    model: str = setting("QVQ_MODEL", "qvq-max")
    s3_endpoint_url: str = setting("S3_ENDPOINT_URL", "")
    oss_endpoint_url: str = setting("OSS_ENDPOINT_URL", "")
    oss_access_key_id: str = setting("OSS_ACCESS_KEY_ID", "")
    oss_access_key_secret: str = setting("OSS_ACCESS_KEY_SECRET", "", secret=True)
    oss_region: str = setting("OSS_REGION", "")
    allow_local_files: bool = setting("QVQ_ALLOW_LOCAL_FILES", False, _bool)
    allow_private_urls: bool = setting("QVQ_ALLOW_PRIVATE_URLS", False, _bool)
    allowed_buckets: tuple[str, ...] = setting("QVQ_ALLOWED_BUCKETS", (), _list)
    image_delivery: str = setting("QVQ_IMAGE_DELIVERY", "inline")
    event_ttl_s: int = setting("QVQ_EVENT_TTL_S", 86_400, _positive_int)
    result_cache: bool = setting("QVQ_RESULT_CACHE", False, _bool)  # every job as if it asked "cache": true
    result_cache_ttl_s: int = setting("QVQ_RESULT_CACHE_TTL_S", 86_400, _positive_int)
    webhook_secret: str = setting("QVQ_WEBHOOK_SECRET", "", secret=True)
    webhook_secrets: tuple[str, ...] = setting("QVQ_WEBHOOK_SECRETS", (), _list, secret=True)  # tenant:secret
    api_keys: tuple[str, ...] = setting("QVQ_API_KEYS", (), _list, secret=True)
    api_insecure: bool = setting("QVQ_API_INSECURE", False, _bool)
    max_request_bytes: int = setting("QVQ_MAX_REQUEST_BYTES", 1024 * 1024, _positive_int)
    max_notification_records: int = setting("QVQ_MAX_NOTIFICATION_RECORDS", 1000, _positive_int)
    upload_url: str = setting("QVQ_UPLOAD_URL", "")  # s3://bucket/prefix or a directory; empty: <tmp>/qvq-uploads
    upload_ttl_s: int = setting("QVQ_UPLOAD_TTL_S", 86_400, _positive_int)
    cors_origins: tuple[str, ...] = setting("QVQ_CORS_ORIGINS", (), _list)
    log_format: str = setting("LOG_FORMAT", "console")
    log_level: str = setting("LOG_LEVEL", "INFO")
    worker_concurrency: int = setting("QVQ_WORKER_CONCURRENCY", 200, _positive_int)
    coalesce_ms: float = setting("QVQ_COALESCE_MS", 50.0, float)
    coalesce_chars: int = setting("QVQ_COALESCE_CHARS", 256, _positive_int)
    max_attempts: int = setting("QVQ_MAX_ATTEMPTS", 4, _positive_int)
    retry_base_s: float = setting("QVQ_RETRY_BASE_S", backoff.MODEL.base_s, float)
    retry_max_s: float = setting("QVQ_RETRY_MAX_S", backoff.MODEL.max_s, _positive_float)
    stall_timeout_s: float = setting("QVQ_STALL_TIMEOUT_S", 60.0, _positive_float)
    task_timeout_s: float = setting("QVQ_TASK_TIMEOUT_S", 1800.0, _positive_float)
    visibility_timeout_s: int = setting("QVQ_VISIBILITY_TIMEOUT_S", 7200, _positive_int)
    lease_ttl_s: float = setting("QVQ_LEASE_TTL_S", 30.0, _positive_float)
    fetch_timeout_s: float = setting("QVQ_FETCH_TIMEOUT_S", 20.0, _positive_float)  # one image fetch, in total
    connect_timeout_s: float = setting("QVQ_CONNECT_TIMEOUT_S", 30.0, _positive_float)  # model call, to its headers
    callback_timeout_s: float = setting("QVQ_CALLBACK_TIMEOUT_S", 10.0, _positive_float)  # one callback POST, in total
    max_image_bytes: int = MAX_IMAGE_BYTES  # the vendor's limit: not a setting
    queue: str = setting("QVQ_QUEUE", QUEUE, _queue_name)  # the Celery queue producers send to and workers consume
    metrics_port: int = setting("QVQ_METRICS_PORT", 9808, _port)  # a worker's Prometheus endpoint; 0: off
    # Tracing (contracts/tracing.py) is on when one of these names an exporter; the SDK reads every OTEL_*
    otel_endpoint: str = setting("OTEL_EXPORTER_OTLP_ENDPOINT", "")
    otel_traces_endpoint: str = setting("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "")
    otel_traces_exporter: str = setting("OTEL_TRACES_EXPORTER", "")
    otel_sdk_disabled: bool = setting("OTEL_SDK_DISABLED", False, _bool)
    # The API's metrics on a port of their own (not the API's: its Service stays free of them); 0: GET /metrics
    api_metrics_port: int = setting("QVQ_API_METRICS_PORT", 0, _port)
    heartbeat_file: str = setting("QVQ_HEARTBEAT_FILE", "")  # touched every few seconds by a consuming worker
    sweep_interval_s: float = setting("QVQ_SWEEP_INTERVAL_S", 10.0, _positive_float)  # the recovery sweep's round
    requeue_grace_s: float = setting("QVQ_REQUEUE_GRACE_S", 60.0, _positive_float)  # before a queued task is looked for
    shutdown_grace_s: float = setting("QVQ_SHUTDOWN_GRACE_S", 25.0, float)  # on SIGTERM, before streams are handed back
    db_timeout_s: float = setting("QVQ_DB_TIMEOUT_S", 15.0, _positive_float)  # every statement, and the client's guard
    decode_memory_mb: int = setting("QVQ_DECODE_MEMORY_MB", 1024, _positive_int)  # decoded pixels held at once
    triggers: str = setting("QVQ_TRIGGERS", "")  # inline JSON or @/path/to/file.json (contracts/triggers.py)
    callback_max_age_s: float = setting("QVQ_CALLBACK_MAX_AGE_S", 86_400.0, _positive_float)
    callback_backoff_s: float = setting("QVQ_CALLBACK_BACKOFF_S", backoff.CALLBACK_DELIVERY.base_s, _positive_float)
    callback_backoff_max_s: float = setting("QVQ_CALLBACK_BACKOFF_MAX_S", backoff.CALLBACK_DELIVERY.max_s,
                                            _positive_float)
    api_url: str = setting("QVQ_API_URL", "")  # clients talk HTTP to this API instead of Redis and the database
    api_key: str = setting("QVQ_API_KEY", "", secret=True)
    model_limits: dict[str, ModelLimit] = setting("QVQ_MODEL_LIMITS", parse=parse_model_limits,
                                                  factory=lambda: dict(DEFAULT_MODEL_LIMITS))
    tenant_limits: dict[str, TenantLimit] = setting("QVQ_TENANT_LIMITS", parse=parse_tenant_limits, factory=dict)
    # The model limiter: QVQ_FLOW_CONTROL=1/0; unset, it is on for the real service (DASHSCOPE_API_KEY) or
    # when QVQ_MODEL_LIMITS is set, and off against the emulator (which has no limit unless told).
    flow_control: bool = setting("QVQ_FLOW_CONTROL", False, _bool)
    flow_margin_ms: int = setting("QVQ_FLOW_MARGIN_MS", 150, int)  # widens the limiter's windows: clock jitter

    @property
    def celery_broker_url(self) -> str:
        return self.broker_url or self.redis_url

    @property
    def uses_real_service(self) -> bool:
        return bool(self.dashscope_api_key)

    @property
    def trigger_rules(self) -> tuple[TriggerRule, ...]:
        return parse_triggers(self.triggers)

    @property
    def tenant_webhook_secrets(self) -> dict[str, str]:
        """QVQ_WEBHOOK_SECRETS as {tenant: secret}; QVQ_WEBHOOK_SECRET stays the admin-level one."""
        return dict(entry.split(":", 1) for entry in self.webhook_secrets)

    def with_overrides(self, **changes: Any) -> Settings:
        return replace(self, **changes)

    def __repr__(self) -> str:
        shown = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("secret") and value:
                value = "***"
            shown.append(f"{f.name}={value!r}")
        return f"Settings({', '.join(shown)})"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            if "env" not in f.metadata:
                continue
            var, parse, name = f.metadata["env"], f.metadata["parse"], f.name
            raw = env.get(var)
            if raw is None or raw == "":
                continue
            try:
                values[name] = parse(raw)
            except ValueError as exc:  # the setting is named, never its value (it may be a secret)
                raise ConfigError(f"{var}: {_reason(exc)}") from None
        if "flow_control" not in values:
            values["flow_control"] = bool(values.get("dashscope_api_key")) or "model_limits" in values
        settings = cls(**values)
        _check(settings)
        return settings


def _reason(exc: ValueError) -> str:
    """Why a value was refused, without the value: Python's own int()/float() messages quote it."""
    text = str(exc)
    if text.startswith("invalid literal for int()"):
        return "expected a whole number"
    if text.startswith("could not convert string to float"):
        return "expected a number"
    return text


def _check(settings: Settings) -> None:
    if settings.model not in MODELS:
        raise ConfigError(f"QVQ_MODEL: not one of {', '.join(MODELS)}")
    if settings.image_delivery not in {"inline", "presigned"}:
        raise ConfigError("QVQ_IMAGE_DELIVERY: expected inline or presigned")
    if settings.log_format not in {"json", "console"}:
        raise ConfigError("LOG_FORMAT: expected json or console")
    if not 0 <= settings.flow_margin_ms <= 5000:
        raise ConfigError("QVQ_FLOW_MARGIN_MS: expected 0 to 5000")
    if settings.coalesce_ms < 0:
        raise ConfigError("QVQ_COALESCE_MS must be >= 0")
    KeyRing.parse(settings.api_keys)  # a malformed entry fails at start, without showing the key
    if settings.upload_url.startswith(("oss://", "http://", "https://", "file://")):
        raise ConfigError("QVQ_UPLOAD_URL: expected s3://bucket/prefix or a directory")
    parse_triggers(settings.triggers)  # a malformed rule fails at start, naming the rule and field
    _check_webhook_secrets(settings.webhook_secrets)
    if settings.api_url and not settings.api_url.startswith(("http://", "https://")):
        raise ConfigError("QVQ_API_URL: expected http(s)://host[:port]")
    if settings.visibility_timeout_s <= settings.task_timeout_s:
        raise ConfigError(
            f"QVQ_VISIBILITY_TIMEOUT_S ({settings.visibility_timeout_s}) must exceed QVQ_TASK_TIMEOUT_S "
            f"({settings.task_timeout_s:g}), or a running task is delivered a second time"
        )


def _check_webhook_secrets(entries: tuple[str, ...]) -> None:
    seen: set[str] = set()
    for index, entry in enumerate(entries, start=1):
        tenant, sep, secret = entry.partition(":")
        where = f"QVQ_WEBHOOK_SECRETS entry {index}"
        if not sep or not is_safe_id(tenant):
            raise ConfigError(f"{where}: expected tenant:secret, the tenant being {SAFE_ID_RULE}")
        if len(secret) < 16:
            raise ConfigError(f"{where}: the secret must be at least 16 characters")
        if tenant in seen:
            raise ConfigError(f"{where}: tenant {tenant!r} is listed twice")
        seen.add(tenant)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once."""
    return Settings.from_env()


def reset_settings() -> None:
    get_settings.cache_clear()
