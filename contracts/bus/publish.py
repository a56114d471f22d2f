"""Publishing one event, shared by the sync and async buses: the Lua script (seq, replay log and pub/sub
in one atomic round trip) and its arguments."""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from contracts import keys

# KEYS: seq counter, replay log, channel. ARGV: the event JSON without its opening "{", TTL seconds,
# the seq floor. The seq is spliced in as the first field so an event is built once, in Python, and
# never re-encoded. The floor (the highest seq the caller knows of) keeps seq from going back when
# Redis lost the counter (restarted without persistence).
PUBLISH_LUA = """
local seq = redis.call('INCR', KEYS[1])
local floor = tonumber(ARGV[3] or '0') or 0
if seq <= floor then
  seq = floor + 1
  redis.call('SET', KEYS[1], seq)
end
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


def publish_args(task_id: str, type_: str, attempt: int, fields: dict[str, Any]) -> tuple[list[str], str]:
    """The script's keys and its event argument for one event."""
    body = {"task_id": task_id, "type": type_, "ts": time.time(), "attempt": attempt, **fields}
    encoded = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
    return [keys.seq_key(task_id), keys.log_key(task_id), keys.channel(task_id)], encoded[1:]


def is_subscribe_confirmation(message: dict[str, Any] | None) -> bool:
    return message is not None and message.get("type") == "subscribe"
