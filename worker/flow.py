"""Flow control for one worker process: what the pipeline calls before and after running a task and
around each model call (the two marked hooks in worker/pipeline.py).

    admitted(job, payload)     a tenant slot for the run, or the task is parked (no worker thread held)
    model_call(...)            budget reservation -> tenant rate -> model quota -> the call -> settle:
                               ledger row, budget to the actual cost, output tokens to the limiter

Waiting never fails a task: it publishes `task.waiting` (reason, wait_s) and keeps a marker in Redis
(contracts/flow.py `waiting_key`) that GET /v1/tasks/{id} shows.

Parking: a task whose tenant has no free slot is not held in a worker thread (that would let one
tenant's burst fill every thread while another tenant's job waits in the queue behind it). Its
payload goes to a Redis-side delayed set (zset of task id by due time) and the message is
acknowledged; a mover thread in every worker puts due tasks back on the queue (one winner per task,
by ZREM). Celery's own eta/countdown is not used for this: on Redis such messages are held in the
worker's memory outside prefetch and delivered again after the visibility timeout (celery#4766,
celery#8069, kombu#337).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import redis

from contracts import events as ev
from contracts import flow
from contracts.catalog import cost_decimal, worst_case_cost
from contracts.errors import InternalError, ModelError
from contracts.job import JobRequest
from contracts.logging import get_logger
from contracts.metrics import FLOW_WAIT
from contracts.settings import Settings
from contracts.store import Store
from contracts.tokens import estimate_text_tokens
from worker.budget import BudgetKeeper, Reservation
from worker.fairness import TenantGate
from worker.limiter import Decision, ModelLimiter
from worker.model import StreamResult, StreamStopped

log = get_logger(__name__)
WAITING = flow.WAITING
PARKED_KEY = f"{flow.PREFIX}parked"  # zset: task id -> due (unix ms)
PARKED_PAYLOADS_KEY = f"{flow.PREFIX}parked:payloads"  # hash: task id -> payload JSON
PARK_DELAY_S = 1.0
MOVER_PERIOD_S = 0.2
DEFAULT_429_HOLD_S = 1.0
Publish = Callable[..., Any]  # TaskRun._publish(type_, **fields)

# KEYS: parked, payloads. ARGV: task id. The one mover that removes it gets the payload.
_UNPARK_LUA = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  local payload = redis.call('HGET', KEYS[2], ARGV[1])
  redis.call('HDEL', KEYS[2], ARGV[1])
  return payload
end
return false
"""


class ModelCall:
    """What one model call did: opened (the service accepted it), the text it streamed, its result."""

    def __init__(self, input_tokens: int) -> None:
        self.input_tokens = input_tokens
        self.opened = False
        self.chars: list[str] = []
        self.result: StreamResult | None = None

    def tap(self, on_text: Callable[[str, str], None]) -> Callable[[str, str], None]:
        def add(kind: str, text: str) -> None:
            self.chars.append(text)
            on_text(kind, text)

        return add

    def on_open(self, attach: Callable[[Any], None]) -> Callable[[Any], None]:
        def opened(stream: Any) -> None:
            self.opened = True
            attach(stream)

        return opened

    def finished(self, result: StreamResult) -> None:
        self.result = result

    def billed_tokens(self) -> tuple[int, int, bool] | None:
        """(prompt, completion, estimated), or None when the service did not bill the call."""
        usage = self.result.usage if self.result else None
        if usage:
            return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0), False
        if not self.opened and not self.chars:
            return None
        return self.input_tokens, estimate_text_tokens("".join(self.chars)), True


