"""Batches as the producer sees them (README, Batches): every operation takes the principal it acts for.

    submit   validate; estimate (a dry run stops here; `max_cost_cny` refuses a batch whose estimate may
             cost more); record the batch; list its items a page at a time (LIST_PAGE: 100,000 objects
             never sit in memory), insert each page in one statement, publish their task.queued in one
             round trip and send their runs; then the first progress
    view     the batch's tally (counts, done, cost, rate, ETA) and status
    results  its finished items in their stable order, a page at a time (streamed by the API and the CLI)
    cancel   the queued items cancelled in one statement, the running ones stopped, no item started later
    retry    the failed items queued again (each a new run), the batch open again until they end

Flow control, tenant limits and budgets apply to each item in the worker, exactly as to a task alone.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
from collections.abc import Iterator
from itertools import islice
from typing import Any

from contracts import events as ev
from contracts.batches.estimate import SAMPLE, Estimate, HeaderReader
from contracts.batches.progress import item_ended, status_of, tally_fields
from contracts.batches.request import BatchRequest, parse_batch
from contracts.catalog import money_text
from contracts.errors import (
    ApiCallError,
    ConflictError,
    EnqueueError,
    IdempotencyMismatch,
    ImageError,
    NotFoundError,
    QvqError,
    RequestError,
    UnavailableError,
)
from contracts.object_store import ObjectClients
from contracts.sender import TaskSender, producer_app
from contracts.store import FAILED, RUNNING, TERMINAL, BatchRecord, Outcome, TaskRecord, task_row
from contracts.tenants import ADMIN, Principal
from producer.service.tasks import TaskService, as_tenant, queued_fields

PAGE = 500  # items listed, read, inserted and queued together
RESULTS_PAGE = 500


def listing_error(exc: ImageError, batch_id: str) -> QvqError:
    """A listing that failed, as the caller should hear it: a missing bucket is 404, one the service may
    not read 403; a store that did not answer is ours (503: submit the same batch id again, and only
    what is missing is added)."""
    if exc.retryable:
        return UnavailableError(f"the object store did not answer the listing ({exc.code}); submit batch "
                                f"{batch_id} again to add the rest")
    if exc.code == "image.access_denied":  # the service may not read this bucket
        return ApiCallError(exc.message, code=exc.code, status=403, field="source")
    return RequestError(exc.message, field="source", code=exc.code)


def batch_not_found(batch_id: str) -> NotFoundError:
    """What a missing batch, and another tenant's, answer: the same words."""
    return NotFoundError(f"no batch {batch_id[:128]!r}", code="batch.not_found", field="batch_id")


