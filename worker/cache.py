"""The result cache (README, Result cache): a job asking `"cache": true` (or every job, QVQ_RESULT_CACHE=1)
whose request was answered before, within QVQ_RESULT_CACHE_TTL_S, completes at once with that answer:
`cached: true`, the paying task named in `cached_from`, no model call, a ledger row with outcome `cached`
and cost 0.

The key is the content, per tenant: a SHA-256 over the model, `high_resolution`, and the chat messages
with every image replaced by the SHA-256 of the bytes that would be sent (after validation and
downscaling), so the conversation's history counts and a re-upload of the same image under another
name hits. Redis holds `key -> task id` (keys.cache_key); the answer itself is the paying task's row.

Single flight: the first run of a key holds `keys.cache_flight_key` while it calls the model; identical
runs meanwhile wait (task.waiting, reason `identical_job`, on the worker's loop, no thread of their own
busy) until the answer is there, then complete from it; if the leader fails, one waiter takes the flight
over and calls the model itself.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

from contracts import events as ev
from contracts import keys
from contracts.job import JobRequest
from contracts.logging import get_logger
from contracts.retry import TRANSIENT_REDIS_ERRORS
from contracts.settings import Settings
from contracts.store import COMPLETED, Store, TaskRecord
from worker.intake.prompt import Turn, build_messages
from worker.persist import store_call

log = get_logger(__name__)
POLL_S = 0.2  # how often a waiter looks for the leader's answer
WAITING_NOTE_S = 5.0  # task.waiting is published again this often while the wait goes on


def content_key(job: JobRequest, images: Sequence[Any], history: Sequence[Turn]) -> str:
    """The request's content, hashed: model, resolution, and the messages with image bytes as hashes."""
    messages = build_messages(job.prompt, images, history,
                              url_for=lambda image: "sha256:" + hashlib.sha256(image.data).hexdigest())
    body = json.dumps([job.model, job.high_resolution, messages], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


class CacheLookup:
    """One run's use of the cache: find the answer, or lead the flight and remember the answer after."""

    def __init__(self, settings: Settings, client: Any, store: Store, job: JobRequest, key: str) -> None:
        self.settings = settings
        self.redis = client
        self.store = store
        self.job = job
        self.key = keys.cache_key(job.tenant, key)
        self.flight = keys.cache_flight_key(job.tenant, key)
        self.leading = False

    def answer(self, wait: Callable[[float], None], publish: Callable[..., Any],
               remaining_s: Callable[[], float]) -> TaskRecord | None:
        """The cached answer's task, waiting for an identical run in flight; None when this run must call
        the model (it then leads the flight). `wait` raises StreamStopped when the run is stopped."""
        next_note = 0.0
        while True:
            found = self._cached()
            if found is not None:
                return found
            if self._lead():
                return None
            if time.monotonic() >= next_note:
                publish(ev.WAITING, reason=ev.IDENTICAL_JOB, wait_s=round(min(remaining_s(), WAITING_NOTE_S), 1))
                next_note = time.monotonic() + WAITING_NOTE_S
            wait(POLL_S)

    def _cached(self) -> TaskRecord | None:
        try:
            source = self.redis.get(self.key)
        except TRANSIENT_REDIS_ERRORS as exc:
            log.warning("cache.unavailable", error=type(exc).__name__)
            return None
        if not source:
            return None
        record: TaskRecord | None = store_call(self.store.get, source.decode() if isinstance(source, bytes) else source)
        if record is None or record.status != COMPLETED or record.tenant != self.job.tenant or not record.answer:
            return None
        return record

    def _lead(self) -> bool:
        try:
            self.leading = bool(self.redis.set(self.flight, self.job.task_id, nx=True,
                                               px=int(self.settings.task_timeout_s * 1000)))
        except TRANSIENT_REDIS_ERRORS:
            self.leading = True  # no cache without Redis: this run calls the model
        return self.leading

    def remember(self, task_id: str) -> None:
        """The completed answer of this run is the key's, for QVQ_RESULT_CACHE_TTL_S; the flight ends."""
        try:
            self.redis.set(self.key, task_id, ex=self.settings.result_cache_ttl_s)
        except TRANSIENT_REDIS_ERRORS as exc:
            log.warning("cache.remember_failed", error=type(exc).__name__)
        self.release()

    def release(self) -> None:
        """End this run's flight (its answer is remembered, or it failed: a waiter takes over)."""
        if not self.leading:
            return
        self.leading = False
        try:
            if self.redis.get(self.flight) in (self.job.task_id, self.job.task_id.encode()):
                self.redis.delete(self.flight)
        except TRANSIENT_REDIS_ERRORS:
            pass  # the flight expires with the task's time limit
