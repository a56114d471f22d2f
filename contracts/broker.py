"""What the service reads of the Celery broker's own keys (kombu's Redis transport), in one place.

kombu keeps the messages of a queue in Redis lists (the queue's name, plus one list per priority step:
"<queue>\\x06\\x16<3|6|9>"), and the messages a worker has reserved but not acknowledged in the hash
`unacked` (delivery tag -> [message, exchange, routing key]) indexed by the zset `unacked_index`.
The queue-depth metric, the recovery sweep and `qvq follow`'s waiting line read these, always through
CELERY_BROKER_URL (which defaults to REDIS_URL).

Every message we send carries the header SENT_AT (contracts/sender.py): a queue's oldest message is the
last of its list (kombu LPUSHes and BRPOPs), so its age is read with one LINDEX per list.
"""

from __future__ import annotations

import json
from typing import Any

PRIORITY_SEPARATOR = "\x06\x16"
PRIORITY_STEPS = (3, 6, 9)
UNACKED = "unacked"
UNACKED_INDEX = "unacked_index"
SENT_AT = "qvq_sent_at"  # message header: when it was sent (Unix time)


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


def oldest_age(client: Any, queue: str, now: float) -> float:
    """Seconds the queue's oldest waiting message has waited (0 when none is waiting or none says)."""
    pipe = client.pipeline(transaction=False)
    for name in queue_lists(queue):
        pipe.lindex(name, -1)
    sent = [_sent_at(raw) for raw in pipe.execute() if raw is not None]
    known = [moment for moment in sent if moment is not None]
    return max(0.0, now - min(known)) if known else 0.0


def _sent_at(raw: Any) -> float | None:
    try:
        value = json.loads(raw).get("headers", {}).get(SENT_AT)
    except (ValueError, AttributeError):
        return None
    return float(value) if isinstance(value, int | float) else None


def depth(client: Any, queue: str) -> int:
    """Messages waiting in the queue (every priority list), in one round trip."""
    pipe = client.pipeline(transaction=False)
    for name in queue_lists(queue):
        pipe.llen(name)
    return sum(int(n) for n in pipe.execute())
