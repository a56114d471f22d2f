"""Slow peers hold no worker thread: a callback receiver that trickles its reply, and a model endpoint
whose GET /models trickles, on real worker processes (everything on 127.0.0.1)."""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from contracts import events as ev
from tests.reliability import Stack
from tests.waiting import wait_until

TRICKLE_S = 2.0  # one byte this often: every read stays under any per-read timeout


class Trickler:
    """Accepts connections and answers each with a 200 whose body comes one byte every TRICKLE_S, forever.
    Counts the connections open at once per request line + X-Qvq-Event-Id (one delivery)."""

    def __init__(self) -> None:
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(64)
        self.port = self.server.getsockname()[1]
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.open: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.requests = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            head = conn.recv(65536).decode("latin-1")
            key = head.split("\r\n", 1)[0] + next(
                (line for line in head.split("\r\n") if line.lower().startswith("x-qvq-event-id")), "")
            with self.lock:
                self.requests += 1
                self.open[key] = self.open.get(key, 0) + 1
                self.peak[key] = max(self.peak.get(key, 0), self.open[key])
            try:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\nContent-Type: application/json\r\n\r\n")
                while not self.stop.is_set():
                    readable, _, _ = select.select([conn], [], [], TRICKLE_S)
                    if readable and not conn.recv(1024):  # the client closed: this POST is over
                        return
                    conn.sendall(b" ")
            except OSError:
                pass
            finally:
                with self.lock:
                    self.open[key] -= 1

    def close(self) -> None:
        self.stop.set()
        self.server.close()


@pytest.fixture()
def trickler() -> Iterator[Trickler]:
    server = Trickler()
    yield server
    server.close()


def test_trickling_callback_receivers_never_hold_the_pool_nor_get_two_posts_at_once(
        make_stack: Any, trickler: Trickler) -> None:
    stack: Stack = make_stack(QVQ_CALLBACK_TIMEOUT_S="3", QVQ_CALLBACK_BACKOFF_S="0.5")
    stack.start_worker(concurrency=4, name="w0")
    url = f"http://127.0.0.1:{trickler.port}/hook"
    hooked = [stack.client.submit(images=[str(stack.image)], prompt="hi", callback_url=url).task_id
              for _ in range(6)]
    wait_until(lambda: trickler.requests >= 6, timeout=30)
    for task_id in hooked[:3]:  # asked while its try is in flight: no second POST starts
        stack.client.redeliver_callback(task_id)
    started = time.monotonic()
    ordinary = stack.submit()
    record = stack.wait_terminal([ordinary], timeout=30)[ordinary]
    took = time.monotonic() - started
    wait_until(lambda: all((c := stack.client.callback(t)) and c["attempts"] >= 2 for t in hooked), timeout=60)
    print(f"\nslow receivers: an ordinary job took {took:.2f} s; POSTs {trickler.requests}; peaks {trickler.peak}")
    assert record.status == "completed" and took < 10
    assert max(trickler.peak.values()) == 1  # never two POSTs of one delivery at once
    callback = stack.client.callback(hooked[0])
    assert callback is not None and callback["status"] == "pending"
    assert callback["attempt_log"][0]["error"] == "timeout (3 s)"


def test_a_trickling_models_endpoint_does_not_delay_consuming(make_stack: Any, trickler: Trickler) -> None:
    stack: Stack = make_stack()
    started = time.monotonic()
    worker = stack.start_worker(concurrency=4, name="w0", QVQ_BASE_URL=f"http://127.0.0.1:{trickler.port}/v1")
    task_id = stack.submit()
    stack.wait_events(task_id, lambda es: any(e["type"] == ev.STARTED for e in es), timeout=15)
    took = time.monotonic() - started
    print(f"\ntrickling /models: the first task started {took:.2f} s after the worker was launched")
    assert took < 15
    wait_until(lambda: any(e.get("event") == "worker.model_endpoint_unusable" for e in worker.log_events()),
               timeout=20)
