"""Per-request settings written in the prompt: `[[emulator: tps=50 reasoning_tokens=500 fault=429@1]]`.

Keys: the EmulatorConfig fields except stamp_chunks (tps, first_token_s, reasoning_tokens,
answer_tokens, retry_after_s, no_usage) and `fault` (a plan, see faults.py). Directives are removed from the
prompt the emulator echoes; an unknown key or bad value is a 400, so typos do not pass silently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from emulator import errors
from emulator.config import EmulatorConfig
from emulator.faults import Fault, parse_plan

_DIRECTIVE = re.compile(r"[ \t]*\[\[\s*emulator\s*:(?P<body>.*?)\]\][ \t]*", re.IGNORECASE | re.DOTALL)
REQUEST_KEYS = ("tps", "first_token_s", "reasoning_tokens", "answer_tokens", "retry_after_s", "no_usage")


@dataclass(frozen=True)
class Directives:
    settings: dict[str, str]
    faults: tuple[Fault, ...]

    def apply(self, config: EmulatorConfig) -> EmulatorConfig:
        try:
            return config.with_values(self.settings) if self.settings else config
        except ValueError as exc:
            raise errors.invalid_parameter(f"emulator directive: {exc}") from exc


def strip_directives(text: str) -> str:
    return _DIRECTIVE.sub(" ", text).strip()


def parse_directives(text: str) -> Directives:
    settings: dict[str, str] = {}
    faults: list[Fault] = []
    for match in _DIRECTIVE.finditer(text):
        for pair in match["body"].split():
            key, sep, value = pair.partition("=")
            key = key.strip().lower()
            if not sep or (key not in REQUEST_KEYS and key != "fault"):
                raise errors.invalid_parameter(
                    f"emulator directive: expected key=value with key in {', '.join(REQUEST_KEYS)}, fault; "
                    f"got {pair!r}"
                )
            if key == "fault":
                try:
                    faults.extend(parse_plan(value))
                except ValueError as exc:
                    raise errors.invalid_parameter(f"emulator directive: {exc}") from exc
            else:
                settings[key] = value
    return Directives(settings, tuple(faults))
