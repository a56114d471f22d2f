"""Helpers for the producer tests: the HTTP API on a real uvicorn server in a thread, and a minimal
SSE reader over a real socket (httpx streaming)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import uvicorn

from contracts.settings import Settings
from producer.api import create_app


class ApiServer:
    """producer.api on 127.0.0.1:<free port>, served by uvicorn in a daemon thread."""

    def __init__(self, settings: Settings, **app_kwargs: Any) -> None:
        self.app = create_app(settings, **app_kwargs)
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, log_config=None,
                                lifespan="on", timeout_graceful_shutdown=1)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]},
                                       name=f"qvq-api-{self.port}", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ApiServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the API server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self._sock.close()

    def __enter__(self) -> ApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def sse_frames(response: httpx.Response) -> Iterator[dict[str, Any]]:
    """Parse an SSE response into frames: {"id", "event", "data"} for events, {"comment"} for comments,
    {"retry"} for the reconnect delay; `data` is decoded JSON."""
    frame: dict[str, Any] = {}
    for line in response.iter_lines():
        if line == "":
            if frame:
                yield frame
            frame = {}
        elif line.startswith(":"):
            frame["comment"] = line[1:].strip()
        else:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            frame[name] = json.loads(value) if name == "data" else value
    if frame:
        yield frame


def sse_events(response: httpx.Response, limit: int | None = None) -> list[dict[str, Any]]:
    """The event frames of an SSE response (comments skipped), up to `limit` of them."""
    out: list[dict[str, Any]] = []
    for frame in sse_frames(response):
        if "data" in frame:
            out.append(frame)
            if limit is not None and len(out) >= limit:
                break
    return out
