"""Tasks as the producer sees them: every operation takes the principal it acts for and answers records, or
raises a QvqError (the HTTP API maps each to its status in one place: producer/api/errors.py).

    submit    validate, check the conversation and uploads, record the row (queued), publish task.queued, send
    get       the row, when the principal may see it (another tenant's task answers like a missing one)
    cancel    contracts/cancel.py, the one cancel path
    retry     a failed or cancelled task queued again: same id, a new run, seq continuing
    tasks     the principal's rows, newest first (`waiting`: held back by flow control), a page at a time
    usage     the ledger's report
    limits    the model limiter's state

The routes, the webhooks and the direct Python client (producer/client.py) all call this; none of them
repeats a rule.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
from dataclasses import dataclass
from typing import Any

import redis
import sqlalchemy as sa

from contracts import events as ev
from contracts import flow, keys
from contracts.batches.progress import item_ended
from contracts.bus import EventBus
from contracts.cancel import cancel_task, is_orphaned
from contracts.errors import AuthError, ConflictError, EnqueueError, NotFoundError, RequestError
from contracts.job import UPLOAD_REF, JobRequest, parse_job
from contracts.retry import TRANSIENT_DB_ERRORS
from contracts.sender import TaskSender
from contracts.settings import Settings
from contracts.store import ANY_TENANT, FAILED, QUEUED, RUNNING, Outcome, Store, TaskRecord, TenantScope
from contracts.tenants import ADMIN, Principal
from contracts.tracing import Carrier

WAITING = "waiting"  # a listing filter, not a status: queued or running, held back by flow control
MAX_SHOWN_ID = 128


@dataclass(frozen=True)
class Submitted:
    record: TaskRecord
    created: bool  # False when an idempotency key returned an earlier task


def not_found(task_id: str) -> NotFoundError:
    """What a missing task, and another tenant's, answer: the same words."""
    shown = task_id if len(task_id) <= MAX_SHOWN_ID else task_id[:MAX_SHOWN_ID] + "..."
    return NotFoundError(f"no task {shown!r}", field="task_id")


def tenant_scope(principal: Principal, tenant: str | None) -> TenantScope:
    """Which tenant's rows a listing or report reads: the key's own; an admin's choice (every tenant by default)."""
    if principal.tenant is None:
        return ANY_TENANT if tenant is None else tenant
    if tenant is not None and tenant != principal.tenant:
        raise AuthError(f"this key reads tenant {principal.tenant!r} only", code="auth.forbidden", status=403,
                        field="tenant")
    return principal.tenant


def as_tenant(principal: Principal, request: Any) -> Any:
    """A tenant key submits for its own tenant only (an admin may name any)."""
    if principal.tenant is None or not isinstance(request, dict):
        return request
    named = request.get("tenant")
    if named is not None and named != principal.tenant:
        raise AuthError(f"this key submits for tenant {principal.tenant!r} only", code="auth.forbidden",
                        status=403, field="tenant")
    return {**request, "tenant": principal.tenant}


