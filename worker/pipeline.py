"""One task, start to finish: fetch and validate the images, stream QVQ with retries, persist, publish.

Plain code, testable without a broker; the Celery task only calls `run_task`.
"""

from __future__ import annotations

import datetime as dt
import random
import time
from collections.abc import Callable
from typing import Any

import structlog

from contracts import events as ev
from contracts.catalog import cost
from contracts.errors import InternalError, ModelError, QvqError
from contracts.job import JobRequest
from contracts.logging import get_logger
from contracts.store import CANCELLED, COMPLETED, FAILED, Outcome
from worker.coalesce import DeltaCoalescer
from worker.context import WorkerContext
from worker.images import PreparedImage, prepare_images
from worker.model import StreamResult, StreamStopped
from worker.prompt import build_messages, check_token_budget

log = get_logger(__name__)
DELTA_EVENT = {"reasoning": ev.REASONING_DELTA, "answer": ev.ANSWER_DELTA}


def run_task(payload: dict[str, Any], ctx: WorkerContext) -> str | None:
    """Run a job to one terminal state; returns that state, or None when it was already terminal."""
    job = JobRequest.from_payload(payload)
    with structlog.contextvars.bound_contextvars(task_id=job.task_id, model=job.model):
        return TaskRun(job, ctx).run()


class TaskRun:
    def __init__(self, job: JobRequest, ctx: WorkerContext) -> None:
        self.job = job
        self.ctx = ctx
        self.task_id = job.task_id
        self.attempt = 0
        self.started = time.time()
        self.images: list[PreparedImage] = []
        self.partial = StreamResult()

    def run(self) -> str | None:
        attempt = self.ctx.store.start_attempt(self.task_id)
        if attempt is None:
            log.info("task.skipped", reason="already terminal")
            return None
        self.attempt = attempt
        watch = self.ctx.cancels.register(self.task_id, self.ctx.settings.task_timeout_s)
        try:
            outcome = self._run(watch)
        finally:
            self.ctx.cancels.unregister(self.task_id)
        log.info("task.finished", status=outcome, attempt=self.attempt,
                 duration_s=round(time.time() - self.started, 3))
        return outcome

    def _run(self, watch: Any) -> str:
        if self.attempt > self.ctx.settings.max_attempts:
            return self._fail(InternalError(
                f"gave up after {self.attempt - 1} attempts (the worker running it was lost each time)"))
        if watch.should_stop():
            return self._stop(watch)
        self._publish(ev.STARTED, worker=self.ctx.name)
        try:
            messages = self._prepare()
            result = self._stream_with_retries(messages, watch)
        except StreamStopped as stopped:
            self.partial = stopped.result
            return self._stop(watch)
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
        check_token_budget(job.model, job.prompt, self.images, history)
        return build_messages(job.prompt, self.images, history)

    def _history(self) -> list[tuple[str, str]]:
        if not self.job.conversation_id:
            return []
        before = dt.datetime.fromtimestamp(self.job.enqueued_at, dt.UTC)
        return self.ctx.store.history(self.job.conversation_id, before)

    def _stream_with_retries(self, messages: list[dict[str, Any]], watch: Any) -> StreamResult:
        settings = self.ctx.settings
        while True:
            coalescer = DeltaCoalescer(self._emit_delta, max_delay_s=settings.coalesce_ms / 1000,
                                       max_chars=settings.coalesce_chars)
            try:
                result = self.ctx.model.stream(
                    model=self.job.model, messages=messages, high_resolution=self.job.high_resolution,
                    attempt=self.attempt, on_text=_delta_sink(coalescer),
                    should_stop=watch.should_stop, on_open=watch.attach,
                )
                coalescer.flush()
                return result
            except StreamStopped:
                coalescer.flush()
                raise
            except ModelError as error:
                coalescer.discard()
                self._before_retry(error, watch)

    def _before_retry(self, error: ModelError, watch: Any) -> None:
        """Publish task.retrying and wait, or re-raise when the error is final."""
        settings = self.ctx.settings
        if not error.retryable or self.attempt >= settings.max_attempts:
            raise error
        delay = backoff_s(self.attempt, error.retry_after_s, settings.retry_base_s, settings.retry_max_s)
        next_attempt = self.ctx.store.start_attempt(self.task_id)
        if next_attempt is None:  # finished elsewhere meanwhile (cancelled while queued for a retry)
            raise StreamStopped(StreamResult())
        self.attempt = next_attempt
        log.warning("model.retrying", code=error.code, error=error.message, delay_s=delay, attempt=next_attempt)
        self._publish(ev.RETRYING, error={"code": error.code, "message": error.message}, delay_s=delay)
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
        if self.ctx.store.finish(self.task_id, outcome):
            self._publish(ev.COMPLETED, reasoning=result.reasoning, answer=result.answer, usage=usage,
                          cost=bill, timings=timings, metadata=self.job.metadata)
        return COMPLETED

    def _fail(self, error: QvqError) -> str:
        log.warning("task.failed", code=error.code, error=error.message)
        outcome = Outcome(status=FAILED, attempt=self.attempt, error_code=error.code,
                          error_message=error.message, images=self._summaries() or None,
                          timings=self._timings(None))
        if self.ctx.store.finish(self.task_id, outcome):
            self._publish(ev.FAILED, error=error.to_dict())
        return FAILED

    def _stop(self, watch: Any) -> str:
        if watch.cancelled or not watch.timed_out:
            outcome = Outcome(status=CANCELLED, attempt=self.attempt, reasoning=self.partial.finish().reasoning,
                              answer=self.partial.answer, images=self._summaries() or None,
                              timings=self._timings(self.partial))
            if self.ctx.store.finish(self.task_id, outcome):
                self._publish(ev.CANCELLED)
            return CANCELLED
        limit = self.ctx.settings.task_timeout_s
        return self._fail(ModelError(f"the task ran past its time limit of {limit:g} s (QVQ_TASK_TIMEOUT_S)",
                                     code="model.timeout", retryable=False))

    # -- helpers -------------------------------------------------------------------------------
    def _publish(self, type_: str, **fields: Any) -> None:
        self.ctx.bus.publish(self.task_id, type_, self.attempt, **fields)

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
    """Exponential backoff with full jitter, never shorter than the service's Retry-After."""
    ceiling = min(max_s, base_s * (2 ** (attempt - 1)))
    delay = random.uniform(ceiling / 2, ceiling)
    if retry_after_s is not None:
        delay = max(delay, min(retry_after_s, max_s))
    return round(delay, 3)
