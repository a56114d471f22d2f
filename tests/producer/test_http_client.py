"""One test file, two surfaces: the Redis client (producer.client.Client) and the HTTP-only client
(producer.http_client.HttpClient, against the served API through a proxy that drops the first event
stream mid-run) behave the same: submit, follow (resuming after the drop), result, cancel, retry, errors."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from contracts import events as ev
from contracts.errors import AuthError, NotFoundError, RequestError
from contracts.settings import Settings
from producer.http_client import AsyncHttpClient, HttpClient
from tests.imagegen import make_image
from tests.producer import ApiServer

pytestmark = pytest.mark.timeout(120)
SLOW = "[[emulator: tps=150 reasoning_tokens=90 answer_tokens=30]]"
STALLED = "[[emulator: tps=5 reasoning_tokens=600]]"  # a long run, cancelled while it streams


class CuttingProxy:
    """A TCP proxy on 127.0.0.1 that closes the first event stream after `cut_after` bytes of its answer."""

    def __init__(self, upstream_port: int, cut_after: int = 1200) -> None:
        self.upstream_port, self.cut_after = upstream_port, cut_after
        self.cuts = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        """Requests go up as they come (keep-alive: several on one connection); once a request for an
        event stream went up on it, the first such connection is closed after `cut_after` bytes down."""
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        armed = threading.Event()

        def up() -> None:
            try:
                while chunk := client.recv(65536):
                    with self._lock:
                        if b"/events" in chunk.split(b"\r\n", 1)[0] and self.cuts == 0:
                            self.cuts += 1
                            armed.set()
                    upstream.sendall(chunk)
            except OSError:
                pass

        threading.Thread(target=up, daemon=True).start()
        counted = 0
        try:
            while chunk := upstream.recv(256):
                client.sendall(chunk)
                counted = counted + len(chunk) if armed.is_set() else 0
                if counted >= self.cut_after:
                    break
        except OSError:
            pass
        finally:
            for sock in (client, upstream):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def close(self) -> None:
        self.listener.close()


@pytest.fixture()
def photo(s3: Any) -> str:
    s3.create_bucket("photos")
    s3.put("photos", "green.png", make_image("PNG", size=(64, 48), color=(20, 200, 20)), "image/png")
    return "s3://photos/green.png"


@pytest.fixture()
def served(service_env: dict[str, str], start_worker: Any) -> Iterator[tuple[ApiServer, CuttingProxy]]:
    start_worker()
    with ApiServer(Settings.from_env(service_env), keepalive_s=1.0) as api:
        proxy = CuttingProxy(api.port)
        yield api, proxy
        proxy.close()


@pytest.fixture(params=["redis", "http"])
def client(request: pytest.FixtureRequest, make_client: Any) -> Iterator[Any]:
    if request.param == "redis":
        request.getfixturevalue("start_worker")()
        yield make_client()
        return
    _api, proxy = request.getfixturevalue("served")
    with HttpClient(proxy.url, "") as http:
        http.proxy = proxy  # type: ignore[attr-defined]
        yield http


def test_submit_follow_with_a_dropped_connection_and_result(client: Any, photo: str) -> None:
    handle = client.submit(images=[photo], prompt=f"Which colour? {SLOW}", model="qvq-plus")
    assert handle.created
    events = list(handle.events(timeout=60))
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(events) + 1)), seqs  # nothing lost, nothing twice across the drop
    assert events[0]["type"] == ev.QUEUED and events[-1]["type"] == ev.COMPLETED
    record = handle.result(timeout=30)
    assert record.status == "completed" and record.id == handle.task_id
    assert record.answer == "".join(e["text"] for e in events if e["type"] == ev.ANSWER_DELTA)
    assert client.get(handle.task_id).to_dict()["images"][0]["ref"] == photo
    if isinstance(client, HttpClient):
        assert client.proxy.cuts == 1  # type: ignore[attr-defined]


def until_streaming(client: Any, task_id: str, from_seq: int = 0) -> list[dict[str, Any]]:
    seen = []
    for event in client.events(task_id, from_seq=from_seq, timeout=30):
        seen.append(event)
        if event["type"] == ev.REASONING_DELTA:
            return seen
    raise AssertionError(f"the task ended without streaming: {seen[-1]}")


def test_cancel_then_retry_then_cancel(client: Any, photo: str) -> None:
    handle = client.submit(images=[photo], prompt=f"Wait. {STALLED}")
    until_streaming(client, handle.task_id)
    assert handle.cancel() is True
    ended = handle.result(timeout=30)
    assert ended.status == "cancelled", (ended.error_code, ended.error_message)
    assert handle.cancel() is False  # it had ended
    from_seq = handle.retry()
    assert until_streaming(client, handle.task_id, from_seq)[0] == {**_first_of_run(client, handle.task_id, from_seq)}
    assert client.cancel(handle.task_id) is True
    assert client.result(handle.task_id, timeout=30).status == "cancelled"
    with pytest.raises(KeyError):
        client.retry("no-such-task")


def _first_of_run(client: Any, task_id: str, from_seq: int) -> dict[str, Any]:
    first = next(iter(client.events(task_id, from_seq=from_seq, timeout=30)))
    assert first["type"] == ev.QUEUED and first["seq"] == from_seq + 1
    return dict(first)


def test_errors_are_the_same_on_both_surfaces(client: Any, photo: str) -> None:
    with pytest.raises(KeyError):
        client.get("no-such-task")
    with pytest.raises(RequestError) as bad_model:
        client.submit(images=[photo], prompt="hi", model="qvq-ultra")
    assert bad_model.value.code == "model.unknown" and bad_model.value.field == "model"
    with pytest.raises(RequestError) as no_prompt:
        client.submit_request({"images": [photo], "prompt": ""})
    assert no_prompt.value.field == "prompt"
    handle = client.submit(images=[photo], prompt="hi", idempotency_key="same")
    again = client.submit(images=[photo], prompt="hi", idempotency_key="same")
    assert again.task_id == handle.task_id and not again.created


def test_http_only_errors_and_the_async_client(service_env: dict[str, str], start_worker: Any, photo: str) -> None:
    start_worker()
    key = "acme-key-0123456789abcdef"
    settings = Settings.from_env({**service_env, "QVQ_API_KEYS": f"acme:{key}"})
    with ApiServer(settings, keepalive_s=1.0) as api:
        with HttpClient(api.url, "wrong-key-0123456789abcdef") as stranger, pytest.raises(AuthError) as denied:
            stranger.get("anything")
        assert denied.value.status == 401 and denied.value.code == "auth.invalid"
        with HttpClient(api.url, key) as acme, pytest.raises(NotFoundError):
            acme.get("no-such-task")

        async def run() -> tuple[list[dict[str, Any]], Any, list[dict[str, Any]]]:
            async with AsyncHttpClient(api.url, key) as aclient:
                handle = await aclient.submit(images=[photo], prompt="Which colour?")
                events = [event async for event in handle.events(timeout=60)]
                record = await handle.result(timeout=30)
                listed = await aclient.tasks(limit=10)
                return events, record, listed

        events, record, listed = asyncio.run(run())
    assert events[-1]["type"] == ev.COMPLETED and record.status == "completed" and record.tenant == "acme"
    assert [row["task_id"] for row in listed] == [record.id]


def test_the_cli_factory_picks_the_http_client_when_an_api_is_named(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from contracts.settings import reset_settings
    from producer import cli

    monkeypatch.setenv("QVQ_API_URL", "http://127.0.0.1:9")  # nothing listens: the error must be one line
    reset_settings()
    try:
        outcome = CliRunner().invoke(cli.main, ["result", "some-task"])
    finally:
        monkeypatch.delenv("QVQ_API_URL")
        reset_settings()
    assert outcome.exit_code == 1, outcome.output
    assert outcome.output.strip().splitlines() == ["error: unavailable: the API cannot be reached (ConnectError)"]


def test_the_commands_talk_http_with_api(served: tuple[ApiServer, CuttingProxy], photo: str) -> None:
    import json

    from click.testing import CliRunner

    from producer import cli

    api, _proxy = served
    runner = CliRunner()
    submitted = runner.invoke(cli.main, ["--api", api.url, "submit", photo, "--prompt", "Which colour?", "--json",
                                         "--callback-url", "http://127.0.0.1:9/hook"])
    assert submitted.exit_code == 0, submitted.output
    task_id = json.loads(submitted.output)["task_id"]
    followed = runner.invoke(cli.main, ["--api", api.url, "follow", task_id, "--json"])
    assert followed.exit_code == 0, followed.output
    shown = runner.invoke(cli.main, ["--api", api.url, "result", task_id, "--json"])
    record = json.loads(shown.output)
    assert record["status"] == "completed" and record["request"]["callback_url"] == "http://127.0.0.1:9/hook"
    assert "callback" in record
    usage = runner.invoke(cli.main, ["--api", api.url, "usage", "--json"])
    assert usage.exit_code == 0 and json.loads(usage.output)["rows"][0]["calls"] >= 1, usage.output
