"""Parking: a task whose tenant has no free running slot waits in Redis, not in a worker thread.

Holding it in a thread would let one tenant's burst fill every thread while another tenant's job waits
in the queue behind it. Its queue message goes to a delayed set (zset of task id by due time, and a
hash of messages), the delivery is acknowledged, and a mover in every worker puts due tasks back on the
queue (one winner per task, by ZREM). Celery's own eta/countdown is not used for this: on Redis such
messages are held in the worker's memory outside prefetch and delivered again after the visibility
timeout (celery#4766, celery#8069, kombu#337).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from contracts import keys, retry
from contracts.logging import get_logger

log = get_logger(__name__)
MOVER_PERIOD_S = 0.2
Send = Callable[[dict[str, Any]], None]

# KEYS: parked, payloads. ARGV: task id. The one mover that removes it gets the message.
_UNPARK_LUA = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  local payload = redis.call('HGET', KEYS[2], ARGV[1])
  redis.call('HDEL', KEYS[2], ARGV[1])
  return payload
end
return false
"""


class ParkingLot:
    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._unpark = client.register_script(_UNPARK_LUA)
        self._stop = threading.Event()
        self._mover: threading.Thread | None = None

    def park(self, task_id: str, message: dict[str, Any], due_in_s: float) -> None:
        pipe = self.client.pipeline()
        pipe.hset(keys.PARKED_PAYLOADS, task_id, json.dumps(message))
        pipe.zadd(keys.PARKED, {task_id: int((time.time() + due_in_s) * 1000)})
        pipe.execute()

    def start(self, send: Send) -> None:
        """Start the thread that puts due parked tasks back on the queue (every worker runs one)."""
        if self._mover is None:
            self._mover = threading.Thread(target=self._move_loop, args=(send,), name="qvq-flow-mover", daemon=True)
            self._mover.start()

    def stop(self) -> None:
        self._stop.set()

    def move_due(self, send: Send) -> int:
        """Re-enqueue the parked tasks that are due; returns how many this process moved."""
        moved = 0
        for raw_id in self.client.zrangebyscore(keys.PARKED, "-inf", int(time.time() * 1000), start=0, num=100):
            task_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
            raw = self._unpark(keys=[keys.PARKED, keys.PARKED_PAYLOADS], args=[task_id])
            if not raw:
                continue  # another worker's mover won it
            try:
                send(json.loads(raw))
                moved += 1
            except Exception as exc:  # keep it parked; the next pass tries again
                log.warning("flow.unpark_failed", task_id=task_id, error=str(exc))
                self.park(task_id, json.loads(raw), retry.LOOP_ERROR_PAUSE_S)
        return moved

    def _move_loop(self, send: Send) -> None:
        while not self._stop.wait(MOVER_PERIOD_S):
            try:
                self.move_due(send)
            except Exception as exc:  # Redis away, a damaged payload: the mover must outlive any of them
                log.warning("flow.mover_failed", error=f"{type(exc).__name__}: {exc}")
