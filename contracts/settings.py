"""The one settings object, read from the environment once (names and defaults from design.md)."""

from __future__ import annotations

import os
import re
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
from contracts.image_formats import MAX_IMAGE_BYTES
from contracts.job import QUEUE
from contracts.triggers import TriggerRule, parse_triggers

DASHSCOPE_BASE_URL = "https://dashscope.aliyuncs.com/compatible-mode/v1"
SECRET_FIELDS = {"dashscope_api_key", "oss_access_key_secret", "webhook_secret", "api_keys", "webhook_secrets",
                 "api_key"}


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
    max_image_bytes: int = MAX_IMAGE_BYTES
    queue: str = QUEUE  # the Celery queue producers send to and workers consume
    metrics_port: int = 9808  # a worker's Prometheus endpoint; 0 turns it off
    heartbeat_file: str = ""  # touched every few seconds by a consuming worker (exec liveness probes)
    sweep_interval_s: float = 10.0  # how often one worker looks for orphaned tasks (worker/sweep.py)
    requeue_grace_s: float = 60.0  # a queued task is looked for in the broker only after this long
    shutdown_grace_s: float = 25.0  # on SIGTERM, running streams get this long before they are handed back
    db_timeout_s: float = 15.0  # every database statement (server-side), and the client's own guard
    decode_memory_mb: int = 1024  # decoded pixels held at once by one worker process
    triggers: str = ""  # QVQ_TRIGGERS: inline JSON or @/path/to/file.json (contracts/triggers.py)
    webhook_secrets: tuple[str, ...] = ()  # QVQ_WEBHOOK_SECRETS: tenant:secret entries
    callback_max_age_s: float = 86_400.0  # a callback is retried for this long, then marked failed
    callback_backoff_s: float = 5.0  # the first wait between callback tries; doubles each try
    callback_backoff_max_s: float = 3_600.0
    api_url: str = ""  # QVQ_API_URL: clients talk HTTP to this API instead of Redis and the database
    api_key: str = ""
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

    @property
    def trigger_rules(self) -> tuple[TriggerRule, ...]:
        return parse_triggers(self.triggers)

    @property
    def tenant_webhook_secrets(self) -> dict[str, str]:
        """QVQ_WEBHOOK_SECRETS as {tenant: secret}; QVQ_WEBHOOK_SECRET stays the admin-level one."""
        return dict(entry.split(":", 1) for entry in self.webhook_secrets)  # type: ignore[misc]

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
                raise ConfigError(f"{var}={_masked(raw)!r}: {exc}") from exc
        if "flow_control" not in values:
            values["flow_control"] = bool(values.get("dashscope_api_key")) or "model_limits" in values
        settings = cls(**values)
        _check(settings)
        return settings


def _masked(raw: str) -> str:
    """A value as an error message may show it: the password of a URL replaced by ***."""
    return _URL_PASSWORD.sub(":***@", raw)


_URL_PASSWORD = re.compile(r":[^:@\s/]*@")


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


_ENV: dict[str, tuple[str, Any]] = {
    "redis_url": ("REDIS_URL", str),
    "broker_url": ("CELERY_BROKER_URL", str),
    "database_url": ("DATABASE_URL", _database_url),
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
    "metrics_port": ("QVQ_METRICS_PORT", _port),
    "heartbeat_file": ("QVQ_HEARTBEAT_FILE", str),
    "queue": ("QVQ_QUEUE", _queue_name),
    "sweep_interval_s": ("QVQ_SWEEP_INTERVAL_S", _positive_float),
    "requeue_grace_s": ("QVQ_REQUEUE_GRACE_S", _positive_float),
    "shutdown_grace_s": ("QVQ_SHUTDOWN_GRACE_S", float),
    "db_timeout_s": ("QVQ_DB_TIMEOUT_S", _positive_float),
    "decode_memory_mb": ("QVQ_DECODE_MEMORY_MB", _positive_int),
    "triggers": ("QVQ_TRIGGERS", str),
    "webhook_secrets": ("QVQ_WEBHOOK_SECRETS", _list),
    "callback_max_age_s": ("QVQ_CALLBACK_MAX_AGE_S", _positive_float),
    "callback_backoff_s": ("QVQ_CALLBACK_BACKOFF_S", _positive_float),
    "callback_backoff_max_s": ("QVQ_CALLBACK_BACKOFF_MAX_S", _positive_float),
    "api_url": ("QVQ_API_URL", str),
    "api_key": ("QVQ_API_KEY", str),
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
    parse_triggers(settings.triggers)  # a malformed rule fails at start, naming the rule and field
    _check_webhook_secrets(settings.webhook_secrets)
    if settings.api_url and not settings.api_url.startswith(("http://", "https://")):
        raise ConfigError(f"QVQ_API_URL={settings.api_url!r}: expected http(s)://host[:port]")
    if settings.visibility_timeout_s <= settings.task_timeout_s:
        raise ConfigError(
            f"QVQ_VISIBILITY_TIMEOUT_S ({settings.visibility_timeout_s}) must exceed QVQ_TASK_TIMEOUT_S "
            f"({settings.task_timeout_s:g}), or a running task is delivered a second time"
        )


def _check_webhook_secrets(entries: tuple[str, ...]) -> None:
    from contracts.tenants import SAFE_ID_RULE, is_safe_id

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
