"""The API's JSON answers: JSON that can always be written, whatever text a stored row holds.

Intake refuses NUL and lone surrogates (contracts/text.py), but a row stored before that check, or text
a model produced, may still hold a lone surrogate, which UTF-8 cannot encode: Starlette's JSONResponse
would answer 500 for that row for ever. Here such a character is written as U+FFFD instead.
"""

from __future__ import annotations

import json
import re
from typing import Any

from fastapi.responses import JSONResponse as StarletteJSONResponse

_SURROGATE = re.compile("[\ud800-\udfff]")


class JSONResponse(StarletteJSONResponse):
    def render(self, content: Any) -> bytes:
        text = json.dumps(content, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":"))
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError:
            return _SURROGATE.sub("\ufffd", text).encode("utf-8")