class FlowControl:
    """One per worker process (worker/context.py)."""

    def __init__(self, settings: Settings, client: redis.Redis, store: Store) -> None:
        self.client = client
        self.store = store
        margin = settings.flow_margin_ms
        self.limiter = ModelLimiter(client, settings.model_limits,
                                    windows_ms=(flow.SECOND_WINDOW_MS + margin, flow.MINUTE_WINDOW_MS + margin)
                                    ) if settings.flow_control else None
        self.gate = TenantGate(client, settings.tenant_limits, lease_ttl_s=settings.lease_ttl_s)
        self.budget = BudgetKeeper(client, store, settings.tenant_limits,
                                   reservation_ttl_s=settings.task_timeout_s + 60)
        self._unpark = client.register_script(_UNPARK_LUA)
        self._stop = threading.Event()
        self._mover: threading.Thread | None = None

    # -- hook 1: around the run ------------------------------------------------------------------
    @contextlib.contextmanager
    def admitted(self, job: JobRequest, payload: dict[str, Any], publish: Publish) -> Iterator[bool]:
        """True while this delivery holds a tenant slot (or the tenant has no limit); False when the
        task was parked instead (the caller returns, and the message is acknowledged)."""
        try:
            holder = self.gate.try_slot(job.tenant, job.task_id)
            parked = holder is None and not self.client.exists(ev.cancel_key(job.task_id))
        except redis.RedisError as exc:  # fail open: the service's own 429s still hold the line
            log.warning("flow.unavailable", step="tenant_slot", error=str(exc))
            holder, parked = "", False
        if parked:
            self._park(job, payload, publish)
            yield False
            return
        try:
            yield True
        finally:
            if holder:
                self.gate.release(job.tenant, holder)

    def _park(self, job: JobRequest, payload: dict[str, Any], publish: Publish) -> None:
        limit = self.gate.limit(job.tenant).concurrency
        self._mark_waiting(job.task_id, "tenant_concurrency", PARK_DELAY_S, publish,
                           ttl_s=PARK_DELAY_S * 3 + 5)
        due_ms = int((time.time() + PARK_DELAY_S) * 1000)
        pipe = self.client.pipeline()
        pipe.hset(PARKED_PAYLOADS_KEY, job.task_id, json.dumps(payload))
        pipe.zadd(PARKED_KEY, {job.task_id: due_ms})
        pipe.execute()
        log.info("flow.parked", tenant=job.tenant, concurrency=limit, due_in_s=PARK_DELAY_S)

    def start_mover(self, send: Callable[[dict[str, Any]], None]) -> None:
        """Start the thread that puts due parked tasks back on the queue (every worker runs one)."""
        if self._mover is None:
            self._mover = threading.Thread(target=self._move_loop, args=(send,), name="qvq-flow-mover", daemon=True)
            self._mover.start()

    def move_due(self, send: Callable[[dict[str, Any]], None]) -> int:
        """Re-enqueue the parked tasks that are due; returns how many this process moved."""
        moved = 0
        for raw_id in self.client.zrangebyscore(PARKED_KEY, "-inf", int(time.time() * 1000), start=0, num=100):
            task_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
            raw = self._unpark(keys=[PARKED_KEY, PARKED_PAYLOADS_KEY], args=[task_id])
            if not raw:
                continue  # another worker's mover won it
            payload = json.loads(raw)
            try:
                send(payload)
                moved += 1
            except Exception as exc:  # keep it parked; the next pass tries again
                log.warning("flow.unpark_failed", task_id=task_id, error=str(exc))
                self.client.hset(PARKED_PAYLOADS_KEY, task_id, raw)
                self.client.zadd(PARKED_KEY, {task_id: int((time.time() + PARK_DELAY_S) * 1000)})
        return moved

    def _move_loop(self, send: Callable[[dict[str, Any]], None]) -> None:
        while not self._stop.wait(MOVER_PERIOD_S):
            try:
                self.move_due(send)
            except Exception as exc:  # Redis away, a damaged payload: the mover must outlive any of them
                log.warning("flow.mover_failed", error=f"{type(exc).__name__}: {exc}")

    def stop(self) -> None:
        self._stop.set()
        self.gate.stop()

    # -- hook 2: around each model call ----------------------------------------------------------
    @contextlib.contextmanager
    def model_call(self, job: JobRequest, attempt: int, input_tokens: int, should_stop: Callable[[], bool],
                   publish: Publish) -> Iterator[ModelCall]:
        """Budget, tenant rate and model quota before the call; the ledger and settlements after.

        Raises BudgetError (no call made) when the tenant's budget cannot cover the worst case, and
        StreamStopped when the task is cancelled while it waits."""
        reservation = self._reserve(job, attempt, input_tokens)
        call = ModelCall(input_tokens)
        ticket = None
        try:
            try:
                self._wait_tenant_rate(job, should_stop, publish)
                ticket = self._wait_model_quota(job, input_tokens, should_stop, publish)
            except redis.RedisError as exc:  # fail open, like the tenant slot
                log.warning("flow.unavailable", step="rate", error=str(exc))
            self._clear_waiting(job.task_id)
            yield call
        except ModelError as error:
            if error.code == "model.rate_limited" and error.retryable and self.limiter is not None:
                self.limiter.tighten(job.model, error.retry_after_s or DEFAULT_429_HOLD_S)
            self._settle(job, attempt, call, ticket, reservation, "failed")
            raise
        except StreamStopped as stopped:
            call.result = call.result or stopped.result
            self._settle(job, attempt, call, ticket, reservation, "cancelled")
            raise
        except BaseException:
            self._settle(job, attempt, call, ticket, reservation, "failed")
            raise
        self._settle(job, attempt, call, ticket, reservation, "completed")

    def _reserve(self, job: JobRequest, attempt: int, input_tokens: int) -> Reservation | None:
        """Fails closed: money is never spent on a budget that could not be checked."""
        try:
            return self.budget.reserve(job.tenant, f"{job.task_id}:{attempt}", worst_case_cost(job.model, input_tokens))
        except redis.RedisError as exc:
            raise InternalError("the tenant's budget could not be checked (Redis is unreachable); nothing was "
                                "sent to the model: retry the task", retryable=True) from exc

    def _wait_tenant_rate(self, job: JobRequest, should_stop: Callable[[], bool], publish: Publish) -> None:
        told = False
        while (wait_s := self.gate.try_rate(job.tenant)) > 0:
            if not told:
                self._mark_waiting(job.task_id, "tenant_rate", wait_s, publish)
                told = True
            _sleep_unless_stopped(wait_s, should_stop)

    def _wait_model_quota(self, job: JobRequest, tokens: int, should_stop: Callable[[], bool],
                          publish: Publish) -> str | None:
        if self.limiter is None:
            return None

        def on_wait(decision: Decision) -> None:
            self._mark_waiting(job.task_id, decision.reason, decision.wait_s, publish)

        ticket = self.limiter.wait_for_capacity(job.model, tenant=job.tenant, tokens=tokens,
                                                should_stop=should_stop, on_wait=on_wait)
        if ticket is None:
            raise StreamStopped(StreamResult())
        return ticket

    def _settle(self, job: JobRequest, attempt: int, call: ModelCall, ticket: str | None,
                reservation: Reservation | None, outcome: str) -> None:
        """Never raises; each settlement on its own, a failed one logged (the terminal write also writes a
        completed attempt's ledger row; a reservation that was not settled lapses by itself)."""
        billed = call.billed_tokens()
        prompt, completion, estimated = billed if billed else (call.input_tokens, 0, True)
        steps: list[tuple[str, Callable[[], Any]]] = []
        if billed is not None:
            steps.append(("ledger", lambda: self.store.record_usage(
                job.task_id, attempt, model=job.model, tenant=job.tenant, prompt_tokens=prompt,
                completion_tokens=completion, estimated=estimated, outcome=outcome)))
        if ticket is not None and self.limiter is not None:
            limiter = self.limiter
            steps.append(("limiter", lambda: limiter.settle(
                job.model, ticket, completion + max(0, prompt - call.input_tokens))))
        if reservation is not None:
            actual = cost_decimal(job.model, prompt, completion)["total"] if billed else Decimal(0)
            steps.append(("budget", lambda: self.budget.settle(reservation, actual)))
        for name, step in steps:
            try:
                step()
            except Exception as exc:
                log.warning("flow.settle_failed", step=name, error=f"{type(exc).__name__}: {exc}", outcome=outcome)

    # -- the waiting marker --------------------------------------------------------------------
    def _mark_waiting(self, task_id: str, reason: str, wait_s: float, publish: Publish,
                      ttl_s: float | None = None) -> None:
        wait_s = round(max(0.0, wait_s), 3)
        key = flow.waiting_key(task_id)
        try:
            previous = flow.read_waiting(self.client, task_id)
        except redis.RedisError:
            previous = None
        marker = {"reason": reason, "wait_s": wait_s,
                  "since": previous["since"] if previous and previous.get("reason") == reason else time.time()}
        with contextlib.suppress(redis.RedisError):
            self.client.set(key, json.dumps(marker), px=int((ttl_s or max(10.0, wait_s * 2 + 5)) * 1000))
        if previous is None or previous.get("reason") != reason or abs(previous.get("wait_s", 0) - wait_s) > 1:
            publish(WAITING, reason=reason, wait_s=wait_s)

    def _clear_waiting(self, task_id: str) -> None:
        """The wait is over: its length goes to qvq_flow_wait_seconds{reason}, its marker away."""
        with contextlib.suppress(redis.RedisError):
            pipe = self.client.pipeline(transaction=False)  # read and delete in one round trip per call
            pipe.get(flow.waiting_key(task_id))
            pipe.delete(flow.waiting_key(task_id))
            marker = flow.parse_waiting(pipe.execute()[0])
            if marker and marker.get("reason") in WAIT_REASONS:
                FLOW_WAIT.labels(marker["reason"]).observe(max(0.0, time.time() - float(marker.get("since") or 0)))


WAIT_REASONS = ("model_quota", "tenant_concurrency", "tenant_rate")


def _sleep_unless_stopped(seconds: float, should_stop: Callable[[], bool]) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if should_stop():
            raise StreamStopped(StreamResult())
        time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
