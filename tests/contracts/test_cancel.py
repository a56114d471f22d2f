"""The one cancel path (qvq cancel, the API, a Celery revoke): the same end, above the same seq floor."""

from __future__ import annotations

from pathlib import Path

import redis

from contracts import events as ev
from contracts import keys
from contracts.bus import EventBus
from contracts.cancel import cancel_task
from contracts.job import parse_job
from contracts.store import RUNNING, Store


def test_a_queued_task_ends_at_once_above_every_seq_the_row_knows(redis_client: redis.Redis, tmp_path: Path) -> None:
    store = Store.from_url(f"sqlite:///{tmp_path / 'q.db'}")
    job = parse_job({"images": ["s3://b/k.png"], "prompt": "Cancel me."})
    record, _ = store.create_task(job)
    store.note_seq(job.task_id, 40)  # Redis restarted without persistence: its counter is gone, the row knows 40
    assert cancel_task(store.get(job.task_id), store=store, client=redis_client, bus=EventBus(redis_client))  # type: ignore[arg-type]
    events = EventBus(redis_client).read_log(job.task_id)
    assert [(e["type"], e["seq"]) for e in events] == [(ev.CANCELLED, 41)]
    ended = store.get(job.task_id)
    assert ended is not None and ended.status == "cancelled" and ended.last_seq == 41
    assert redis_client.exists(keys.cancel_key(job.task_id))
    assert not cancel_task(ended, store=store, client=redis_client, bus=EventBus(redis_client))  # already ended
    store.dispose()


def test_a_running_task_is_told_through_the_cancel_channel(redis_client: redis.Redis, tmp_path: Path) -> None:
    store = Store.from_url(f"sqlite:///{tmp_path / 'q.db'}")
    job = parse_job({"images": ["s3://b/k.png"], "prompt": "Cancel me while I run."})
    store.create_task(job)
    store.begin_attempt(job.task_id)
    redis_client.set(keys.lease_key(job.task_id), "w1:token")  # a live worker runs it
    listener = redis_client.pubsub()
    listener.subscribe(keys.CANCEL_CHANNEL)
    listener.get_message(timeout=1)
    record = store.get(job.task_id)
    assert record is not None and record.status == RUNNING
    assert cancel_task(record, store=store, client=redis_client, bus=EventBus(redis_client))
    message = listener.get_message(timeout=2)
    assert message is not None and message["data"] == job.task_id.encode()
    still = store.get(job.task_id)
    assert still is not None and still.status == RUNNING  # the worker running it writes the end
    listener.close()
    store.dispose()
