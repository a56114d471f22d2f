"""Server-sent events (the HTML standard's event-stream format), both ways: `EventStreamDecoder` reads a
stream from bytes (the model's stream in the worker, the API's event stream in the HTTP clients) and
`format_sse` writes one of our events as the API sends it.

Lines are split from bytes, as the standard says (CR, LF or CRLF only), so text holding U+2028, U+0085
and the like reaches the JSON decoder whole. (httpx's `iter_lines`, and httpx-sse 0.4 which uses it,
split on every Unicode line break: a follower reading lines would die on such text.)
"""

from __future__ import annotations

import json
import re
from typing import Any


class EventStreamDecoder:
    """The event-stream format of the HTML standard ("Server-sent events", parsing), fed raw bytes.

    Lines end at CR, LF or CRLF only: never at U+2028, U+0085 or the other breaks that `str.splitlines`
    (and so httpx's `iter_lines`) also splits on, which the model's text may hold. A CRLF split across
    two reads is one line end. `feed` returns the data of every event completed by these bytes; the
    `event` and `id` fields are not used by the model's stream and are ignored, an event with no data
    is not dispatched, and an event the stream ends in the middle of is dropped.
    """

    _LINE_END = re.compile(rb"\r\n|\r|\n")

    def __init__(self) -> None:
        self._pending = b""
        self._skip_lf = False  # the previous read ended with CR: a LF starting this one belongs to it
        self._started = False
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        if self._skip_lf and chunk[:1] == b"\n":
            chunk = chunk[1:]
        self._skip_lf = chunk.endswith(b"\r")
        lines = self._LINE_END.split(self._pending + chunk)
        self._pending = lines.pop()
        out: list[str] = []
        for raw in lines:
            payload = self._line(raw.decode("utf-8", errors="replace"))
            if payload is not None:
                out.append(payload)
        return out

    def _line(self, line: str) -> str | None:
        if not self._started:
            self._started = True
            line = line.removeprefix("\ufeff")  # one byte order mark may open the stream
        if not line:
            data, self._data = self._data, []
            return "\n".join(data) if data else None
        if line.startswith(":"):
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        return None


def format_sse(event: dict[str, Any]) -> str:
    """One event as an SSE frame: `id: <seq>`, `event: <type>`, `data: <the event JSON>` (one line:
    JSON escapes every line break a text may hold)."""
    data = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
    return f"id: {event['seq']}\nevent: {event['type']}\ndata: {data}\n\n"