class TaskService:
    def __init__(self, settings: Settings, store: Store, client: redis.Redis, sender: TaskSender) -> None:
        self.settings = settings
        self.store = store
        self.redis = client
        self.bus = EventBus(client, ttl_s=settings.event_ttl_s)
        self.sender = sender

    # -- submit --------------------------------------------------------------------------------
    def submit(self, principal: Principal, request: dict[str, Any], *, local_files: bool = False,
               trace: Carrier | None = None) -> Submitted:
        """Validate and enqueue a job request (README, Job request). `local_files=False` refuses
        references to files on this machine (callers over HTTP are elsewhere); `trace`: the caller's
        trace context, carried in the task (contracts/tracing.py)."""
        job = dataclasses.replace(parse_job(as_tenant(principal, request), default_model=self.settings.model,
                                            local_files=local_files), trace=trace)
        try:
            self._check_conversation(job)
            self.check_uploads(job)
            record, created = self.store.create_task(job)
        except TRANSIENT_DB_ERRORS as exc:
            raise EnqueueError(f"could not record task {job.task_id}: the database is unavailable",
                               detail=str(exc)) from exc
        if created:
            self._enqueue(job, record)
        return Submitted(record, created)

    def _check_conversation(self, job: JobRequest) -> None:
        """A turn continues a conversation of its own tenant, or starts one (with images). Conversation
        ids are scoped per tenant: another tenant's conversation of the same id is not looked at."""
        if not job.conversation_id or job.images:
            return
        if job.tenant not in self.store.conversation_tenants(job.conversation_id):
            raise RequestError(f"no conversation {job.conversation_id!r}; a new conversation starts with a "
                               "turn that has images", field="conversation_id", code="conversation.not_found")

    def check_uploads(self, job: JobRequest) -> None:
        """upload:// references only to live uploads of the job's own tenant."""
        for index, ref in enumerate(job.images):
            match = UPLOAD_REF.fullmatch(ref)
            if match is None:
                continue
            upload = self.store.get_upload(match.group(1))
            if upload is None or upload.tenant != job.tenant or not upload.is_live():
                raise RequestError("no such upload (or it expired); upload the image again",
                                   field=f"images[{index}]", code="image.not_found")

    def _enqueue(self, job: JobRequest, record: TaskRecord, *, clear_cancel: bool = False) -> int:
        """Publish task.queued (with the run it starts, seq above every seq the row knows of) and send the
        Celery task; returns the seq of task.queued, which the row remembers.

        Fails within seconds when Redis or the broker is down (no waiting for it to come back): the row
        is marked failed (`qvq retry` queues it again) and EnqueueError is raised."""
        try:
            if clear_cancel:  # the cancel of an earlier run must not stop this one
                self.redis.delete(keys.cancel_key(job.task_id))
            seq = self.bus.publish(job.task_id, ev.QUEUED, record.attempts, seq_floor=record.last_seq,
                                   **queued_fields(job, record))
            self.sender.send_run(job.task_id, record.run)
        except Exception as exc:
            message = f"could not enqueue task {job.task_id}: the queue is unavailable ({type(exc).__name__})"
            self.store.finish(job.task_id, Outcome(status=FAILED, attempt=record.attempts, error_code="internal",
                                                   error_message=message))
            with contextlib.suppress(Exception):  # a subscriber that saw task.queued must see the end too
                self.bus.publish(job.task_id, ev.FAILED, record.attempts, seq_floor=record.last_seq,
                                 error={"code": "internal", "message": message, "retryable": True})
            raise EnqueueError(message, detail=str(exc)) from exc
        self.note_seq(job.task_id, seq)
        return seq

    def note_seq(self, task_id: str, seq: int) -> None:
        """The row remembers the highest seq published (the floor after Redis lost its counters)."""
        with contextlib.suppress(sa.exc.SQLAlchemyError):  # a missed note only lowers a later floor
            self.store.note_seq(task_id, seq)

    # -- one task ------------------------------------------------------------------------------
    def get(self, principal: Principal, task_id: str) -> TaskRecord:
        """The task's row, if this principal may see it; otherwise exactly what a missing task answers."""
        record = self.store.get(task_id)
        if record is None or not principal.may_see(record.tenant):
            raise not_found(task_id)
        return record

    def view(self, principal: Principal, task_id: str) -> dict[str, Any]:
        """The record as the API shows it: with its callback delivery (`callback`, None without one) and,
        while flow control holds it back, `waiting` ({reason, wait_s, since})."""
        out = self.get(principal, task_id).to_dict()
        delivery = self.store.task_callback(task_id)
        out["callback"] = delivery.to_dict() if delivery else None
        out["waiting"] = self.waiting(task_id) if out["status"] in (QUEUED, RUNNING) else None
        return out

    def waiting(self, task_id: str) -> dict[str, Any] | None:
        """Why flow control holds the task back ({reason, wait_s, since}), or None (also when Redis is away)."""
        try:
            return flow.read_waiting(self.redis, task_id)
        except redis.RedisError:
            return None

    def cancel(self, principal: Principal, task_id: str) -> bool:
        """Stop a queued or running task; False when it had already finished. An item of a batch that
        ends here tells its batch (a running one tells it when its worker stops it)."""
        record = self.get(principal, task_id)
        requested = cancel_task(record, store=self.store, client=self.redis, bus=self.bus)
        if requested and record.batch_id is not None:
            item_ended(self.store, self.redis, self.bus, self.sender, record.batch_id)
        return requested

    def cancel_revoked(self, task_id: str) -> bool:
        """A Celery revoke heard by the API (service/revokes.py): the same cancel, for whoever owns it."""
        record = self.store.get(task_id)
        if record is None:
            return False
        return cancel_task(record, store=self.store, client=self.redis, bus=self.bus)

    def retry(self, principal: Principal, task_id: str) -> int:
        """Queue a failed or cancelled task again: same task id, a new run, seq continuing.

        Returns the seq to follow the new run alone from (that of its task.queued minus 1); following
        from 0 replays the earlier runs too and ends at this run's end. The attempt cap
        (QVQ_MAX_ATTEMPTS) counts from this retry. ConflictError when the task is not failed or cancelled."""
        record = self.get(principal, task_id)
        requeued = self.store.requeue(task_id)
        if requeued is None and record.status == RUNNING and is_orphaned(self.redis, task_id):
            requeued = self.store.requeue(task_id, statuses=(RUNNING,))  # its worker died: no lease
        if requeued is None:
            status = self.get(principal, task_id).status
            raise ConflictError(f"task {task_id} is {status}: only failed or cancelled tasks can be retried",
                                field="task_id")
        job = JobRequest.from_payload(requeued.request)
        return self._enqueue(job, requeued, clear_cancel=True) - 1

    # -- many ----------------------------------------------------------------------------------
    def tasks(self, principal: Principal, *, status: str | None = None, since: dt.datetime | None = None,
              limit: int = 100, tenant: str | None = None,
              before: tuple[dt.datetime, str] | None = None) -> list[TaskRecord]:
        """The rows this principal may see, newest first; `status="waiting"`: queued or running ones flow
        control holds back."""
        scope = tenant_scope(principal, tenant)
        if status != WAITING:
            return self.store.list_tasks(status=status, since=since, limit=limit, tenant=scope, before=before)
        found: list[TaskRecord] = []
        while len(found) < limit:  # a page of queued and running rows at a time, kept when held back
            page = self.store.list_tasks(statuses=(QUEUED, RUNNING), since=since, limit=limit, tenant=scope,
                                         before=before)
            waiting = flow.held_back(self.redis, [record.id for record in page])
            found += [record for record in page if record.id in waiting]
            if len(page) < limit:
                break
            before = (page[-1].created_at, page[-1].id)
        return found[:limit]

    def conversation_exists(self, principal: Principal, conversation_id: str) -> bool:
        """Whether this principal's tenant has a conversation with this id (another tenant's: no)."""
        return any(principal.may_see(tenant) for tenant in self.store.conversation_tenants(conversation_id))

    def usage(self, principal: Principal, by: str = "model", *, since: dt.datetime | None = None,
              until: dt.datetime | None = None, tenant: str | None = None) -> dict[str, Any]:
        """Tokens and cost from the ledger, per group and in total (money as exact decimal strings)."""
        return self.store.usage_report(by, tenant=tenant_scope(principal, tenant), since=since, until=until)

    def limits(self) -> dict[str, Any]:
        """The model limiter now: per model family, requests and tokens against the limits."""
        return {"limiter": self.settings.flow_control,
                "families": flow.snapshot(self.redis, self.settings.model_limits)}


def queued_fields(job: JobRequest, record: TaskRecord | None) -> dict[str, Any]:
    """The fields of a task.queued: what runs, and which run it starts (0 for the first)."""
    return {"model": job.model, "image_count": len(job.images), "run": record.run if record else 0}


__all__ = ["ADMIN", "Submitted", "TaskService", "as_tenant", "not_found", "queued_fields", "tenant_scope"]
