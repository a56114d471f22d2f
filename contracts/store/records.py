"""What the store hands out: a task's row, an attempt's start and end, a callback delivery, an upload."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from contracts.catalog import cost_as_decimals, cost_as_text
from contracts.redaction import shown_url
from contracts.store.tables import CALLBACK_PENDING, TERMINAL, now


def iso(moment: dt.datetime | None) -> str | None:
    """A time as every surface shows it: ISO 8601 in UTC with its zone, `Z` (2026-12-04T02:00:00.123456Z).
    The store keeps UTC; a database that hands times back without a zone (SQLite) gets it here."""
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


class AnyTenant:
    """The `tenant` argument meaning: rows of every tenant."""


ANY_TENANT = AnyTenant()
TenantScope = str | None | AnyTenant


@dataclass(frozen=True)
class TaskRecord:
    id: str
    status: str
    model: str
    tenant: str | None
    conversation_id: str | None
    idempotency_key: str | None
    request: dict[str, Any]
    reasoning: str | None
    answer: str | None
    error_code: str | None
    error_message: str | None
    attempts: int
    images: list[dict[str, Any]] | None
    usage: dict[str, Any] | None
    cost: dict[str, Any] | None
    timings: dict[str, Any] | None
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    retry_base: int = 0  # attempts made before the last manual retry
    run: int = 0  # 0 for the first run; each manual retry starts the next one
    last_seq: int = 0  # the highest event seq the store knows of (seq never goes back)
    idempotency_scope: str | None = None  # internal: "<tenant>/<idempotency_key>"
    batch_id: str | None = None  # the batch this task is an item of
    batch_item: int | None = None  # internal: its place in the batch's stable order
    cached_from: str | None = None  # a cached answer: the task that paid for it

    def __post_init__(self) -> None:
        # Money is Decimal in Python (exact decimal strings in JSON: to_dict writes them back).
        object.__setattr__(self, "cost", cost_as_decimals(self.cost))

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL

    def to_dict(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in self.__dataclass_fields__ if name not in _INTERNAL}
        out["cached"] = self.cached_from is not None
        for name in ("created_at", "started_at", "finished_at"):
            out[name] = iso(out[name])
        out["cost"] = cost_as_text(self.cost) or None
        out["task_id"] = out.pop("id")
        out["metadata"] = self.request.get("metadata") or {}
        out["error"] = (
            {"code": self.error_code, "message": self.error_message} if self.error_code else None
        )
        return out

    def summary(self) -> dict[str, Any]:
        """A listing's line (GET /v1/tasks, `qvq tasks`): the record without its text and request."""
        full = self.to_dict()
        return {name: full[name] for name in SUMMARY_FIELDS}


_INTERNAL = frozenset({"idempotency_scope", "batch_item"})
SUMMARY_FIELDS = ("task_id", "status", "model", "tenant", "conversation_id", "attempts", "error", "cost",
                  "created_at", "started_at", "finished_at")


@dataclass(frozen=True)
class HistoryTurn:
    """One completed turn of a conversation: its question, the images it sent (their references, and
    the summaries its row kept of them, to tell whether they changed since), and its answer."""

    prompt: str
    images: tuple[str, ...]
    answer: str
    summaries: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class AttemptStart:
    """An attempt that just began: its number, where the attempt cap counts from, and whether an
    earlier attempt was still marked running (its worker was lost, so this is a redelivery)."""

    number: int
    retry_base: int
    resumed: bool

    @property
    def since_retry(self) -> int:
        """1 for the first attempt since submit or since the last manual retry."""
        return self.number - self.retry_base


@dataclass(frozen=True)
class Outcome:
    """What a finished attempt leaves behind."""

    status: str
    attempt: int
    reasoning: str = ""
    answer: str = ""
    error_code: str | None = None
    error_message: str | None = None
    images: list[dict[str, Any]] | None = None
    usage: dict[str, Any] | None = None
    cost: dict[str, Any] | None = None
    timings: dict[str, Any] | None = None
    last_seq: int = 0  # the highest seq the run published before its terminal event (never lowers the row's)
    cached_from: str | None = None  # the answer is the cached one of this task: billed 0, ledger outcome `cached`


@dataclass(frozen=True)
class CallbackRecord:
    event_id: str
    task_id: str
    run: int
    tenant: str | None
    url: str
    event: dict[str, Any]
    status: str
    attempts: int
    last_status_code: int | None
    last_error: str | None
    attempt_log: list[dict[str, Any]]
    next_attempt_at: dt.datetime | None
    created_at: dt.datetime
    delivered_at: dt.datetime | None
    claimed_until: dt.datetime | None = None  # a try is in flight until then

    def to_dict(self) -> dict[str, Any]:
        """What GET /v1/tasks/{id} shows as `callback` (the URL without its query: it may hold a token)."""
        return {"event_id": self.event_id, "run": self.run, "url": shown_url(self.url),
                "status": self.status, "attempts": self.attempts, "last_status_code": self.last_status_code,
                "last_error": self.last_error, "next_attempt_at": iso(self.next_attempt_at) if self.status == CALLBACK_PENDING else None,
                "created_at": iso(self.created_at), "delivered_at": iso(self.delivered_at),
                "attempt_log": self.attempt_log}


@dataclass(frozen=True)
class UploadRecord:
    id: str
    tenant: str | None
    filename: str | None
    format: str
    bytes: int
    created_at: dt.datetime
    expires_at: dt.datetime

    @property
    def ref(self) -> str:
        return f"upload://{self.id}"

    def is_live(self, at: dt.datetime | None = None) -> bool:
        return self.expires_at > (at or now())
