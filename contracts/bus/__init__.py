"""A task's events on Redis: what lives here.

    publish.py       the publish script (seq, replay log, pub/sub in one round trip) and its arguments
    subscription.py  SubscriptionState: following a task (log, then live, by seq; the row as truth), I/O-free
    sync.py          EventBus: publish, read the log, subscribe with redis-py (threads)
    aio.py           AsyncEventBus: the same with redis.asyncio (the API, async backends)
    sse.py           server-sent events: EventStreamDecoder (bytes in) and format_sse (our events out)

Key names are in contracts/keys.py, event types in contracts/events.py.
"""

from __future__ import annotations

from contracts.bus.publish import RECONNECTABLE
from contracts.bus.sync import EventBus

__all__ = ["RECONNECTABLE", "EventBus"]
