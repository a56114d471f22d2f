"""Flow control for one worker process: what the pipeline calls before and after running a task and
around each model call (the two marked hooks in worker/pipeline.py).

    admitted(job, payload)     a tenant slot for the run, or the task is parked (parking.py: no worker
                               thread held while it waits)
    model_call(...)            budget reservation (budget.py) -> tenant rate (fairness.py) -> model quota
                               (limiter.py) -> the call -> settle: ledger row, budget to the actual cost,
                               output tokens to the limiter

Waiting never fails a task: it publishes `task.waiting` (reason, wait_s) and keeps a marker in Redis
(contracts/keys.py `waiting_key`) that GET /v1/tasks/{id} shows.
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
from contracts import flow, keys, retry
from contracts.catalog import cost_decimal, worst_case_cost
from contracts.errors import InternalError, ModelError, StreamStopped
from contracts.job import JobRequest
from contracts.logging import get_logger
from contracts.metrics import FLOW_WAIT
from contracts.settings import Settings
from contracts.store import Store
from contracts.tokens import estimate_text_tokens
from worker.flow.budget import BudgetKeeper, Reservation
from worker.flow.fairness import TenantGate
from worker.flow.limiter import Decision, ModelLimiter
from worker.flow.parking import ParkingLot
from worker.loop import cpu_gate
from worker.recovery.cancel import sleep_unless_stopped
from worker.stream.model import StreamResult

log = get_logger(__name__)
PARK_DELAY_S = 1.0
QUOTA_SHARE = 4  # a tenant may have 1/QUOTA_SHARE of a process's runs waiting for model quota
DEFAULT_429_HOLD_S = 1.0
Publish = Callable[..., Any]  # TaskRun._publish(type_, **fields)
Sleep = Callable[[float], None]  # wait this long; StreamStopped when the run is stopped meanwhile


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


class RunsByTenant:
    """Task ids per tenant, thread-safe (the runs of one process)."""

    def __init__(self) -> None:
        self._runs: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    def add(self, tenant: str | None, task_id: str) -> None:
        with self._lock:
            self._runs.setdefault(tenant or "", set()).add(task_id)

    def discard(self, tenant: str | None, task_id: str) -> None:
        with self._lock:
            runs = self._runs.get(tenant or "")
            if runs is not None:
                runs.discard(task_id)
                if not runs:
                    del self._runs[tenant or ""]

    def count(self, tenant: str | None) -> int:
        with self._lock:
            return len(self._runs.get(tenant or "", ()))


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
        self.parking = ParkingLot(client)
        # runs admitted and not yet granted model quota, per tenant; a tenant may hold this many
        self._quota_waiters = RunsByTenant()
        self.quota_share = max(1, settings.worker_concurrency // QUOTA_SHARE)

    # -- hook 1: around the run ------------------------------------------------------------------
    @contextlib.contextmanager
    def admitted(self, job: JobRequest, payload: dict[str, Any], publish: Publish) -> Iterator[bool]:
        """True while this delivery holds a tenant slot (or the tenant has no limit); False when the
        task was parked instead (the caller returns, and the message is acknowledged).

        A task is also parked when its tenant already has its share of this process's runs waiting for
        model quota (QUOTA_SHARE) while the quota has a queue: one tenant's burst then cannot take every
        worker thread, and another tenant's job reaches a thread, and the limiter's fair queue, at once."""
        try:
            holder = self.gate.try_slot(job.tenant, job.task_id)
            parked = holder is None and not self.client.exists(keys.cancel_key(job.task_id))
        except redis.RedisError as exc:  # fail open: the service's own 429s still hold the line
            log.warning("flow.unavailable", step="tenant_slot", error=str(exc))
            holder, parked = "", False
        reason = "tenant_concurrency"
        if not parked and holder is not None and self._over_quota_share(job):
            parked, reason = True, "model_quota"
            if holder:
                self.gate.release(job.tenant, holder)
        if parked:
            self._park(job, payload, publish, reason)
            yield False
            return
        self._quota_waiters.add(job.tenant, job.task_id)
        try:
            yield True
        finally:
            self._quota_waiters.discard(job.tenant, job.task_id)
            if holder:
                self.gate.release(job.tenant, holder)

    def _park(self, job: JobRequest, payload: dict[str, Any], publish: Publish, reason: str) -> None:
        self._mark_waiting(job.task_id, reason, PARK_DELAY_S, publish, ttl_s=PARK_DELAY_S * 3 + 5)
        self.parking.park(job.task_id, payload, PARK_DELAY_S)
        log.info("flow.parked", tenant=job.tenant, reason=reason, due_in_s=PARK_DELAY_S,
                 concurrency=self.gate.limit(job.tenant).concurrency)

    def _over_quota_share(self, job: JobRequest) -> bool:
        """The tenant holds its share of this process's runs not yet past the model quota, and the
        quota has a queue (so this run would only wait in a thread)."""
        if self.limiter is None or self._quota_waiters.count(job.tenant) < self.quota_share:
            return False
        try:
            return self.limiter.backlogged(job.model)
        except redis.RedisError:
            return False

    def stop(self) -> None:
        self.parking.stop()
        self.gate.stop()

    # -- hook 2: around each model call ----------------------------------------------------------
    @contextlib.contextmanager
    def model_call(self, job: JobRequest, attempt: int, input_tokens: int, should_stop: Callable[[], bool],
                   publish: Publish, sleep: Sleep | None = None) -> Iterator[ModelCall]:
        """Budget, tenant rate and model quota before the call; the ledger and settlements after.

        `sleep(seconds)` waits (the pipeline's waits on the worker's loop, raising StreamStopped when the
        run is stopped). Raises BudgetError (no call made) when the tenant's budget cannot cover the
        worst case, and StreamStopped when the task is cancelled while it waits."""
        def sleep_here(seconds: float) -> None:
            sleep_unless_stopped(seconds, should_stop)

        wait = sleep or sleep_here
        reservation = self._reserve(job, attempt, input_tokens)
        call = ModelCall(input_tokens)
        ticket = None
        try:
            try:
                self._wait_tenant_rate(job, wait, publish)
                ticket = self._wait_model_quota(job, input_tokens, should_stop, publish, wait)
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

    def _wait_tenant_rate(self, job: JobRequest, sleep: Sleep, publish: Publish) -> None:
        told = False
        while (wait_s := self.gate.try_rate(job.tenant)) > 0:
            if not told:
                self._mark_waiting(job.task_id, "tenant_rate", wait_s, publish)
                told = True
            sleep(wait_s)

    def _wait_model_quota(self, job: JobRequest, tokens: int, should_stop: Callable[[], bool],
                          publish: Publish, sleep: Sleep) -> str | None:
        if self.limiter is None:
            return None

        def on_wait(decision: Decision) -> None:
            self._mark_waiting(job.task_id, decision.reason, decision.wait_s, publish)

        ticket = self.limiter.wait_for_capacity(job.model, tenant=job.tenant, tokens=tokens,
                                                should_stop=should_stop, on_wait=on_wait, sleep=sleep)
        self._quota_waiters.discard(job.tenant, job.task_id)
        if ticket is None:
            raise StreamStopped(StreamResult())
        return ticket

    @cpu_gate.gated  # the ledger's write and the limiter's settlement: Python the loop goes before
    def _settle(self, job: JobRequest, attempt: int, call: ModelCall, ticket: str | None,
                reservation: Reservation | None, outcome: str) -> None:
        """Never raises; each settlement on its own, a failed one logged (the terminal write also writes a
        completed attempt's ledger row; a reservation that was not settled lapses by itself)."""
        billed = call.billed_tokens()
        prompt, completion, estimated = billed if billed else (call.input_tokens, 0, True)
        steps: list[tuple[str, Callable[[], Any]]] = []
        if billed is not None:
            steps.append(("ledger", lambda: retry.DATABASE.retrying(sleep=cpu_gate.sleep)(  # never dropped for a busy database
                self.store.record_usage,
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
        key = keys.waiting_key(task_id)
        try:
            previous = flow.read_waiting(self.client, task_id)
        except redis.RedisError:
            previous = None
        marker = {"reason": reason, "wait_s": wait_s,
                  "since": previous["since"] if previous and previous.get("reason") == reason else time.time()}
        with contextlib.suppress(redis.RedisError):
            self.client.set(key, json.dumps(marker), px=int((ttl_s or max(10.0, wait_s * 2 + 5)) * 1000))
        if previous is None or previous.get("reason") != reason or abs(previous.get("wait_s", 0) - wait_s) > 1:
            publish(ev.WAITING, reason=reason, wait_s=wait_s)

    def _clear_waiting(self, task_id: str) -> None:
        """The wait is over: its length goes to qvq_flow_wait_seconds{reason}, its marker away."""
        with contextlib.suppress(redis.RedisError):
            pipe = self.client.pipeline(transaction=False)  # read and delete in one round trip per call
            pipe.get(keys.waiting_key(task_id))
            pipe.delete(keys.waiting_key(task_id))
            marker = flow.parse_waiting(pipe.execute()[0])
            if marker and marker.get("reason") in ev.WAIT_REASONS:
                FLOW_WAIT.labels(marker["reason"]).observe(max(0.0, time.time() - float(marker.get("since") or 0)))
