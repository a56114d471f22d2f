"""Trigger rules: which stored objects become tasks, and with what question (README, "Webhook-triggered
analysis").

`QVQ_TRIGGERS` is a JSON list, inline or `@/path/to/file.json`, of rules; the first rule that matches an
object wins:

    [{"bucket": "photos", "prefix": "incoming/", "suffix": ".jpg", "prompt": "What is in this picture?",
      "model": "qvq-plus", "tenant": "acme", "high_resolution": false, "callback_url": "https://..."}]

A malformed list fails at start with one line naming the rule (1-based) and the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from contracts.catalog import MODELS
from contracts.errors import ConfigError
from contracts.tenants import SAFE_ID_RULE, is_safe_id

_TEXT_FIELDS = ("bucket", "prefix", "suffix", "prompt", "model", "tenant", "callback_url")
_FIELDS = {*_TEXT_FIELDS, "high_resolution"}
_REQUIRED = ("bucket", "prompt")


@dataclass(frozen=True)
class TriggerRule:
    bucket: str
    prompt: str
    prefix: str = ""
    suffix: str = ""
    model: str | None = None
    tenant: str | None = None
    high_resolution: bool = False
    callback_url: str | None = None

    def matches(self, bucket: str, key: str) -> bool:
        return bucket == self.bucket and key.startswith(self.prefix) and key.endswith(self.suffix)

    def job_fields(self) -> dict[str, Any]:
        """The job request fields this rule sets (the images and the tenant are added by the caller)."""
        fields: dict[str, Any] = {"prompt": self.prompt}
        if self.model:
            fields["model"] = self.model
        if self.high_resolution:
            fields["high_resolution"] = True
        if self.callback_url:
            fields["callback_url"] = self.callback_url
        return fields


def first_match(rules: tuple[TriggerRule, ...], bucket: str, key: str) -> TriggerRule | None:
    return next((rule for rule in rules if rule.matches(bucket, key)), None)


@lru_cache(maxsize=8)
def parse_triggers(raw: str) -> tuple[TriggerRule, ...]:
    """The rules of a QVQ_TRIGGERS value (inline JSON or @file); ConfigError naming what is wrong."""
    if not raw.strip():
        return ()
    text = _read(raw.strip())
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"QVQ_TRIGGERS: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if not isinstance(value, list):
        raise ConfigError("QVQ_TRIGGERS: expected a JSON list of rules")
    return tuple(_rule(item, index) for index, item in enumerate(value, start=1))


def _read(raw: str) -> str:
    if not raw.startswith("@"):
        return raw
    path = Path(raw[1:]).expanduser()
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"QVQ_TRIGGERS: cannot read {path}: {exc.strerror or type(exc).__name__}") from None


def _rule(item: Any, index: int) -> TriggerRule:
    where = f"QVQ_TRIGGERS rule {index}"
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: expected an object with bucket and prompt")
    unknown = sorted(set(item) - _FIELDS)
    if unknown:
        raise ConfigError(f"{where}: unknown field {unknown[0]!r} (expected {', '.join(sorted(_FIELDS))})")
    for name in _REQUIRED:
        if name not in item:
            raise ConfigError(f"{where}: field {name!r} is required")
    for name in _TEXT_FIELDS:
        if name in item and not isinstance(item[name], str):
            raise ConfigError(f"{where}: field {name!r} must be a string")
    for name in _REQUIRED:
        if not item[name].strip():
            raise ConfigError(f"{where}: field {name!r} must not be empty")
    _check_values(item, where)
    return TriggerRule(**item)


def _check_values(item: dict[str, Any], where: str) -> None:
    if "high_resolution" in item and not isinstance(item["high_resolution"], bool):
        raise ConfigError(f"{where}: field 'high_resolution' must be true or false")
    if item.get("model") is not None and item["model"] not in MODELS:
        raise ConfigError(f"{where}: field 'model': {item['model']!r} is not one of {', '.join(MODELS)}")
    if item.get("tenant") is not None and not is_safe_id(item["tenant"]):
        raise ConfigError(f"{where}: field 'tenant' must be {SAFE_ID_RULE}")
    if item.get("callback_url") is not None and not item["callback_url"].startswith(("https://", "http://")):
        raise ConfigError(f"{where}: field 'callback_url' must be an http(s) URL")