class BatchService:
    def __init__(self, tasks: TaskService, clients: ObjectClients | None = None) -> None:
        self.tasks = tasks
        self.store = tasks.store
        self.clients = clients or ObjectClients(tasks.settings)
        #: Items are queued without a task-sent event each (contracts/sender.producer_app)
        self.sender = TaskSender(producer_app(tasks.settings, sent_events=False), tasks.settings.queue)

    def close(self) -> None:
        self.clients.close()

    # -- submit --------------------------------------------------------------------------------
    def submit(self, principal: Principal, raw: Any, *, local_files: bool = False) -> dict[str, Any]:
        """Estimate, and unless it is a dry run (or over `max_cost_cny`), queue every item. Answers
        {"batch_id", "items", "created", "estimate"} ({"items", "estimate", "dry_run"} for a dry run)."""
        request = parse_batch(as_tenant(principal, raw), default_model=self.tasks.settings.model,
                              local_files=local_files)
        if request.dry_run or request.max_cost_cny is not None:
            estimate = self._estimate(request)
            if request.dry_run:
                return {"items": estimate.items, "estimate": estimate.to_dict(), "dry_run": True}
            if request.max_cost_cny is not None and estimate.cost_max > request.max_cost_cny:
                raise ConflictError(  # 409: a well-formed request, refused by the state of the objects it names
                    f"the estimate's maximum, {money_text(estimate.cost_max)} CNY, is over max_cost_cny "
                    f"{money_text(request.max_cost_cny)}; nothing was queued (raise it, or check the dry run)",
                    field="max_cost_cny", code="budget.exceeded")
        record, created = self.store.create_batch(request.batch_id, request.tenant, request.to_row(), None)
        if not created:
            self._same_batch(record, request)
        estimate, added = self._queue_items(request, local_files)
        self.store.finish_listing(request.batch_id, estimate.to_dict() if created or added else None)
        item_ended(self.store, self.tasks.redis, self.tasks.bus, self.tasks.sender, request.batch_id, force=True)
        batch = self.store.get_batch(request.batch_id)
        assert batch is not None
        return {"batch_id": request.batch_id, "items": self.store.tally(request.batch_id).total, "created": added,
                "estimate": batch.estimate}

    def _same_batch(self, record: BatchRecord, request: BatchRequest) -> None:
        if record.tenant != request.tenant:  # another tenant's batch id: as if taken, nothing told
            raise ConflictError("a batch with this id exists; choose another (or omit it)", field="batch_id")
        differing = [name for name, value in request.to_row().items() if record.request.get(name) != value]
        if differing:
            raise IdempotencyMismatch(f"batch {request.batch_id} was submitted with another request (it differs "
                                      f"in {', '.join(differing)}); use a new batch id", field="batch_id")

    def _refs(self, request: BatchRequest) -> Iterator[tuple[str, str]]:
        """(ref, version) of every item, in listing order, lazily."""
        if request.source is None:
            yield from ((ref, "") for ref in request.items)
            return
        try:
            for item in self.clients.list_objects(request.source, request.suffix):
                yield item.ref, item.version
        except ImageError as exc:
            raise listing_error(exc, request.batch_id) from exc

    def _pages(self, request: BatchRequest) -> Iterator[list[tuple[str, str]]]:
        refs = self._refs(request)
        while page := list(islice(refs, PAGE)):
            yield page

    def _estimate(self, request: BatchRequest) -> Estimate:
        estimate = Estimate(request.model, request.prompt, request.high_resolution)
        reader = HeaderReader(self.clients, high_resolution=request.high_resolution)
        try:
            for page in self._pages(request):
                for tokens in reader.tokens(ref for ref, _ in page):
                    estimate.add(tokens)
        finally:
            reader.close()
        return estimate

    def _queue_items(self, request: BatchRequest, local_files: bool) -> tuple[Estimate, int]:
        """List, estimate and queue every item a page at a time; (the estimate, items added)."""
        estimate = Estimate(request.model, request.prompt, request.high_resolution)
        reader = HeaderReader(self.clients, high_resolution=request.high_resolution)
        added = 0
        try:
            for page in self._pages(request):
                jobs = [request.item_job(ref, version, local_files=local_files) for ref, version in page]
                for job in jobs:
                    self.tasks.check_uploads(job)
                sample = max(0, SAMPLE - estimate.items)
                for tokens in reader.tokens(job.images[0] for job in jobs[:sample]):
                    estimate.add(tokens)
                for _job in jobs[sample:]:
                    estimate.add_unsampled()
                inserted = set(self.store.add_items(request.batch_id, [task_row(job, last_seq=1) for job in jobs]))
                self._enqueue([job for job in jobs if job.task_id in inserted])
                added += len(inserted)
        finally:
            reader.close()
        return estimate, added

    def _enqueue(self, jobs: list[Any]) -> None:
        """task.queued of a page of new items in one round trip, then their runs; when the queue is down,
        the page's items are marked failed (retry the batch's failed items later) and EnqueueError raised."""
        if not jobs:
            return
        try:
            seqs = self.tasks.bus.publish_many([(job.task_id, ev.QUEUED, 0, 0, queued_fields(job, None))
                                                for job in jobs])
            self.sender.send_runs([(job.task_id, 0) for job in jobs])
        except Exception as exc:
            message = f"could not enqueue batch items: the queue is unavailable ({type(exc).__name__})"
            for job in jobs:
                self.store.finish(job.task_id, Outcome(status=FAILED, attempt=0, error_code="internal",
                                                       error_message=message))
            raise EnqueueError(message, detail=str(exc)) from exc
        for job, seq in zip(jobs, seqs, strict=True):
            if seq != 1:  # the row was written with last_seq 1, the seq a new task's task.queued gets
                self.tasks.note_seq(job.task_id, seq)

    # -- one batch -----------------------------------------------------------------------------
    def get(self, principal: Principal, batch_id: str) -> BatchRecord:
        record = self.store.get_batch(batch_id)
        if record is None or not principal.may_see(record.tenant):
            raise batch_not_found(batch_id)
        return record

    def view(self, principal: Principal, batch_id: str) -> dict[str, Any]:
        """The batch as GET /v1/batches/{id} shows it: its request, status and tally."""
        record = self.get(principal, batch_id)
        tally = self.store.tally(batch_id)
        return {**record.to_dict(), "status": status_of(record), **tally_fields(record, tally)}

    def results(self, principal: Principal, batch_id: str) -> Iterator[dict[str, Any]]:
        """The batch's finished items in their stable order, one dict per item, a page read at a time."""
        self.get(principal, batch_id)
        after = -1
        while page := self.store.batch_items(batch_id, after=after, limit=RESULTS_PAGE, statuses=TERMINAL):
            yield from (result_line(record) for record in page)
            after = int(page[-1].batch_item or 0)

    def cancel(self, principal: Principal, batch_id: str) -> dict[str, Any]:
        """Cancel the queued items and stop the running ones; items not started yet never start."""
        record = self.get(principal, batch_id)
        self.store.mark_cancelled(batch_id)
        cancelled = self.store.cancel_queued_items(batch_id)
        with contextlib.suppress(Exception):  # the rows are the truth; a follower asks them when Redis is away
            self.tasks.bus.publish_many([(task_id, ev.CANCELLED, attempts, last_seq, {})
                                         for task_id, attempts, last_seq in cancelled])
        stopping = 0
        after = -1
        while page := self.store.batch_items(batch_id, after=after, limit=RESULTS_PAGE, statuses=(RUNNING,)):
            stopping += sum(self.tasks.cancel(ADMIN, item.id) for item in page)
            after = int(page[-1].batch_item or 0)
        item_ended(self.store, self.tasks.redis, self.tasks.bus, self.tasks.sender, batch_id, force=True)
        return {"batch_id": record.id, "cancelled": len(cancelled), "stopping": stopping}

    def retry(self, principal: Principal, batch_id: str) -> dict[str, Any]:
        """Queue the failed items again (a new run each); the batch completes, and calls back, anew."""
        record = self.get(principal, batch_id)
        failed: list[TaskRecord] = []
        after = -1
        while page := self.store.batch_items(batch_id, after=after, limit=RESULTS_PAGE, statuses=(FAILED,)):
            failed += page
            after = int(page[-1].batch_item or 0)
        if failed:
            self.store.start_round(batch_id)
        retried = 0
        for item in failed:
            with contextlib.suppress(ConflictError):  # it left `failed` meanwhile
                self.tasks.retry(ADMIN, item.id)
                retried += 1
        return {"batch_id": record.id, "retried": retried}


