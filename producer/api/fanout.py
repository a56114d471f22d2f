"""Live events for thousands of viewers on one API process: one Redis pub/sub connection, fanned out.

    hub = FanoutHub(redis_url)
    async for event in hub.subscribe(task_id, from_seq=0, row=hub.row_reader(aclient.row)):
        ...
    await hub.aclose()

A task's channel is subscribed when its first viewer arrives and unsubscribed when its last one
leaves; each viewer has its own asyncio.Queue of the channel's messages. Everything else a viewer
does is its subscription's (contracts/bus/subscription.py): it reads the log (XRANGE, on this hub's
bounded pool of connections, shared by all viewers) after its channel is confirmed, takes a live
message only when it is the next seq, and fills gaps from the log.

When the hub's connection is lost (Redis restarted, failed over), every viewer is told (its wait for
a message raises a connection error), so each subscribes again through the hub and reads the log
from where it was: nothing is lost or repeated. redis-py may also reconnect and resubscribe on its
own; a confirmation for a channel already confirmed means exactly that, and that channel's viewers
are sent to the log to fill what the gap may have dropped. A viewer too slow to drain its queue
(QUEUE_SIZE messages behind) is sent to the log instead of buffering without bound.

Row reads are shared too: the viewers of one task waiting on a quiet channel would each read its row
every few seconds; `row_reader` makes one read serve every viewer of the task for ROW_SHARE_S.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import redis
import redis.asyncio as aioredis

from contracts.bus.aio import AsyncEventBus
from contracts.bus.publish import CONFIRM_S, RECONNECTABLE
from contracts.logging import get_logger
from contracts.redis_clients import async_client

log = get_logger(__name__)

QUEUE_SIZE = 4096  # messages a viewer may lag behind before it is sent to the log
POOL_SIZE = 64  # Redis connections for the viewers' log reads (they wait for a free one)
POOL_TIMEOUT_S = 30.0
ROW_SHARE_S = 1.0
READ_WAIT_S = 1.0
FRAME_CACHE = 4096  # encoded events kept for the viewers that come next

_LOST = object()  # queued to every viewer when the hub's connection is lost
_GAP = object()  # queued to a channel's viewers when messages may have been dropped


class _Channel:
    __slots__ = ("viewers", "confirmed")

    def __init__(self) -> None:
        self.viewers: set[HubViewer] = set()
        self.confirmed = asyncio.Event()


class FanoutHub:
    """One pub/sub connection for every viewer of this process (see the module docstring)."""

    def __init__(self, redis_url: str, *, pool_size: int = POOL_SIZE, client: aioredis.Redis | None = None) -> None:
        self.redis = client or async_client(
            redis_url, blocking_pool=True, max_connections=pool_size, timeout=POOL_TIMEOUT_S,
            socket_connect_timeout=5, health_check_interval=30)
        self._channels: dict[str, _Channel] = {}
        self._pubsub: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._connect_lock = asyncio.Lock()
        self._rows: dict[str, tuple[float, asyncio.Future[Any]]] = {}
        self.bus = AsyncEventBus(self.redis)
        self._frames: OrderedDict[tuple[Any, Any, Any], str] = OrderedDict()
        self.resubscriptions = 0  # connections lost (and viewers sent back to the log)

    # -- viewers -------------------------------------------------------------------------------
    def subscribe(self, task_id: str, from_seq: int = 0, timeout: float | None = None, *,
                  row: Callable[[str], Awaitable[Any]] | None = None) -> AsyncGenerator[dict[str, Any], None]:
        """`AsyncEventBus.subscribe` with its live messages from this hub and its log reads on its pool."""
        return self.bus.subscribe(task_id, from_seq=from_seq, timeout=timeout, row=row, live=self.live())

    def heartbeats(self, task_id: str, from_seq: int = 0, *, heartbeat_s: float,
                   row: Callable[[str], Awaitable[Any]] | None = None) -> AsyncGenerator[dict[str, Any] | None, None]:
        """`AsyncEventBus.heartbeats` (None after each quiet `heartbeat_s`) through this hub."""
        return self.bus.heartbeats(task_id, from_seq, heartbeat_s=heartbeat_s, row=row, live=self.live())

    def live(self) -> HubViewer:
        """A LiveSource (contracts/bus/aio.py) for one viewer."""
        return HubViewer(self)

    @property
    def channels(self) -> int:
        return len(self._channels)

    @property
    def viewers(self) -> int:
        return sum(len(channel.viewers) for channel in self._channels.values())

    async def _join(self, name: str, viewer: HubViewer) -> None:
        channel = self._channels.get(name)
        if channel is None:
            channel = self._channels[name] = _Channel()
            channel.viewers.add(viewer)
            try:
                pubsub = await self._connected()
                await pubsub.subscribe(name)
            except BaseException:
                self._leave(name, viewer)
                raise
        else:
            channel.viewers.add(viewer)
        # Wait for the server's confirmation before the viewer reads the log (as a pub/sub of its own
        # would): an event published in between is then in the log or in this viewer's queue.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CONFIRM_S):
                await channel.confirmed.wait()
        if viewer.lost:
            raise redis.ConnectionError("the fan-out connection was lost while subscribing")

    def _leave(self, name: str, viewer: HubViewer) -> None:
        channel = self._channels.get(name)
        if channel is None:
            return
        channel.viewers.discard(viewer)
        if channel.viewers:
            return
        del self._channels[name]
        if self._pubsub is not None:
            task = asyncio.ensure_future(self._unsubscribe(self._pubsub, name))
            task.add_done_callback(_ignore_result)

    async def _unsubscribe(self, pubsub: Any, name: str) -> None:
        if name not in self._channels:  # nobody came back for it meanwhile
            with contextlib.suppress(*RECONNECTABLE, RuntimeError):
                await pubsub.unsubscribe(name)

    # -- the connection ------------------------------------------------------------------------
    async def _connected(self) -> Any:
        async with self._connect_lock:
            if self._pubsub is None:
                pubsub = self.redis.pubsub()
                try:
                    await pubsub.connect()  # type: ignore[no-untyped-call]
                except BaseException:
                    await _close_quietly(pubsub)
                    raise
                self._pubsub = pubsub
                self._reader = asyncio.create_task(self._read(pubsub), name="qvq-fanout-reader")
            return self._pubsub

    async def _read(self, pubsub: Any) -> None:
        try:
            while True:
                if not pubsub.subscribed:
                    await asyncio.sleep(0.05)  # nothing to read until the first subscribe is sent
                    continue
                message = await pubsub.get_message(timeout=READ_WAIT_S)
                if message is not None:
                    self._dispatch(message)
        except asyncio.CancelledError:
            raise
        except (*RECONNECTABLE, OSError, RuntimeError) as error:
            self._lost(pubsub, error)

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        name = _as_str(message.get("channel"))
        channel = self._channels.get(name)
        if channel is None:
            return
        if kind == "subscribe":
            if channel.confirmed.is_set():  # redis-py reconnected and resubscribed: messages may be gone
                self._broadcast(channel, _GAP)
            channel.confirmed.set()
        elif kind == "message":
            try:  # decoded once for every viewer (they only read it)
                message["event"] = json.loads(message["data"])
            except ValueError:
                return
            self._broadcast(channel, message)

    def _broadcast(self, channel: _Channel, item: Any) -> None:
        for viewer in channel.viewers:
            viewer.put(item)

    def _lost(self, pubsub: Any, error: BaseException) -> None:
        """The connection is gone: every viewer subscribes again (and reads the log) through a new one."""
        if self._pubsub is not pubsub:
            return
        self.resubscriptions += 1
        log.warning("fanout.connection_lost", error=str(error), viewers=self.viewers)
        self._pubsub, self._reader = None, None
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            for viewer in channel.viewers:
                viewer.lose()
            channel.confirmed.set()  # wakes viewers still waiting for a confirmation (they see `lost`)
        task = asyncio.ensure_future(_close_quietly(pubsub))
        task.add_done_callback(_ignore_result)

    def frame(self, event: dict[str, Any], encode: Callable[[dict[str, Any]], str]) -> str:
        """`encode(event)`, once per event for all the viewers of its task (a small LRU by task and seq)."""
        key = (event.get("task_id"), event.get("seq"), event.get("type"))
        frame = self._frames.get(key)
        if frame is None:
            frame = self._frames[key] = encode(event)
            if len(self._frames) > FRAME_CACHE:
                self._frames.popitem(last=False)
        return frame

    # -- rows ----------------------------------------------------------------------------------
    def row_reader(self, read: Callable[[str], Awaitable[Any]]) -> Callable[[str], Awaitable[Any]]:
        """`read(task_id)`, shared: one read in flight per task, its result reused for ROW_SHARE_S."""

        async def shared(task_id: str) -> Any:
            now = time.monotonic()
            cached = self._rows.get(task_id)
            if cached is None or now - cached[0] > ROW_SHARE_S:
                future: asyncio.Future[Any] = asyncio.ensure_future(read(task_id))
                future.add_done_callback(_ignore_result)
                cached = self._rows[task_id] = (now, future)
                if len(self._rows) > 10_000:
                    self._prune_rows(now)
            return await asyncio.shield(cached[1])

        return shared

    def _prune_rows(self, now: float) -> None:
        for task_id in [t for t, (at, _f) in self._rows.items() if now - at > ROW_SHARE_S]:
            del self._rows[task_id]

    async def aclose(self) -> None:
        reader, pubsub = self._reader, self._pubsub
        self._reader = self._pubsub = None
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader
        if pubsub is not None:
            await _close_quietly(pubsub)
        await self.redis.aclose()


class HubViewer:
    """One viewer's live messages from the hub (implements contracts.async_bus.LiveSource)."""

    def __init__(self, hub: FanoutHub) -> None:
        self._hub = hub
        self._queue: asyncio.Queue[Any] = asyncio.Queue(QUEUE_SIZE)
        self._channel: str | None = None
        self.lost = False
        self._behind = False

    async def subscribe(self, channel: str) -> None:
        await self.aclose()
        self._queue = asyncio.Queue(QUEUE_SIZE)
        self.lost = self._behind = False
        self._channel = channel
        await self._hub._join(channel, self)

    async def get_message(self, timeout: float) -> dict[str, Any] | None:
        if self._behind:  # it lagged: drop the queue, the log has every event
            self._behind = False
            while not self._queue.empty():
                self._queue.get_nowait()
            return None
        if not self._queue.empty():  # the common case under load: no timer to arm
            item = self._queue.get_nowait()
        else:
            try:
                async with asyncio.timeout(timeout):
                    item = await self._queue.get()
            except TimeoutError:
                return None
        if item is _LOST:
            raise redis.ConnectionError("the fan-out connection to Redis was lost")
        if item is _GAP:
            return None  # as a quiet channel: the subscription reads the log
        return item  # type: ignore[no-any-return]

    def put(self, item: Any) -> None:
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            self._behind = True

    def lose(self) -> None:
        self.lost = True
        self._channel = None
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(_LOST)

    async def aclose(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            self._hub._leave(channel, self)


async def _close_quietly(pubsub: Any) -> None:
    with contextlib.suppress(Exception):
        await pubsub.aclose()


def _ignore_result(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _as_str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
