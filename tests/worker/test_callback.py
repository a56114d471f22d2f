"""Signed callbacks over real HTTP on loopback, and the SSRF guard in front of them.

Loopback stands in for the internet: a receiver on 127.0.0.1 is "public" only when it is a trusted
endpoint of the guard (or QVQ_ALLOW_PRIVATE_URLS is on). A refused address is never connected to:
those tests answer through a resolver spy and a transport spy, never a non-loopback socket.
"""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from contracts import retry
from contracts.redaction import shown_url
from contracts.ssrf import UrlGuard, resolve_host
from contracts.webhook import SIGNATURE_HEADER, sign, verify
from worker.callbacks import post as callback
from worker.callbacks.post import Outcome, deliver, post_once

EVENT = {"task_id": "t1", "seq": 9, "type": "task.completed", "answer": "42"}
PUBLIC_V4 = "93.184.216.34"


class Receiver(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, statuses: list[int], host: str = "127.0.0.1", port: int = 0) -> None:
        self.statuses = statuses
        self.received: list[tuple[dict[str, str], bytes]] = []
        super().__init__((host, port), _Handler)


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


def serve(server: Receiver) -> Receiver:
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server


@pytest.fixture()
def receivers() -> Iterator[Callable[..., Receiver]]:
    started: list[Receiver] = []

    def start(statuses: list[int] | None = None, host: str = "127.0.0.1", port: int = 0) -> Receiver:
        started.append(serve(Receiver(list(statuses or []), host, port)))
        return started[-1]

    yield start
    for server in started:
        server.shutdown()
        server.server_close()


@pytest.fixture()
def receiver(receivers: Callable[..., Receiver], request: pytest.FixtureRequest) -> Receiver:
    return receivers(getattr(request, "param", []))


@pytest.fixture()
def waits(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    slept: list[float] = []
    monkeypatch.setattr(retry, "sleep", slept.append)
    return slept


class Spy:
    """A resolver and an HTTP transport that record what would have been looked up and connected to."""

    def __init__(self, answers: list[list[str]] | None = None, statuses: list[int] | None = None) -> None:
        self.answers = answers or [[PUBLIC_V4]]
        self.statuses = statuses or []
        self.lookups: list[tuple[str, int]] = []
        self.requests: list[httpx.Request] = []
        self.transport = httpx.MockTransport(self._send)

    def resolve(self, host: str, port: int) -> list[str]:
        self.lookups.append((host, port))
        return self.answers[min(len(self.lookups), len(self.answers)) - 1]

    def _send(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return httpx.Response(self.statuses.pop(0) if self.statuses else 200)

    def guard(self, **options: Any) -> UrlGuard:
        return UrlGuard(resolver=self.resolve, https_only=False, **options)

    def connected_to(self) -> list[str]:
        return [request.url.host for request in self.requests]


def _url(server: Receiver, host: str = "127.0.0.1") -> str:
    return f"http://{host}:{server.server_address[1]}/hook"


# -- delivery ----------------------------------------------------------------------------------------
def test_the_terminal_event_arrives_signed(receiver: Receiver) -> None:
    assert deliver(_url(receiver), EVENT, secret="s3cret", allow_private=True)
    headers, body = receiver.received[0]
    assert json.loads(body) == EVENT
    assert verify(body, headers[SIGNATURE_HEADER], "s3cret")
    assert not verify(body, headers[SIGNATURE_HEADER], "other")
    assert headers["X-Qvq-Event"] == "task.completed" and headers["X-Qvq-Task-Id"] == "t1"


def test_without_a_secret_the_event_is_sent_unsigned(receiver: Receiver) -> None:
    assert deliver(_url(receiver), EVENT, secret="", allow_private=True)
    assert SIGNATURE_HEADER not in receiver.received[0][0]


def test_a_task_id_beyond_ascii_is_delivered(receiver: Receiver) -> None:
    event = {**EVENT, "task_id": "tâche-七"}
    assert deliver(_url(receiver), event, secret="k", allow_private=True)
    headers, body = receiver.received[0]
    assert json.loads(body)["task_id"] == "tâche-七"
    assert headers["X-Qvq-Task-Id"].encode("latin-1").decode() == "tâche-七"


@pytest.mark.parametrize("receiver", [[500, 503]], indirect=True)
def test_a_failing_receiver_is_retried_by_the_callback_policy(receiver: Receiver, waits: list[float]) -> None:
    assert deliver(_url(receiver), EVENT, secret="k", allow_private=True)
    assert len(receiver.received) == 3 and waits == [0.5, 2.0]
    stamps = [headers[SIGNATURE_HEADER] for headers, _ in receiver.received]
    assert all(verify(body, stamp, "k") for (_, body), stamp in zip(receiver.received, stamps, strict=True))


@pytest.mark.parametrize("receiver", [[500, 502, 503, 200]], indirect=True)
def test_a_receiver_failing_every_try_is_given_up_after_three(receiver: Receiver, waits: list[float]) -> None:
    with capture_logs() as logs:
        assert not deliver(_url(receiver), EVENT, secret="k", allow_private=True)
    assert len(receiver.received) == 3 and waits == [0.5, 2.0]
    assert [e["status"] for e in logs if e["event"] == "callback.failed"] == [500, 502, 503]
    assert any(e["event"] == "callback.undelivered" and e["outcome"] == "retry" for e in logs)


@pytest.mark.parametrize("receiver", [[410]], indirect=True)
def test_410_gone_is_not_retried(receiver: Receiver, waits: list[float]) -> None:
    assert not deliver(_url(receiver), EVENT, secret="k", allow_private=True)
    assert len(receiver.received) == 1 and waits == []


@pytest.mark.parametrize(("statuses", "outcome"), [
    ([200], Outcome.DELIVERED), ([204], Outcome.DELIVERED), ([410], Outcome.GONE), ([500], Outcome.RETRY),
    ([429], Outcome.RETRY), ([404], Outcome.RETRY), ([302], Outcome.RETRY),
])
def test_post_once_says_what_to_do_next(statuses: list[int], outcome: Outcome) -> None:
    spy = Spy(statuses=statuses)
    assert post_once("https://hook.example/h", EVENT, secret="k", guard=spy.guard(), transport=spy.transport) == outcome
    assert len(spy.requests) == 1  # a redirect is not followed


def test_the_receivers_reply_is_read_only_so_far() -> None:
    served = [0]

    async def endless() -> AsyncIterator[bytes]:
        while True:
            served[0] += 1024
            yield b"x" * 1024

    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=endless()))
    guard = UrlGuard(resolver=lambda host, port: [PUBLIC_V4])
    assert post_once("https://hook.example/h", EVENT, secret="k", guard=guard, transport=transport) == Outcome.DELIVERED
    assert served[0] <= callback.MAX_RESPONSE_BYTES + 1024


