"""Publishing one event, shared by the sync and async buses: the Lua script (seq, replay log and pub/sub
in one atomic round trip) and its arguments."""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from contracts import keys

# KEYS: seq counter, replay log, channel. ARGV: the event JSON without its opening "{", TTL seconds,
# the seq floor, the seqs to skip. The seq is spliced in as the first field so an event is built once,
# in Python, and never re-encoded. The floor (the highest seq the caller knows of) keeps seq from going
# back when Redis lost the counter (restarted without persistence). Skipping leaves a hole in seq where
# events were lost (their publish failed), so every follower sees one and says so (`stream.gap`).
PUBLISH_LUA = """
local skip = tonumber(ARGV[4] or '0') or 0
local seq = redis.call('INCRBY', KEYS[1], 1 + skip)
local floor = tonumber(ARGV[3] or '0') or 0
if seq <= floor + skip then
  seq = floor + 1 + skip
  redis.call('SET', KEYS[1], seq)
end
local event = '{"seq":' .. seq .. ',' .. ARGV[1]
redis.call('XADD', KEYS[2], '*', 'event', event)
redis.call('PUBLISH', KEYS[3], event)
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return seq
"""

# A batch's event: the same append and publish, only when it is not older than the last one published
# (KEYS[4] holds its order, "<round> <done>"): two workers that tallied at nearly the same moment may
# publish in the other order, and a follower must never see `done` go back within a round. ARGV: the
# event without its "{", TTL seconds, the round, done, and "1" to publish whatever the order (the end).
BATCH_PUBLISH_LUA = """
local last = redis.call('GET', KEYS[4])
local round, done = tonumber(ARGV[3]), tonumber(ARGV[4])
if last and ARGV[5] ~= '1' then
  local last_round, last_done = string.match(last, '(%d+) (%d+)')
  last_round, last_done = tonumber(last_round), tonumber(last_done)
  if round < last_round or (round == last_round and done < last_done) then
    return 0
  end
end
redis.call('SET', KEYS[4], round .. ' ' .. done, 'EX', ARGV[2])
local seq = redis.call('INCR', KEYS[1])
local event = '{"seq":' .. seq .. ',' .. ARGV[1]
redis.call('XADD', KEYS[2], '*', 'event', event)
redis.call('PUBLISH', KEYS[3], event)
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return seq
"""

#: Errors after which a subscriber reconnects (Redis restarted, failed over, or dropped us).
RECONNECTABLE = (redis.ConnectionError, redis.TimeoutError)
CONFIRM_S = 5.0  # how long to wait for the server to confirm a subscription before reading the log


MAX_LOST_TASKS = 100_000  # bounds the memory of the set below


class LostEvents:
    """The tasks whose last publish failed (or was skipped): their next event leaves a hole in seq.
    Thread-safe enough for its use: set operations are atomic under the GIL."""

    def __init__(self) -> None:
        self._tasks: set[str] = set()

    def note(self, task_id: str) -> None:
        if len(self._tasks) >= MAX_LOST_TASKS:  # tasks that never published again (a long Redis outage)
            self._tasks.clear()
        self._tasks.add(task_id)

    def take(self, task_id: str) -> int:
        """The seqs to skip for this task's next event (1 after a loss, else 0); the loss is consumed."""
        if task_id in self._tasks:
            self._tasks.discard(task_id)
            return 1
        return 0


def publish_args(task_id: str, type_: str, attempt: int, fields: dict[str, Any]) -> tuple[list[str], str]:
    """The script's keys and its event argument for one event."""
    body = {"task_id": task_id, "type": type_, "ts": time.time(), "attempt": attempt, **fields}
    encoded = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
    return [keys.seq_key(task_id), keys.log_key(task_id), keys.channel(task_id)], encoded[1:]


def batch_publish_args(batch_id: str, type_: str, fields: dict[str, Any]) -> tuple[list[str], str]:
    """The script's keys and its event argument for one event of a batch (contracts/batches.py)."""
    body = {"batch_id": batch_id, "type": type_, "ts": time.time(), **fields}
    encoded = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
    return [*keys.batch_stream_keys(batch_id), keys.batch_order_key(batch_id)], encoded[1:]


def is_subscribe_confirmation(message: dict[str, Any] | None) -> bool:
    return message is not None and message.get("type") == "subscribe"
