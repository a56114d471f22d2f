"""Signed callbacks over real HTTP."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from contracts.webhook import SIGNATURE_HEADER, sign, verify
from worker.callback import deliver

EVENT = {"task_id": "t1", "seq": 9, "type": "task.completed", "answer": "42"}


class Receiver(http.server.ThreadingHTTPServer):
    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.received: list[tuple[dict[str, str], bytes]] = []
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.received.append((dict(self.headers), body))
        status = self.server.statuses.pop(0) if self.server.statuses else 200
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture()
def receiver(request: pytest.FixtureRequest) -> Iterator[Receiver]:
    server = Receiver(list(getattr(request, "param", [])))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _url(server: Receiver) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/hook"


def test_the_terminal_event_arrives_signed(receiver: Receiver) -> None:
    assert deliver(_url(receiver), EVENT, secret="s3cret", allow_private=True)
    headers, body = receiver.received[0]
    assert verify(body, headers[SIGNATURE_HEADER], "s3cret")
    assert not verify(body, headers[SIGNATURE_HEADER], "other")
    assert headers["X-Qvq-Event"] == "task.completed" and headers["X-Qvq-Task-Id"] == "t1"


@pytest.mark.parametrize("receiver", [[500, 503]], indirect=True)
def test_a_failing_receiver_is_retried(receiver: Receiver) -> None:
    assert deliver(_url(receiver), EVENT, secret="k", allow_private=True)
    assert len(receiver.received) == 3


def test_a_loopback_callback_is_refused_unless_private_urls_are_allowed(receiver: Receiver) -> None:
    assert not deliver(_url(receiver), EVENT, secret="k", allow_private=False)
    assert receiver.received == []


def test_old_or_tampered_signatures_fail() -> None:
    body = b'{"a":1}'
    assert verify(body, sign(body, "k", timestamp=1000), "k", now=1100)
    assert not verify(body, sign(body, "k", timestamp=1000), "k", now=2000)
    assert not verify(b'{"a":2}', sign(body, "k"), "k")
    assert not verify(body, "garbage", "k")
