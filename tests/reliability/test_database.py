"""Every database call has a deadline: a database that stops answering (SIGSTOPped, or a frozen network
path whose kernel still ACKs) blocks no worker thread for good. The worker reaches PostgreSQL through a
TCP proxy on loopback that the test freezes (stops forwarding, keeps the sockets open): tasks that were
streaming, and tasks submitted meanwhile, are put back and complete once it answers again, once each.
Default: a 15 s freeze with QVQ_DB_TIMEOUT_S=2; QVQ_SLOW=1: a 60 s freeze with the default timeout."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from contracts import events as ev
from contracts.job import QUEUE
from tests.reliability import SLOW, Stack, terminal_events
from tests.services import ThrowawayPostgres

pytestmark = [pytest.mark.timeout(400), pytest.mark.slow]


class FreezableProxy:
    """A TCP forwarder on 127.0.0.1 (its own event loop in a thread); `frozen` stops all forwarding
    while every connection stays open, which is what a stopped server looks like to a client."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self._running: asyncio.Event = self._call(self._make_event())
        self._server = self._call(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    @staticmethod
    async def _make_event() -> asyncio.Event:
        running = asyncio.Event()
        running.set()
        return running

    def freeze(self) -> None:
        self.loop.call_soon_threadsafe(self._running.clear)

    def thaw(self) -> None:
        self.loop.call_soon_threadsafe(self._running.set)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._running.wait()
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await self._running.wait()
                data = await reader.read(65536)
                if not data:
                    break
                await self._running.wait()
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _shutdown(self) -> None:
        self._running.set()
        self._server.close()
        tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def close(self) -> None:
        """Every connection task ended in the loop's own thread (a task destroyed while pending would
        print a traceback from another thread at exit)."""
        self._call(self._shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


@pytest.fixture()
def database(postgres_database: ThrowawayPostgres | None) -> Iterator[ThrowawayPostgres]:
    if postgres_database is None:
        pytest.skip("PostgreSQL not reachable at 127.0.0.1:5432 (set QVQ_TEST_POSTGRES_URL)")
    postgres_database.reset()
    yield postgres_database


def test_a_frozen_database_blocks_nothing_for_good(make_stack: Any, database: ThrowawayPostgres) -> None:
    freeze_s, env = (60.0, {}) if SLOW else (15.0, {"QVQ_DB_TIMEOUT_S": "2"})
    url = sa.engine.make_url(database.url)
    proxy = FreezableProxy(url.host or "127.0.0.1", url.port or 5432)
    try:
        stack: Stack = make_stack(DATABASE_URL=database.url, QVQ_TASK_TIMEOUT_S="120",
                                  QVQ_VISIBILITY_TIMEOUT_S="7200", QVQ_LEASE_TTL_S="30", **env)
        through_proxy = str(url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False))
        stack.start_worker(concurrency=8, DATABASE_URL=through_proxy)
        streaming = [stack.submit(f"Stream through it, {n}.", tps=40, reasoning_tokens=80) for n in range(3)]
        for task_id in streaming:
            stack.wait_events(task_id, lambda es: any(e["type"] == ev.REASONING_DELTA for e in es))

        proxy.freeze()
        frozen_at = time.monotonic()
        during = [stack.submit(f"Submitted while it is frozen, {n}.") for n in range(2)]
        deadline = frozen_at + freeze_s
        while time.monotonic() < deadline:  # the worker's threads give up on the stopped server meanwhile
            time.sleep(0.5)
        assert all(stack.record(t).status != "completed" for t in streaming + during)
        proxy.thaw()

        records = stack.wait_terminal(streaming + during, timeout=120)
        print(f"\nall done {time.monotonic() - frozen_at - freeze_s:.1f} s after a {freeze_s:g} s freeze")
        for task_id, record in records.items():
            assert record.status == "completed", (task_id, record.error_code, record.error_message)
            assert len(terminal_events(stack.events(task_id))) == 1
            assert len(stack.client.store.usage_rows(task_id)) == 1
        logs = stack.worker_logs()
        assert "task.requeued" in logs or "retry.waiting" in logs  # the deadlines fired
        deadline = time.monotonic() + 10
        while stack.redis.llen(QUEUE) or stack.redis.hlen("unacked"):
            assert time.monotonic() < deadline, "messages left in the broker"
            time.sleep(0.1)
    finally:
        proxy.close()
