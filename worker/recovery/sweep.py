"""Recovery from leases, not from the broker's visibility timeout: a sweep in every worker process.

Every QVQ_SWEEP_INTERVAL_S (jittered), each process tries to win the round (a Redis lock, SET NX PX,
held for most of an interval and never released early, so one process sweeps per round). The winner:

1. orphans: tasks marked running whose lease (contracts.keys.lease_key) is absent: their worker
   died (OOM kill, lost node, a deploy shorter than a stream). Each is sent to the queue again (a new
   attempt resumes it; nothing terminal is published) and the dead worker's unacked message is
   dropped, so the broker does not bring it back two hours later;
2. lost messages: tasks queued for more than QVQ_REQUEUE_GRACE_S whose message is neither in the
   queue nor reserved by a worker (kombu's `unacked` hash): a purged queue, a revoked message, a Redis
   restarted without persistence. They are sent again, in batches;
3. logs: tasks whose row is terminal but whose event log does not end with a terminal event (Redis was
   down when they ended, or lost its data) get their terminal event published from the row, once.

A candidate of (1) or (2) is acted on only when a later round still sees it (at least a lease renewal
period later): a lease is recreated by its live worker within TTL/3 after Redis lost it, and a message
is briefly in neither place while a worker takes it from the queue. Worst case with the defaults
(lease TTL 30 s, interval 10 s): the lease expires 30 s after the death, then two rounds: within
TTL + 60 s of the death the task runs again.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import redis

from contracts import broker, keys
from contracts.bus import EventBus
from contracts.bus.subscription import event_from_row
from contracts.events import is_terminal
from contracts.job import QUEUE
from contracts.logging import get_logger
from contracts.store import RUNNING, Store, TaskRecord

log = get_logger(__name__)

BATCH = 500
MAX_QUEUE_SCAN = 100_000  # longer queues are not scanned (a backlog that long is not a lost message)
SCAN_CHUNK = 1000
REPAIR_SETTLE_S = 10.0  # a task that just ended may still be publishing its terminal event
SUSPECT_FORGET_S = 600.0

Send = Callable[[str, int], None]


@dataclass
class Round:
    """What one round did (for the log line and the tests)."""

    orphans: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.orphans or self.lost or self.repaired)


class Sweep:
    def __init__(self, client: redis.Redis, store: Store, bus: EventBus, send: Send, *, interval_s: float,
                 lease_ttl_s: float, requeue_grace_s: float, event_ttl_s: int, queue: str = QUEUE,
                 broker_client: redis.Redis | None = None) -> None:
        self.redis = client  # REDIS_URL: leases, the sweep's own keys, the event logs
        self.broker = broker_client or client  # CELERY_BROKER_URL: the queue and kombu's unacked hash
        self.queue = queue  # the Celery queue whose list holds the waiting messages (QVQ_QUEUE)
        self.store = store
        self.bus = bus
        self.send = send
        self.interval_s = interval_s
        self.requeue_grace_s = requeue_grace_s
        self.event_ttl_s = event_ttl_s
        self.confirm_after_s = lease_ttl_s / 3 + 1  # longer than a lease renewal period
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the loop ------------------------------------------------------------------------------
    def start(self) -> Sweep:
        self._thread = threading.Thread(target=self._loop, name="qvq-sweep", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()

    def _loop(self) -> None:
        while not self._stopped.wait(self.interval_s * random.uniform(0.8, 1.2)):
            try:
                if self._win_round():
                    self.run_once()
            except Exception as exc:  # Redis or the database away: the next round tries again
                log.warning("sweep.round_failed", error=f"{type(exc).__name__}: {exc}")

    def _win_round(self) -> bool:
        return bool(self.redis.set(keys.SWEEP_LOCK, "1", nx=True, px=max(100, int(self.interval_s * 800))))

    def run_once(self) -> Round:
        """One round (the caller holds the round's lock)."""
        done = Round(orphans=self.requeue_orphans(), lost=self.requeue_lost_messages(),
                     repaired=self.repair_logs())
        if done:
            log.info("sweep.round", orphans=len(done.orphans), lost=len(done.lost), repaired=len(done.repaired))
        return done

    # -- 1. orphans ----------------------------------------------------------------------------
    def requeue_orphans(self) -> list[str]:
        running = dict(self.store.running())
        pipe = self.redis.pipeline(transaction=False)
        for task_id in running:
            pipe.exists(keys.lease_key(task_id))
        held = pipe.execute() if running else []
        leaseless = [task_id for task_id, exists in zip(running, held, strict=True) if not exists]
        confirmed = self._confirmed("orphan", leaseless, forget_others=True)
        if not confirmed:
            return []
        queued, reserved = self._broker_ids()
        done = []
        for task_id in confirmed:
            record = self.store.get(task_id)
            if record is None or record.status != RUNNING or task_id in (queued or ()):
                continue  # it ended meanwhile, or its message is back in the queue (a requeue in progress)
            self.send(task_id, record.run)
            self._drop_unacked(reserved.get(task_id, ()))
            log.warning("task.orphan_requeued", task_id=task_id, run=record.run, attempts=record.attempts,
                        reason="running, but its lease expired: its worker died")
            done.append(task_id)
        self._forget("orphan", done)
        return done

    # -- 2. lost messages ----------------------------------------------------------------------
    def requeue_lost_messages(self) -> list[str]:
        after = _text(self.redis.get(keys.SWEEP_QUEUED_CURSOR) or b"")
        cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=self.requeue_grace_s)
        batch = dict(self.store.queued_before(cutoff, after_id=after, limit=BATCH))
        self.redis.set(keys.SWEEP_QUEUED_CURSOR, max(batch) if len(batch) == BATCH else "")
        if not batch:
            return []
        queued, reserved = self._broker_ids()
        if queued is None:
            return []
        missing = [task_id for task_id in batch if task_id not in queued and task_id not in reserved]
        present = [task_id for task_id in batch if task_id not in missing]
        self._forget("queued", present)
        done = []
        for task_id in self._confirmed("queued", missing, forget_others=False):
            self.send(task_id, batch[task_id])
            log.warning("task.lost_message_requeued", task_id=task_id, run=batch[task_id],
                        reason="queued, but its message is not in the broker")
            done.append(task_id)
        self._forget("queued", done)
        return done

    # -- 3. logs -------------------------------------------------------------------------------
    def repair_logs(self) -> list[str]:
        now = time.time()
        raw = self.redis.get(keys.SWEEP_REPAIRED_UNTIL)
        since = float(raw) if raw else now - self.event_ttl_s  # Redis lost it: check every log it may hold
        until = now - REPAIR_SETTLE_S
        if until <= since:
            return []
        rows = self.store.finished_between(_utc(since), _utc(until), limit=BATCH)
        pipe = self.redis.pipeline(transaction=False)
        for task_id, _ in rows:
            pipe.xrevrange(keys.log_key(task_id), count=1)
        lasts = pipe.execute() if rows else []
        done = []
        for (task_id, _), last in zip(rows, lasts, strict=True):
            if last and _is_terminal_entry(last[0][1]):
                continue
            record = self.store.get(task_id)
            if record is not None and record.is_terminal and self._publish_terminal(record):
                done.append(task_id)
        watermark = rows[-1][1].timestamp() if len(rows) == BATCH else until
        self.redis.set(keys.SWEEP_REPAIRED_UNTIL, repr(watermark), ex=self.event_ttl_s)
        return done

    def _publish_terminal(self, record: TaskRecord) -> bool:
        event = event_from_row(record, 0)
        type_ = event["type"]
        fields = {name: value for name, value in event.items()
                  if name not in ("seq", "task_id", "type", "ts", "attempt", "run", "from_row")}
        seq = self.bus.publish(record.id, type_, record.attempts, seq_floor=record.last_seq, **fields)
        self.store.note_seq(record.id, int(seq))
        log.warning("task.terminal_event_repaired", task_id=record.id, type=type_, seq=seq,
                    reason="the row is terminal but the event log had no terminal event")
        return True

    # -- the broker ----------------------------------------------------------------------------
    def _broker_ids(self) -> tuple[set[str] | None, dict[str, list[bytes]]]:
        """Task ids whose message waits in the queue (None when the queue is too long to scan), and
        those reserved by a worker (unacked), with their delivery tags."""
        queued: set[str] | None = self._queued_ids()
        reserved: dict[str, list[bytes]] = {}
        for tag, raw in self.broker.hscan_iter(broker.UNACKED, count=SCAN_CHUNK):
            task_id = broker.unacked_message_id(raw)
            if task_id is not None:
                reserved.setdefault(task_id, []).append(tag)
        return queued, reserved

    def _queued_ids(self) -> set[str] | None:
        ids: set[str] = set()
        for key in broker.queue_lists(self.queue):
            length = int(self.broker.llen(key))
            if length > MAX_QUEUE_SCAN:
                log.warning("sweep.queue_too_long_to_scan", queue=key, length=length)
                return None
            for start in range(0, length, SCAN_CHUNK):
                ids.update(broker.message_id(raw) for raw in self.broker.lrange(key, start, start + SCAN_CHUNK - 1))
        return ids

    def _drop_unacked(self, tags: Iterable[bytes]) -> None:
        tags = list(tags)
        if tags:
            pipe = self.broker.pipeline()
            pipe.zrem(broker.UNACKED_INDEX, *tags)
            pipe.hdel(broker.UNACKED, *tags)
            pipe.execute()

    # -- candidates seen in two rounds ---------------------------------------------------------
    def _confirmed(self, kind: str, candidates: list[str], *, forget_others: bool) -> list[str]:
        """The candidates a round at least `confirm_after_s` ago already saw; records the new ones."""
        key = keys.SWEEP_SUSPECTS + kind
        now = time.time()
        seen = {_text(k): float(v) for k, v in self.redis.hgetall(key).items()}
        stale = [k for k, when in seen.items()
                 if (forget_others and k not in candidates) or now - when > SUSPECT_FORGET_S]
        pipe = self.redis.pipeline(transaction=False)
        if stale:
            pipe.hdel(key, *stale)
        new: dict[Any, Any] = {task_id: now for task_id in candidates if task_id not in seen}
        if new:
            pipe.hset(key, mapping=new)
        pipe.execute()
        return [task_id for task_id in candidates
                if task_id in seen and task_id not in stale and now - seen[task_id] >= self.confirm_after_s]

    def _forget(self, kind: str, task_ids: list[str]) -> None:
        if task_ids:
            self.redis.hdel(keys.SWEEP_SUSPECTS + kind, *task_ids)


def _is_terminal_entry(fields: Any) -> bool:
    raw = fields.get(b"event") or fields.get("event") or b"{}"
    try:
        return is_terminal(json.loads(raw))
    except ValueError:
        return False


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _utc(unix_s: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(unix_s, dt.UTC)
