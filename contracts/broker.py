"""What the service reads of the Celery broker's own keys (kombu's Redis transport), in one place.

kombu keeps the messages of a queue in Redis lists (the queue's name, plus one list per priority step:
"<queue>\\x06\\x16<3|6|9>"), and the messages a worker has reserved but not acknowledged in the hash
`unacked` (delivery tag -> [message, exchange, routing key]) indexed by the zset `unacked_index`.
The queue-depth metric, the recovery sweep and `qvq follow`'s waiting line read these, always through
CELERY_BROKER_URL (which defaults to REDIS_URL).
"""

from __future__ import annotations

import json
from typing import Any

PRIORITY_SEPARATOR = "\x06\x16"
PRIORITY_STEPS = (3, 6, 9)
UNACKED = "unacked"
UNACKED_INDEX = "unacked_index"
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def queue_lists(queue: str) -> list[str]:
    """The Redis lists that hold the waiting messages of one Celery queue."""
    return [queue, *(f"{queue}{PRIORITY_SEPARATOR}{step}" for step in PRIORITY_STEPS)]


def message_id(raw: Any) -> str:
    """The task id of a kombu message (its `headers.id`), from the JSON the transport stores."""
    message = json.loads(raw) if isinstance(raw, bytes | str) else raw
    return str(message.get("headers", {}).get("id") or "")


def unacked_message_id(raw: Any) -> str | None:
    """The task id of an `unacked` entry ([message, exchange, routing key]); None when unreadable."""
    try:
        return message_id(json.loads(raw)[0])
    except (ValueError, IndexError, TypeError, AttributeError):
        return None


def depth(client: Any, queue: str) -> int:
    """Messages waiting in the queue (every priority list), in one round trip."""
    pipe = client.pipeline(transaction=False)
    for name in queue_lists(queue):
        pipe.llen(name)
    return sum(int(n) for n in pipe.execute())
