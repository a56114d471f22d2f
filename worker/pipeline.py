"""One task, start to finish: fetch and validate the images, stream QVQ with retries, persist, publish.

Plain code, testable without a broker; the Celery task only calls `run_task`.

Reliability rules (README, Guarantees):
- a delivery runs the task only while it holds the task's lease (worker/lease.py); a second delivery
  of a task that a live worker is running waits for it to end and is then dropped;
- every run is a new attempt (same task id, seq continues); the attempt cap counts from the last
  manual retry (`retry_base`);
- a failed publish never blocks persistence: deltas are skipped, the terminal event is retried;
- the terminal write (store.finish) is retried through a short database outage; a longer one raises
  StoreUnavailable, and the Celery task puts the message back for a later attempt.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import random
import time
from collections.abc import Callable
from typing import Any

import redis
import sqlalchemy as sa
import structlog

from contracts import events as ev
from contracts.catalog import cost
from contracts.errors import InternalError, ModelError, QvqError
from contracts.job import JobRequest
from contracts.logging import get_logger
from contracts.store import CANCELLED, COMPLETED, FAILED, Outcome
from worker import callback
from worker.coalesce import DeltaCoalescer
from worker.context import WorkerContext
from worker.flow import ModelCall
from worker.images import PreparedImage, prepare_images
from worker.lease import Lease
from worker.model import StreamResult, StreamStopped
from worker.prompt import build_messages, check_token_budget

log = get_logger(__name__)
DELTA_EVENT = {"reasoning": ev.REASONING_DELTA, "answer": ev.ANSWER_DELTA}
PRESIGNED_URL_TTL_S = 3600  # long enough for the service to fetch it, even after retries
SUPERSEDED = "superseded"  # another delivery took the task over; this run wrote nothing

#: Database errors worth retrying (connection lost, server gone, SQLite busy); others are bugs.
TRANSIENT_DB_ERRORS = (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError)
#: Waits between tries of the terminal write (about half a minute in all), then StoreUnavailable.
PERSIST_RETRY_DELAYS_S: tuple[float, ...] = (0.2, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0)
#: Waits between tries of a terminal publish (the result is already persisted).
TERMINAL_PUBLISH_DELAYS_S: tuple[float, ...] = (0.1, 0.3, 1.0, 2.0)
#: After a failed publish, skip non-terminal events this long instead of waiting on Redis each time.
EVENTS_BACKOFF_S = 2.0


class StoreUnavailable(Exception):
    """The database could not be reached: nothing terminal was written; run the task again later."""


def run_task(payload: dict[str, Any], ctx: WorkerContext) -> str | None:
    """Run a job to one terminal state; returns that state, or None when it was already terminal."""
    job = JobRequest.from_payload(payload)
    with structlog.contextvars.bound_contextvars(task_id=job.task_id, model=job.model):
        run = TaskRun(job, ctx)
        if ctx.flow is None:
            return run.run()
        # >>> flow control hook 1 (worker/flow.py): hold a tenant slot for the run, or park the task
        # (acknowledged; a mover puts it back on the queue when due) and return without running it.
        with ctx.flow.admitted(job, payload, run._publish) as admitted:
            return run.run() if admitted else None
        # <<< flow control hook 1


class TaskRun:
    def __init__(self, job: JobRequest, ctx: WorkerContext) -> None:
        self.job = job
        self.ctx = ctx
        self.task_id = job.task_id
        self.attempt = 0
        self.retry_base = 0
        self.started = time.time()
        self.images: list[PreparedImage] = []
        self.partial = StreamResult()
        self._events_down_until = 0.0
        self._waited_since: float | None = None  # when this delivery began waiting for another's lease
        self.input_tokens = 0  # the counted input of the model call (check_token_budget), for flow control

    def run(self) -> str | None:
        lease = self._take_lease()
        if lease is None:
            return None
        try:
            return self._run_leased(lease)
        finally:
            self.ctx.leases.release(lease)

    def _take_lease(self) -> Lease | None:
        """This delivery's right to run the task; None when the task ended while another delivery ran it."""
        poll_s = min(1.0, max(0.05, self.ctx.settings.lease_ttl_s / 4))
        while True:
            lease = self.ctx.leases.try_acquire(self.task_id)
            if lease is not None:
                return lease
            record = self._store_call(self.ctx.store.get, self.task_id)
            if record is None or record.is_terminal:
                log.info("task.duplicate_delivery_dropped", status=record.status if record else None)
                return None
            if self._waited_since is None:
                self._waited_since = time.monotonic()
                log.info("task.duplicate_delivery_waiting", holder=self.ctx.leases.holder(self.task_id))
            time.sleep(poll_s)

    def _run_leased(self, lease: Lease) -> str | None:
        start = self._store_call(self.ctx.store.begin_attempt, self.task_id)
        if start is None:
            if self._waited_since is not None:  # the run it waited for ended and let go of the lease
                log.info("task.duplicate_delivery_dropped", status="terminal")
            else:
                log.info("task.skipped", reason="already terminal")
            return None
        self.attempt, self.retry_base = start.number, start.retry_base
        if start.resumed:
            waited = None if self._waited_since is None else round(time.monotonic() - self._waited_since, 3)
            log.warning("task.resumed", attempt=self.attempt, waited_for_lease_s=waited,
                        reason="the previous delivery's worker was lost before the task ended")
        watch = self.ctx.cancels.register(self.task_id, self.ctx.settings.task_timeout_s)
        lease.on_lost = watch.supersede
        if lease.lost:
            watch.supersede()
        try:
            outcome = self._run(watch)
        finally:
            self.ctx.cancels.unregister(self.task_id)
        log.info("task.finished", status=outcome, attempt=self.attempt,
                 duration_s=round(time.time() - self.started, 3))
        return outcome

    @property
    def attempts_since_retry(self) -> int:
        return self.attempt - self.retry_base

    def _run(self, watch: Any) -> str:
        if self.attempts_since_retry > self.ctx.settings.max_attempts:
            return self._fail(InternalError(
                f"gave up after {self.attempts_since_retry - 1} attempts: the worker running it was lost "
                "each time", retryable=True))
        if watch.should_stop():
            return self._stop(watch)
        self._publish(ev.STARTED, worker=self.ctx.name)
        try:
            messages = self._prepare()
            result = self._stream_with_retries(messages, watch)
        except StreamStopped as stopped:
            self.partial = stopped.result
            return self._stop(watch)
        except StoreUnavailable:
            raise
        except QvqError as error:
            return self._fail(error)
        except Exception as exc:
            log.exception("task.crashed")
            return self._fail(InternalError(f"{type(exc).__name__}: {exc}"))
        return self._complete(result)

    # -- steps ---------------------------------------------------------------------------------
    def _prepare(self) -> list[dict[str, Any]]:
        job = self.job
        self.images = prepare_images(job.images, self.ctx.fetcher, high_resolution=job.high_resolution,
                                     executor=self.ctx.image_pool)
        summaries = [image.summary() for image in self.images]
        self._publish(ev.IMAGES_READY, images=summaries, image_tokens=sum(i.tokens for i in self.images))
        history = self._history()
        self.input_tokens = check_token_budget(job.model, job.prompt, self.images, history)
        return build_messages(job.prompt, self.images, history, url_for=self._image_url)

    def _image_url(self, image: PreparedImage) -> str:
        """Inline base64 by default; with QVQ_IMAGE_DELIVERY=presigned, an object we send unchanged
        goes as a presigned URL of the store (the service downloads it; the request stays small)."""
        unchanged = len(image.data) == image.bytes and (image.sent_width, image.sent_height) == (
            image.width, image.height)
        if self.ctx.settings.image_delivery == "presigned" and unchanged:
            url = self.ctx.fetcher.presigned_url(image.ref, PRESIGNED_URL_TTL_S)
            if url:
                return url
        return image.data_url()

    def _history(self) -> list[tuple[str, str]]:
        if not self.job.conversation_id:
            return []
        before = dt.datetime.fromtimestamp(self.job.enqueued_at, dt.UTC)
        return self._store_call(self.ctx.store.history, self.job.conversation_id, before)

    def _stream_with_retries(self, messages: list[dict[str, Any]], watch: Any) -> StreamResult:
        settings = self.ctx.settings
        while True:
            coalescer = DeltaCoalescer(self._emit_delta, max_delay_s=settings.coalesce_ms / 1000,
                                       max_chars=settings.coalesce_chars)
            try:
                # >>> flow control hook 2 (worker/flow.py): budget reservation, tenant rate and model
                # quota before the call (may wait, publishing task.waiting; BudgetError: no call);
                # after it, the ledger row and the settlements, whatever the outcome.
                with self._model_call(watch) as call:
                    result = self.ctx.model.stream(
                        model=self.job.model, messages=messages, high_resolution=self.job.high_resolution,
                        attempt=self.attempt, on_text=call.tap(_delta_sink(coalescer)),
                        should_stop=watch.should_stop, on_open=call.on_open(watch.attach),
                    )
                    call.finished(result)
                # <<< flow control hook 2
                coalescer.flush()
                return result
            except StreamStopped:
                coalescer.flush()
                raise
            except ModelError as error:
                coalescer.discard()
                self._before_retry(error, watch)

    def _model_call(self, watch: Any) -> contextlib.AbstractContextManager[ModelCall]:
        """Flow control around one model call (hook 2); a pass-through when there is none."""
        if self.ctx.flow is None:
            return contextlib.nullcontext(ModelCall(self.input_tokens))
        return self.ctx.flow.model_call(self.job, self.attempt, self.input_tokens, watch.should_stop, self._publish)

    def _before_retry(self, error: ModelError, watch: Any) -> None:
        """Publish task.retrying and wait, or re-raise when the error is final."""
        settings = self.ctx.settings
        if not error.retryable or self.attempts_since_retry >= settings.max_attempts:
            raise error
        delay = backoff_s(self.attempts_since_retry, error.retry_after_s, settings.retry_base_s,
                          settings.retry_max_s)
        if delay >= watch.remaining_s():  # waiting would run past the time limit: fail with this error
            log.warning("model.retry_past_time_limit", code=error.code, delay_s=delay)
            raise error
        next_attempt = self._store_call(self.ctx.store.start_attempt, self.task_id)
        if next_attempt is None:  # finished elsewhere meanwhile (cancelled while queued for a retry)
            raise StreamStopped(StreamResult())
        self.attempt = next_attempt
        log.warning("model.retrying", code=error.code, error=error.message, delay_s=delay, attempt=next_attempt)
        self._publish(ev.RETRYING, important=True, error={"code": error.code, "message": error.message},
                      delay_s=delay)
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline:
            if watch.should_stop():
                raise StreamStopped(StreamResult())
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    # -- terminal states -----------------------------------------------------------------------
    def _complete(self, result: StreamResult) -> str:
        usage = result.usage or {}
        bill = cost(self.job.model, int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0)))
        timings = self._timings(result)
        outcome = Outcome(status=COMPLETED, attempt=self.attempt, reasoning=result.reasoning,
                          answer=result.answer, images=self._summaries(), usage=usage, cost=bill,
                          timings=timings)
        if self._finish(outcome):
            self._publish_terminal(ev.COMPLETED, reasoning=result.reasoning, answer=result.answer, usage=usage,
                                   cost=bill, timings=timings, metadata=self.job.metadata)
        return COMPLETED

    def _fail(self, error: QvqError) -> str:
        log.warning("task.failed", code=error.code, error=error.message)
        outcome = Outcome(status=FAILED, attempt=self.attempt, error_code=error.code,
                          error_message=error.message, images=self._summaries() or None,
                          timings=self._timings(None))
        if self._finish(outcome):
            self._publish_terminal(ev.FAILED, error=error.to_dict())
        return FAILED

    def _stop(self, watch: Any) -> str:
        if watch.superseded and not watch.cancelled:
            log.warning("task.superseded", attempt=self.attempt,
                        reason="another delivery took the lease over; this attempt writes nothing")
            return SUPERSEDED
        if watch.cancelled or not watch.timed_out:
            outcome = Outcome(status=CANCELLED, attempt=self.attempt, reasoning=self.partial.finish().reasoning,
                              answer=self.partial.answer, images=self._summaries() or None,
                              timings=self._timings(self.partial))
            if self._finish(outcome):
                self._publish_terminal(ev.CANCELLED)
            return CANCELLED
        limit = self.ctx.settings.task_timeout_s
        return self._fail(ModelError(f"the task ran past its time limit of {limit:g} s (QVQ_TASK_TIMEOUT_S)",
                                     code="model.timeout", retryable=False))

    # -- persistence ---------------------------------------------------------------------------
    def _store_call(self, call: Callable[..., Any], *args: Any) -> Any:
        """A store read or attempt count; StoreUnavailable when the database cannot be reached."""
        try:
            return call(*args)
        except TRANSIENT_DB_ERRORS as exc:
            raise StoreUnavailable(f"the database is unavailable: {type(exc).__name__}: {exc}") from exc

    def _finish(self, outcome: Outcome) -> bool:
        """The terminal claim, retried through a short database outage; True when this run made it."""
        failures = 0
        for delay in (*PERSIST_RETRY_DELAYS_S, None):
            try:
                claimed = self.ctx.store.finish(self.task_id, outcome)
            except TRANSIENT_DB_ERRORS as exc:
                failures += 1
                if delay is None:
                    log.error("store.finish_gave_up", error=str(exc), tries=failures)
                    raise StoreUnavailable(f"cannot persist the result: {type(exc).__name__}: {exc}") from exc
                log.warning("store.finish_failed", error=str(exc), retry_in_s=delay)
                time.sleep(delay)
                continue
            if not claimed and failures:
                # A try that raised may have committed before its connection broke: then it is ours.
                record = self.ctx.store.get(self.task_id)
                claimed = bool(record and record.status == outcome.status and record.attempts == self.attempt)
            if not claimed:
                log.info("task.already_terminal", status=outcome.status)
            return claimed
        raise AssertionError("unreachable")

    # -- events --------------------------------------------------------------------------------
    def _publish(self, type_: str, *, important: bool = False, **fields: Any) -> int | None:
        """Publish a non-terminal event; a failure is logged and the event skipped (important ones:
        task.retrying, which voids text on screens, get a few quick tries first)."""
        if not important and time.monotonic() < self._events_down_until:
            return None
        for delay in ((0.05, 0.2) if important else ()) + (None,):
            try:
                return self.ctx.bus.publish(self.task_id, type_, self.attempt, **fields)
            except (redis.RedisError, OSError) as exc:
                if delay is None:
                    self._events_down_until = time.monotonic() + EVENTS_BACKOFF_S
                    log.warning("event.publish_skipped", type=type_, error=str(exc))
                    return None
                time.sleep(delay)
        return None

    def _publish_terminal(self, type_: str, **fields: Any) -> int | None:
        """Publish the terminal event (already persisted) and POST it to the job's callback_url."""
        seq = self._publish_terminal_event(type_, **fields)
        if self.job.callback_url:
            event = {"seq": seq, "task_id": self.task_id, "type": type_, "ts": time.time(),
                     "attempt": self.attempt, **fields}
            settings = self.ctx.settings
            callback.deliver(self.job.callback_url, event, secret=settings.webhook_secret,
                             allow_private=settings.allow_private_urls)
        return seq

    def _publish_terminal_event(self, type_: str, **fields: Any) -> int | None:
        """Publish the terminal event, retrying a few times; never raises."""
        for delay in (*TERMINAL_PUBLISH_DELAYS_S, None):
            try:
                return self.ctx.bus.publish(self.task_id, type_, self.attempt, **fields)
            except (redis.RedisError, OSError) as exc:
                if delay is None:
                    log.error("event.terminal_publish_failed", type=type_, error=str(exc))
                    return None
                log.warning("event.terminal_publish_retry", type=type_, error=str(exc), retry_in_s=delay)
                time.sleep(delay)
        return None

    # -- helpers -------------------------------------------------------------------------------
    def _emit_delta(self, type_: str, text: str) -> None:
        self._publish(type_, text=text)

    def _summaries(self) -> list[dict[str, Any]]:
        return [image.summary() for image in self.images]

    def _timings(self, result: StreamResult | None) -> dict[str, float | None]:
        def since_start(moment: float | None) -> float | None:
            return round(moment - self.started, 3) if moment else None

        return {
            "queue_s": round(max(0.0, self.started - self.job.enqueued_at), 3) if self.job.enqueued_at else None,
            "first_reasoning_s": since_start(result.first_reasoning_at if result else None),
            "first_answer_s": since_start(result.first_answer_at if result else None),
            "total_s": round(time.time() - self.started, 3),
        }


def _delta_sink(coalescer: DeltaCoalescer) -> Callable[[str, str], None]:
    def add(kind: str, text: str) -> None:
        coalescer.add(DELTA_EVENT[kind], text)

    return add


def backoff_s(attempt: int, retry_after_s: float | None, base_s: float, max_s: float) -> float:
    """The wait before the retry that follows failed attempt `attempt` (1, 2, ...).

    Exponential (base_s * 2^(attempt-1)), capped at max_s, with "equal jitter" (a uniform draw from
    the upper half) so workers that failed together do not retry together; never shorter than the
    service's Retry-After, even above max_s (the task's time limit bounds the wait: the pipeline
    fails at once rather than sleep past it).
    """
    ceiling = min(max_s, base_s * (2 ** (max(1, attempt) - 1)))
    delay = min(ceiling, round(random.uniform(ceiling / 2, ceiling), 3))
    if retry_after_s is not None and delay < retry_after_s:
        delay = math.ceil(retry_after_s * 1000) / 1000
    return delay
