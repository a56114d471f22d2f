"""Callback deliveries, the parts producer and worker share: the Celery task and queue names, the event
id receivers dedupe by, and the retry schedule (exponential, capped, for QVQ_CALLBACK_MAX_AGE_S).

    event id   "<task_id>:<run>:<seq>"   (header X-Qvq-Event-Id, and `event_id` in the body)
    waits      base, 2*base, 4*base ... capped at QVQ_CALLBACK_BACKOFF_MAX_S, each with up to 20% jitter
"""

from __future__ import annotations

import random

TASK_NAME = "qvq.callback"
QUEUE = "qvq-callbacks"
DUE_KEY = "qvq:callbacks:due"  # Redis sorted set: event id -> unix time it is due
EVENT_ID_HEADER = "X-Qvq-Event-Id"


def event_id(task_id: str, run: int, seq: int | None) -> str:
    return f"{task_id}:{run}:{seq if seq is not None else 0}"


def backoff_s(attempts: int, base_s: float, max_s: float) -> float:
    """The wait after the `attempts`-th failed try (1, 2, ...)."""
    ceiling = min(max_s, base_s * (2 ** (max(1, attempts) - 1)))
    return round(ceiling * random.uniform(0.8, 1.0), 3)