def test_a_receiver_that_never_answers_times_out(waits: list[float]) -> None:
    with socket.socket() as silent:  # accepts connections (the backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/hook"
        with capture_logs() as logs:
            assert not deliver(url, EVENT, secret="k", allow_private=True, timeout_s=0.2)
    errors = [e["error"] for e in logs if e["event"] == "callback.failed"]
    assert errors == ["no full answer within 0.2 s"] * 3


def test_a_trickling_receiver_is_cut_off_at_the_total_deadline(waits: list[float]) -> None:
    """One byte every 0.2 s keeps every read alive: only the try's total deadline ends it."""
    stop = threading.Event()

    def trickle(conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
            while not stop.wait(0.2):
                try:
                    conn.sendall(b"x")
                except OSError:
                    return

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        threading.Thread(target=lambda: trickle(server.accept()[0]), daemon=True).start()
        guard = UrlGuard(allow_private=True, https_only=False)
        started = time.monotonic()
        try:
            outcome = post_once(f"http://127.0.0.1:{server.getsockname()[1]}/hook", EVENT, secret="k", guard=guard,
                                timeout_s=1.0)
        finally:
            stop.set()
    assert outcome == Outcome.RETRY and time.monotonic() - started < 5


def test_deliver_never_raises(waits: list[float]) -> None:
    spy = Spy()
    with capture_logs() as logs:
        assert not deliver("https://hook.example/h", {**EVENT, "answer": object()}, secret="k",
                           allow_private=False, transport=spy.transport, guard=spy.guard())
    assert [e["event"] for e in logs] == ["callback.error"] and spy.requests == []


# -- the SSRF guard ----------------------------------------------------------------------------------
def test_a_loopback_callback_is_refused_unless_private_urls_are_allowed(receiver: Receiver,
                                                                        waits: list[float]) -> None:
    with capture_logs() as logs:
        assert not deliver(_url(receiver), EVENT, secret="k", allow_private=False)
        assert not deliver(_url(receiver, "localhost"), EVENT, secret="k", allow_private=False)
    assert receiver.received == [] and waits == []
    assert [e["reason"] for e in logs if e["event"] == "callback.refused"] == ["refused", "refused"]
    assert deliver(_url(receiver), EVENT, secret="k", allow_private=True)
    assert len(receiver.received) == 1


def test_a_trusted_loopback_receiver_is_reached_and_no_other(receivers: Callable[..., Receiver],
                                                            waits: list[float]) -> None:
    public, internal = receivers(), receivers()
    guard = UrlGuard(trusted=[("127.0.0.1", public.server_address[1])], https_only=False)
    assert deliver(_url(public, "localhost"), EVENT, secret="k", allow_private=False, guard=guard)
    assert not deliver(_url(internal), EVENT, secret="k", allow_private=False, guard=guard)
    assert len(public.received) == 1 and internal.received == []


def test_dns_rebinding_cannot_move_the_post_to_another_address(receivers: Callable[..., Receiver],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # hook.example first answers 127.0.0.1 (trusted: the "public" receiver), then 127.0.0.2 (internal).
    public = receivers()
    port = public.server_address[1]
    try:
        internal = receivers(host="127.0.0.2", port=port)
    except OSError:
        pytest.skip("127.0.0.2 is not available on this machine")
    lookups: list[str] = []
    real_getaddrinfo = socket.getaddrinfo

    def rebinding(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "hook.example":
            lookups.append(host)
            host = "127.0.0.1" if len(lookups) == 1 else "127.0.0.2"
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    guard = UrlGuard(trusted=[("127.0.0.1", port)], https_only=False)
    assert deliver(f"http://hook.example:{port}/hook", EVENT, secret="k", allow_private=False, guard=guard)
    assert lookups == ["hook.example"]
    assert internal.received == []
    assert [headers["Host"] for headers, _ in public.received] == [f"hook.example:{port}"]


def test_rebinding_to_loopback_between_tries_is_refused_and_never_connected(waits: list[float]) -> None:
    spy = Spy(answers=[[PUBLIC_V4], ["127.0.0.1"]], statuses=[503])
    with capture_logs() as logs:
        assert not deliver("https://hook.example/h", EVENT, secret="k", allow_private=False,
                           transport=spy.transport, guard=spy.guard())
    assert spy.lookups == [("hook.example", 443), ("hook.example", 443)]
    assert spy.connected_to() == [PUBLIC_V4]
    request = spy.requests[0]
    assert request.headers["Host"] == "hook.example" and request.extensions["sni_hostname"] == "hook.example"
    assert [e["event"] for e in logs if e["event"].startswith("callback.")][-2:] == [
        "callback.refused", "callback.undelivered"]
    assert waits == [0.5]


@pytest.mark.parametrize("address", [
    "127.0.0.1", "10.0.0.1", "169.254.169.254", "100.64.0.1", "0.0.0.0", "::1", "fe80::1", "fec0::1",
    "fd00:ec2::254", "::ffff:127.0.0.1", "64:ff9b::a9fe:a9fe", "2002:a00:1::1", "224.0.0.1", "240.0.0.1",
])
def test_special_addresses_are_refused_and_nothing_is_connected(address: str, waits: list[float]) -> None:
    spy = Spy(answers=[[PUBLIC_V4, address]])
    assert not deliver("https://hook.example/h", EVENT, secret="k", allow_private=False,
                       transport=spy.transport, guard=spy.guard())
    assert spy.requests == [] and waits == []


@pytest.mark.parametrize("url", [
    "https://hook.example:99999/h", "https://hook.example:0/h", "https://hook.example:x/h",
    "https://user:pw@hook.example/h", "ftp://hook.example/h", "not a url", "https:///h", "",
])
def test_a_bad_callback_url_is_logged_and_nothing_is_looked_up_or_sent(url: str, waits: list[float]) -> None:
    spy = Spy()
    with capture_logs() as logs:
        assert not deliver(url, EVENT, secret="k", allow_private=True, transport=spy.transport, guard=spy.guard())
    assert spy.lookups == [] and spy.requests == [] and waits == []
    assert [e["event"] for e in logs] == ["callback.refused", "callback.undelivered"]
    assert all("pw" not in str(e) for e in logs)


def test_an_unresolvable_host_is_retried(waits: list[float]) -> None:
    def unresolvable(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    spy = Spy()
    guard = UrlGuard(resolver=unresolvable)
    assert not deliver("https://hook.example/h", EVENT, secret="k", allow_private=False, transport=spy.transport,
                       guard=guard)
    assert spy.requests == [] and waits == [0.5, 2.0]


def test_proxy_environment_variables_are_ignored(receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    proxy = _CountingListener()
    try:
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
            monkeypatch.setenv(name, proxy.url)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        with httpx.Client(trust_env=True, timeout=2) as naive, pytest.raises(httpx.HTTPError):
            naive.post(_url(receiver), content=b"{}")  # a client that reads the environment goes there
        proxy.wait_for(1)
        assert deliver(_url(receiver), EVENT, secret="k", allow_private=True)
        assert len(receiver.received) == 1 and proxy.accepted == 1
    finally:
        proxy.close()


def test_the_logged_url_keeps_no_credentials_or_query() -> None:
    assert shown_url("https://u:pw@hook.example:8443/h?token=abc#x") == "https://hook.example:8443/h?..."
    assert shown_url("https://hook.example:99999/h") == "<invalid URL>"


def test_old_or_tampered_signatures_fail() -> None:
    body = b'{"a":1}'
    assert verify(body, sign(body, "k", timestamp=1000), "k", now=1100)
    assert not verify(body, sign(body, "k", timestamp=1000), "k", now=2000)
    assert not verify(b'{"a":2}', sign(body, "k"), "k")
    assert not verify(body, "garbage", "k")


class _CountingListener:
    """A loopback socket that accepts connections, counts them and hangs up: a proxy that must stay unused."""

    def __init__(self) -> None:
        self.accepted = 0
        self._socket = socket.create_server(("127.0.0.1", 0))
        self._socket.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self._socket.accept()
            except TimeoutError:
                continue
            self.accepted += 1
            connection.close()

    def wait_for(self, count: int, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while self.accepted < count and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.accepted >= count

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._socket.close()


def test_resolve_host_lists_each_address_once() -> None:
    assert resolve_host("127.0.0.1", 80) == ["127.0.0.1"]