#: The columns of a results line, in order (CSV's header; JSONL has the same names).
RESULT_COLUMNS = ("item", "ref", "task_id", "status", "answer", "prompt_tokens", "completion_tokens",
                  "total_tokens", "cost", "cached", "error_code", "error_message")


def result_line(record: TaskRecord) -> dict[str, Any]:
    """One item of a batch's results: what it asked about, how it ended, its answer and bill."""
    usage = record.usage or {}
    cost = record.cost or {}
    return {"item": record.batch_item, "ref": (record.request.get("images") or [None])[0], "task_id": record.id,
            "status": record.status, "answer": record.answer,
            "usage": {name: usage.get(name) for name in ("prompt_tokens", "completion_tokens", "total_tokens")},
            "cost": money_text(cost["total"]) if cost.get("total") is not None else None,
            "cached": record.cached_from is not None,
            "error": {"code": record.error_code, "message": record.error_message} if record.error_code else None}


def csv_row(line: dict[str, Any]) -> list[Any]:
    usage, error = line["usage"] or {}, line["error"] or {}
    flat = {**line, **usage, "error_code": error.get("code"), "error_message": error.get("message")}
    return ["" if flat.get(name) is None else flat[name] for name in RESULT_COLUMNS]


def render_results(lines: Iterator[dict[str, Any]], fmt: str) -> Iterator[str]:
    """Results as text, a line at a time: JSON Lines, or CSV with its header first."""
    if fmt != "csv":
        yield from (json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
        return
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(RESULT_COLUMNS)
    for line in lines:
        writer.writerow(csv_row(line))
        yield buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
    yield buffer.getvalue()
