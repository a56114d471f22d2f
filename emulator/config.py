"""The emulator's settings: speed, length and Retry-After, global defaults that a request may override."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

ENV_PREFIX = "QVQ_EMULATOR_"


@dataclass(frozen=True)
class EmulatorConfig:
    tps: float = 0.0  # tokens (chunks) per second; 0 streams as fast as possible
    first_token_s: float = 0.0  # delay before the first chunk
    reasoning_tokens: int = 40  # the thinking has at least this many chunks
    answer_tokens: int = 20  # the answer has at least this many chunks
    retry_after_s: float = 1.0  # the Retry-After header of an injected 429
    stamp_chunks: bool = False  # adds a non-standard "x_sent_at" (unix seconds) to every chunk
    no_usage: bool = False  # never sends the usage chunk, as servers that ignore include_usage do
    rpm: int = 0  # the service's rate limit, requests per minute (and ceil(rpm/60) per second); 0: none
    tpm: int = 0  # tokens per minute (and ceil(tpm/60) per second); 0: none

    def __post_init__(self) -> None:
        if self.tps < 0 or self.first_token_s < 0 or self.retry_after_s < 0:
            raise ValueError("tps, first_token_s and retry_after_s must not be negative")
        if self.rpm < 0 or self.tpm < 0:
            raise ValueError("rpm and tpm must not be negative (0: no rate limit)")
        if self.reasoning_tokens < 1 or self.answer_tokens < 1:
            raise ValueError("reasoning_tokens and answer_tokens must be at least 1")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> EmulatorConfig:
        """QVQ_EMULATOR_TPS, _FIRST_TOKEN_S, _REASONING_TOKENS, _ANSWER_TOKENS, _RETRY_AFTER_S,
        _STAMP_CHUNKS, _NO_USAGE, _RPM, _TPM; keyword overrides (e.g. CLI flags; None means unset) win over the environment."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name in field_names():
            raw = environ.get(ENV_PREFIX + name.upper())
            if raw is not None and raw != "":
                values[name] = raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls().with_values(values)

    def with_values(self, values: Mapping[str, Any]) -> EmulatorConfig:
        """A copy with some fields replaced; values may be strings (from env or a directive)."""
        unknown = set(values) - set(field_names())
        if unknown:
            raise ValueError(f"unknown emulator setting(s): {', '.join(sorted(unknown))}")
        return replace(self, **{name: _coerce(name, value) for name, value in values.items()})


def field_names() -> tuple[str, ...]:
    return tuple(f.name for f in fields(EmulatorConfig))


def _coerce(name: str, value: Any) -> Any:
    kind = type(getattr(EmulatorConfig, name))
    try:
        if kind is bool and isinstance(value, str):
            lowered = value.strip().lower()
            if lowered not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError(value)
            return lowered in ("1", "true", "yes", "on")
        return kind(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"bad value for emulator setting {name}: {value!r}") from exc
