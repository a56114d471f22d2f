"""One task, start to finish, as a list of steps: each step keeps its own retries and bookkeeping.

    message -> row (worker/intake/message.py) -> lease -> count the attempt -> started -> prepare the images
    -> stream (retrying the model) -> persist (DATABASE policy) -> publish the terminal event
    (TERMINAL_PUBLISH policy) -> callback

The Celery task's thread runs the short steps; every wait (the model stream, a quota or rate wait, a
retry's backoff) runs on the worker's event loop (worker/loop.py) while the thread parks on a future.

Plain code, testable without a broker; the Celery task only calls `run_task`.

Reliability rules (README, Guarantees):
- the worker runs the request stored in the task row, never one carried by a queue message;
- a delivery runs the task only while it holds the task's lease (worker/recovery/lease.py); a second delivery
  of a task that a live worker is running waits for it to end and is then dropped;
- every run is a new attempt (same task id, seq continues); the attempt cap counts from the last
  manual retry (`retry_base`);
- a failed publish never blocks persistence: deltas are skipped, the terminal event is retried;
- the terminal write (store.finish) is retried through a short database outage; a longer one raises
  StoreUnavailable, and the Celery task puts the message back for a later attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from collections.abc import Callable
from typing import Any

import structlog

from contracts import events as ev
from contracts import retry, tracing
from contracts.catalog import cost
from contracts.errors import (
    InternalError,
    ModelError,
    QvqError,
    StoreRejected,
    StoreUnavailable,
    StreamStopped,
)
from contracts.job import JobRequest
from contracts.logging import get_logger
from contracts.retry import TRANSIENT_DB_ERRORS, TRANSIENT_REDIS_ERRORS
from contracts.store import CANCELLED, COMPLETED, FAILED, HistoryTurn, Outcome
from worker.batches import admit_item
from worker.batches import item_ended as batch_item_ended
from worker.cache import CacheLookup, content_key
from worker.callbacks.deliveries import schedule as schedule_callback
from worker.context import WorkerContext
from worker.flow.control import ModelCall
from worker.intake.history import prepare_conversation
from worker.intake.images import PreparedImage
from worker.intake.message import load_record
from worker.intake.prompt import build_messages, check_token_budget
from worker.loop import cpu_gate
from worker.persist import persist, store_call
from worker.recovery.cancel import RunWatch, wait_unless_stopped
from worker.recovery.lease import Lease
from worker.stream.coalesce import DeltaCoalescer
from worker.stream.model import StreamResult

log = get_logger(__name__)
DELTA_EVENT = {"reasoning": ev.REASONING_DELTA, "answer": ev.ANSWER_DELTA}
PRESIGNED_URL_TTL_S = 3600  # long enough for the service to fetch it, even after retries
SUPERSEDED = "superseded"  # another delivery took the task over (or the worker handed it back): nothing written
REJECTED = "rejected"  # the message did not match its task row: acknowledged, never run


def run_task(message: dict[str, Any], ctx: WorkerContext, *, delivery_id: str | None = None) -> str | None:
    """Run the task a queue message names to one terminal state; returns that state, REJECTED for a
    message that does not match its row, or None when the task was already terminal."""
    record = cpu_gate.gated(store_call)(load_record, message, ctx.store, delivery_id=delivery_id)
    if record is None:
        return REJECTED
    job = JobRequest.from_payload(record.request)
    with tracing.continued(job.trace, "qvq.run", task_id=job.task_id, model=job.model, tenant=job.tenant or "",
                           run=record.run) as span, structlog.contextvars.bound_contextvars(
            task_id=job.task_id, model=job.model, **tracing.log_fields(span, job.trace)):
        run = TaskRun(job, ctx, seq_floor=record.last_seq)
        if ctx.flow is None:
            return run.run()
        # Flow control (worker/flow/): hold a tenant slot for the run, or park the task (acknowledged;
        # a mover puts it back on the queue when due) and return without running it.
        with ctx.flow.admitted(job, message, run._publish) as admitted:
            return run.run() if admitted else None


class TaskRun:
    def __init__(self, job: JobRequest, ctx: WorkerContext, *, seq_floor: int = 0) -> None:
        self.job = job
        self.seq_floor = seq_floor  # the row's last_seq: seq never goes back, even if Redis lost its counter
        self.ctx = ctx
        self.task_id = job.task_id
        self.attempt = 0
        self.retry_base = 0
        self.started = time.time()
        self.images: list[PreparedImage] = []
        self.partial = StreamResult()
        self.last_seq = 0  # the highest seq this run published
        self._events_down_until = 0.0
        self._waited_since: float | None = None  # when this delivery began waiting for another's lease
        self.input_tokens = 0  # the counted input of the model call (check_token_budget), for flow control
        self.cache: CacheLookup | None = None  # the result cache, when the job asks for it (worker/cache.py)
        self._last_delta: asyncio.Future[int] | None = None  # the latest delta queued on the loop

    # -- the run -------------------------------------------------------------------------------
    def run(self) -> str | None:
        lease = self._take_lease()
        if lease is None:
            return SUPERSEDED if self.ctx.leases.handing_back else None
        try:
            return self._run_leased(lease)
        finally:
            self.ctx.leases.release(lease)

    def _run_leased(self, lease: Lease) -> str | None:
        if not self._begin_attempt():
            return None
        watch = self.ctx.cancels.register(self.task_id, self.ctx.settings.task_timeout_s)
        lease.on_lost = watch.supersede
        if lease.lost:
            watch.supersede()
        try:
            outcome = self._steps(watch)
        finally:
            self.ctx.cancels.unregister(self.task_id)
            if self.cache is not None:  # a flight this run led ends: a waiter takes over, or reads the answer
                self.cache.release()
        log.info("task.finished", status=outcome, attempt=self.attempt,
                 duration_s=round(time.time() - self.started, 3))
        return outcome

    def _steps(self, watch: RunWatch) -> str:
        if self.attempts_since_retry > self.ctx.settings.max_attempts:
            return self._fail(InternalError(
                f"gave up after {self.attempts_since_retry - 1} attempts: the worker running it was lost "
                "each time", retryable=True))
        if watch.should_stop():
            return self._stop(watch)
        self._publish(ev.STARTED, worker=self.ctx.name)
        cached_from = None
        try:
            admit_item(self.ctx, self.job, watch)
            messages, estimate = self._prepare()
            result, cached_from = self._cached(watch)
            if result is None:
                result = self._stream(messages, estimate, watch)
        except StreamStopped as stopped:
            self.partial = stopped.result or StreamResult()
            return self._stop(watch)
        except StoreUnavailable:
            raise
        except QvqError as error:
            return self._fail(error)
        except Exception as exc:
            log.exception("task.crashed")
            return self._fail(InternalError(f"{type(exc).__name__}: {exc}"))
        return self._complete(result, cached_from)

    @property
    def attempts_since_retry(self) -> int:
        return self.attempt - self.retry_base

    # -- step: the lease -----------------------------------------------------------------------
    def _take_lease(self) -> Lease | None:
        """This delivery's right to run the task; None when the task ended while another delivery ran it."""
        poll_s = min(1.0, max(0.05, self.ctx.settings.lease_ttl_s / 4))
        while True:
            lease = self.ctx.leases.try_acquire(self.task_id)
            if lease is not None:
                return lease
            record = store_call(self.ctx.store.get, self.task_id)
            if record is None or record.is_terminal:
                log.info("task.duplicate_delivery_dropped", status=record.status if record else None)
                return None
            if self.ctx.leases.handing_back:  # shutting down: this copy goes back to the queue
                return None
            if self._waited_since is None:
                self._waited_since = time.monotonic()
                log.info("task.duplicate_delivery_waiting", holder=self.ctx.leases.holder(self.task_id))
            time.sleep(poll_s)

    # -- step: count the attempt ---------------------------------------------------------------
    @cpu_gate.gated
    def _begin_attempt(self) -> bool:
        """Count this attempt (the task is running); False when it is already terminal."""
        start = store_call(self.ctx.store.begin_attempt, self.task_id)
        if start is None:
            if self._waited_since is not None:  # the run it waited for ended and let go of the lease
                log.info("task.duplicate_delivery_dropped", status="terminal")
            else:
                log.info("task.skipped", reason="already terminal")
            return False
        self.attempt, self.retry_base = start.number, start.retry_base
        if start.resumed:
            waited = None if self._waited_since is None else round(time.monotonic() - self._waited_since, 3)
            log.warning("task.resumed", attempt=self.attempt, waited_for_lease_s=waited,
                        reason="the previous delivery's worker was lost before the task ended")
        return True

    # -- step: the images and the messages ------------------------------------------------------
    @tracing.spanned("qvq.images")
    def _prepare(self) -> tuple[list[dict[str, Any]], int]:
        """The chat messages and the estimated input tokens (refused here when over the model's input).
        A conversation's earlier turns go whole, their images fetched and validated again (history.py)."""
        job = self.job
        prepared = prepare_conversation(job, self._history(), self.ctx.fetcher, self.ctx.image_pool)
        history, self.images, shown = prepared.history, prepared.images, prepared.summaries
        self._publish(ev.IMAGES_READY, images=shown, image_tokens=prepared.tokens)
        estimate = self.input_tokens = check_token_budget(job.model, job.prompt, self.images, history)
        if job.cache or self.ctx.settings.result_cache:
            self.cache = CacheLookup(self.ctx.settings, self.ctx.redis, self.ctx.store, job,
                                     content_key(job, self.images, history))
        return build_messages(job.prompt, self.images, history, url_for=self._image_url), estimate

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

    def _history(self) -> list[HistoryTurn]:
        if not self.job.conversation_id:
            return []
        before = dt.datetime.fromtimestamp(self.job.enqueued_at, dt.UTC)
        return store_call(self.ctx.store.history, self.job.conversation_id, before,  # type: ignore[no-any-return]
                           self.job.tenant)

    def _cached(self, watch: RunWatch) -> tuple[StreamResult | None, str | None]:
        """The cached answer and the task it came from, when the cache has it (an identical job in
        flight is waited for); (None, None): call the model."""
        source = self.cache.answer(lambda seconds: self._wait(seconds, watch), self._publish,
                                   watch.remaining_s) if self.cache else None
        if source is None:
            return None, None
        usage = {name: value for name, value in (source.usage or {}).items() if name != "billed"}
        return StreamResult(reasoning=source.reasoning or "", answer=source.answer or "", usage=usage), source.id

    # -- step: the stream, retried ---------------------------------------------------------------
    def _stream(self, messages: list[dict[str, Any]], estimate: int, watch: RunWatch) -> StreamResult:
        """Stream the answer; a retryable model error publishes task.retrying, waits, and tries again
        (delays from contracts/retry.MODEL); the text of a failed attempt is void."""
        while True:
            try:
                return self._call_model(messages, estimate, watch)
            except ModelError as error:
                self._before_retry(error, watch)

    def _call_model(self, messages: list[dict[str, Any]], estimate: int, watch: RunWatch) -> StreamResult:
        """The one call site of the model, inside flow control (worker/flow/): the budget reservation,
        tenant rate and model quota before the call (may wait, publishing task.waiting; BudgetError: no
        call); the ledger row and the settlements after it, whatever the outcome. The call itself runs
        on the worker's loop; this thread waits for it without doing anything."""
        with self._model_call(watch) as call:
            result = self.ctx.loop.run(self._attempt(messages, estimate, call, watch))
            call.finished(result)
        return result

    async def _attempt(self, messages: list[dict[str, Any]], estimate: int, call: ModelCall,
                       watch: RunWatch) -> StreamResult:
        """One model call, on the loop: its text coalesced into deltas (loop timers) and published without
        waiting (group commit); every delta is in Redis (or given up) before this returns, and nothing of
        this attempt follows (the coalescer is closed on any exit)."""
        settings = self.ctx.settings
        coalescer = DeltaCoalescer(self._emit_delta, max_delay_s=settings.coalesce_ms / 1000,
                                   max_chars=settings.coalesce_chars)
        try:
            with tracing.span("qvq.model_call", attempt=self.attempt):
                result = await self.ctx.model.stream(
                    model=self.job.model, messages=messages, high_resolution=self.job.high_resolution,
                    attempt=self.attempt, on_text=call.tap(_delta_sink(coalescer)), should_stop=watch.should_stop,
                    on_open=call.on_open(watch.attach), prompt_tokens_estimate=estimate, trace=self.job.trace)
            coalescer.flush()
            return result
        except StreamStopped:
            coalescer.flush()
            raise
        except ModelError:
            coalescer.discard()
            raise
        finally:
            coalescer.close()
            await self._deltas_sent()

    def _model_call(self, watch: RunWatch) -> contextlib.AbstractContextManager[ModelCall]:
        """Flow control around one model call (hook 2); a pass-through when there is none."""
        if self.ctx.flow is None:
            return contextlib.nullcontext(ModelCall(self.input_tokens))
        return self.ctx.flow.model_call(self.job, self.attempt, self.input_tokens, watch.should_stop, self._publish,
                                        sleep=lambda seconds: self._wait(seconds, watch))

    def _wait(self, seconds: float, watch: RunWatch) -> None:
        """Wait on the loop (this thread parks on a future); StreamStopped when the run is stopped."""
        self.ctx.loop.run(wait_unless_stopped(seconds, watch))

    def _before_retry(self, error: ModelError, watch: RunWatch) -> None:
        """Publish task.retrying and wait, or re-raise when the error is final."""
        settings = self.ctx.settings
        if not error.retryable or self.attempts_since_retry >= settings.max_attempts:
            raise error
        backoff = retry.MODEL.with_limits(settings.retry_base_s, settings.retry_max_s)
        delay = backoff.delay(self.attempts_since_retry, error.retry_after_s)
        if delay >= watch.remaining_s():  # waiting would run past the time limit: fail with this error
            log.warning("model.retry_past_time_limit", code=error.code, delay_s=delay)
            raise error
        next_attempt = store_call(self.ctx.store.start_attempt, self.task_id)
        if next_attempt is None:  # finished elsewhere meanwhile (cancelled while queued for a retry)
            raise StreamStopped(StreamResult())
        self.attempt = next_attempt
        log.warning("model.retrying", code=error.code, error=error.message, delay_s=delay, attempt=next_attempt)
        self._publish(ev.RETRYING, important=True, error={"code": error.code, "message": error.message},
                      delay_s=delay)
        # Celery monitoring (Flower) sees the model-call retry as task-retried, with the attempt about to run
        self.ctx.task_event("task-retried", exception=f"{error.code}: {error.message}", traceback="",
                            attempt=next_attempt, delay_s=delay)
        self._wait(delay, watch)

    # -- the terminal states: persist, then publish ----------------------------------------------
    @cpu_gate.gated
    def _complete(self, result: StreamResult, cached_from: str | None = None) -> str:
        """End the run completed; `cached_from`: the answer is that task's, from the cache (billed 0)."""
        usage = result.usage or {}
        billed = (0, 0) if cached_from else (int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0)))
        bill = cost(self.job.model, *billed)
        timings = self._timings(result)
        outcome = self._outcome(COMPLETED, reasoning=result.reasoning, answer=result.answer, cached_from=cached_from,
                                images=self._summaries(), usage=usage, cost=bill, timings=timings)
        try:
            written = self._persist(outcome)
        except StoreRejected as error:  # the answer was billed: the failed row keeps its bill
            return self._fail(error, usage=usage, cost=bill)
        if written:  # the bill as the row has it: every billed attempt of the task, from the ledger
            if self.cache is not None and not cached_from:
                self.cache.remember(self.task_id)
            self._publish_terminal(ev.COMPLETED, reasoning=result.reasoning, answer=result.answer,
                                   usage=written["usage"], cost=written["cost"], timings=timings,
                                   metadata=self.job.metadata, cached=cached_from is not None, cached_from=cached_from)
        return COMPLETED

    @cpu_gate.gated
    def _fail(self, error: QvqError, **bill: Any) -> str:
        """End the run failed; `bill` (usage, cost) when the failed attempt was a billed answer."""
        log.warning("task.failed", code=error.code, error=error.message)
        outcome = self._outcome(FAILED, error_code=error.code, error_message=error.message,
                                images=self._summaries() or None, timings=self._timings(None), **bill)
        try:
            claimed = self._persist(outcome)
        except StoreRejected as rejected:  # even the failure's fields: keep only the code and the reason
            error = rejected
            claimed = self._persist(self._outcome(FAILED, error_code=error.code, error_message=error.message,
                                                  **bill))
        if claimed:
            self._publish_terminal(ev.FAILED, error=error.to_dict())
        return FAILED

    @cpu_gate.gated
    def _stop(self, watch: RunWatch) -> str:
        if watch.superseded and not watch.cancelled:
            log.warning("task.superseded", attempt=self.attempt,
                        reason="another delivery took the lease over, or the worker handed the task back; "
                               "this attempt writes nothing")
            return SUPERSEDED
        if watch.cancelled or not watch.timed_out:
            outcome = self._outcome(CANCELLED, reasoning=self.partial.finish().reasoning,
                                    answer=self.partial.answer, images=self._summaries() or None,
                                    timings=self._timings(self.partial))
            try:
                claimed = self._persist(outcome)
            except StoreRejected:  # the partial text could not be kept: cancelled without it
                claimed = self._persist(self._outcome(CANCELLED, timings=self._timings(self.partial)))
            if claimed:
                self._publish_terminal(ev.CANCELLED)
            return CANCELLED
        limit = self.ctx.settings.task_timeout_s
        return self._fail(ModelError(f"the task ran past its time limit of {limit:g} s (QVQ_TASK_TIMEOUT_S)",
                                     code="model.timeout", retryable=False))

    def _outcome(self, status: str, **fields: Any) -> Outcome:
        return Outcome(status=status, attempt=self.attempt, last_seq=self.last_seq, **fields)

    # -- step: persist -------------------------------------------------------------------------
    def _persist(self, outcome: Outcome) -> dict[str, Any] | None:
        with tracing.span("qvq.persist", status=outcome.status):
            return persist(self.ctx.store, self.task_id, outcome)

    # -- step: publish the terminal event and call back ----------------------------------------
    @tracing.spanned("qvq.publish")
    def _publish_terminal(self, type_: str, **fields: Any) -> int | None:
        """Publish the terminal event (already persisted), note its seq, POST it to the callback_url, and
        tell the batch (if any)."""
        seq = self._publish_terminal_event(type_, **fields)
        if seq is not None:
            self._note_seq(seq)
        if self.job.callback_url:
            event = {"seq": seq, "task_id": self.task_id, "type": type_, "ts": time.time(),
                     "attempt": self.attempt, **fields}
            schedule_callback(self.ctx, self.job.callback_url, event)
        batch_item_ended(self.ctx, self.job)
        return seq

    def _publish_terminal_event(self, type_: str, **fields: Any) -> int | None:
        """The terminal event, retried (retry.TERMINAL_PUBLISH); never raises (the sweep publishes it
        later from the row when Redis stayed away)."""
        try:
            return retry.TERMINAL_PUBLISH.call(self._publish_event, type_, **fields)
        except TRANSIENT_REDIS_ERRORS as exc:
            log.error("event.terminal_publish_failed", type=type_, error=str(exc))
            return None

    def _note_seq(self, seq: int) -> None:
        try:
            self.ctx.store.note_seq(self.task_id, seq)
        except TRANSIENT_DB_ERRORS as exc:  # only a floor for a Redis that lost its counters
            log.warning("store.note_seq_failed", error=str(exc))

    # -- events --------------------------------------------------------------------------------
    def _publish(self, type_: str, *, important: bool = False, **fields: Any) -> int | None:
        """Publish a non-terminal event; a failure is logged and the event skipped (important ones:
        task.retrying, which voids text on screens, get a few quick tries first)."""
        if not important and time.monotonic() < self._events_down_until:
            self.ctx.bus.note_lost(self.task_id)  # dropped untried: followers see the hole
            return None
        for delay in (retry.IMPORTANT_PUBLISH.delays if important else ()) + (None,):
            try:
                return self._publish_event(type_, **fields)
            except TRANSIENT_REDIS_ERRORS as exc:
                if delay is None:
                    self._events_down_until = time.monotonic() + retry.EVENTS_COOLDOWN_S
                    log.warning("event.publish_skipped", type=type_, error=str(exc))
                    return None
                time.sleep(delay)
        return None

    def _publish_event(self, type_: str, **fields: Any) -> int:
        """The one place this run publishes an event: above every seq the row or this run knows of,
        so seq never goes back even when Redis restarted without its counters."""
        seq = self.ctx.bus.publish(self.task_id, type_, self.attempt, seq_floor=max(self.seq_floor, self.last_seq),
                                   **fields)
        self.last_seq = max(self.last_seq, seq)
        return seq

    def _emit_delta(self, type_: str, text: str) -> None:
        """A delta, from the coalescer on the loop: queued, not waited for (as `_publish`, a failure is
        logged and the deltas skipped for a cooldown). The publisher keeps one queue in order, so only
        the latest delta's future is kept: once it is done, every earlier one is."""
        last = self._last_delta
        if last is not None and last.done():
            self._delta_done(last)
        if time.monotonic() < self._events_down_until:
            self.ctx.bus.note_lost(self.task_id)  # dropped untried: followers see the hole
            return
        self._last_delta = self.ctx.bus.publish_soon(self.task_id, type_, self.attempt,
                                                     seq_floor=max(self.seq_floor, self.last_seq), text=text)

    async def _deltas_sent(self) -> None:
        """Wait until every delta of this attempt is in Redis (or given up)."""
        last, self._last_delta = self._last_delta, None
        if last is not None:
            await asyncio.wait([last])
            self._delta_done(last)

    def _delta_done(self, future: asyncio.Future[int]) -> None:
        error = None if future.cancelled() else future.exception()
        if error is None and not future.cancelled():
            self.last_seq = max(self.last_seq, future.result())
        elif time.monotonic() >= self._events_down_until:
            self._events_down_until = time.monotonic() + retry.EVENTS_COOLDOWN_S
            log.warning("event.publish_skipped", type="delta", error=str(error))

    # -- helpers -------------------------------------------------------------------------------
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
