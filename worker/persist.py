"""A run's reads and writes of its row, with the errors the pipeline acts on: StoreUnavailable (the
database cannot be reached: the message goes back for a later attempt) and StoreRejected (the database
refuses the values for good: the task ends failed once, `store.rejected`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

from contracts import retry
from contracts.catalog import cost_as_text
from contracts.errors import StoreRejected, StoreUnavailable
from contracts.logging import get_logger
from contracts.retry import TRANSIENT_DB_ERRORS
from contracts.store import Outcome, Store
from worker.loop import CpuGate, cpu_gate

log = get_logger(__name__)


def free_gate_on_queries(engine: sa.engine.Engine, gate: CpuGate = cpu_gate) -> None:
    """Every round trip to the database (each statement, each COMMIT and ROLLBACK, the pool's reset of a
    returned connection included) frees the CPU gate (worker/loop.py) while it waits, so the gate
    serializes only the Python of the steps, not the database's latency. Statements go through
    SQLAlchemy's dialect events; COMMIT and ROLLBACK have none, so the engine's dialect methods are
    wrapped (without them short tasks on a local PostgreSQL ran 5-8 % slower). With a PostgreSQL 2.8 ms
    away, one worker process ran 17.1 short tasks/s so, and 10.3 when the gate was held through the round
    trips (bench/RESULTS.md)."""
    dialect = engine.dialect  # the pool's too: a connection's reset on return is its do_rollback

    def freeing(call: Callable[..., Any]) -> Callable[..., bool]:
        def wrapped(*args: Any) -> bool:
            with gate.waiting():
                call(*args)
            return True  # for the events: the call is made

        return wrapped

    sa.event.listen(engine, "do_execute", freeing(dialect.do_execute))
    sa.event.listen(engine, "do_executemany", freeing(dialect.do_executemany))
    sa.event.listen(engine, "do_execute_no_params", freeing(dialect.do_execute_no_params))
    dialect.do_commit = freeing(dialect.do_commit)  # type: ignore[method-assign,assignment]
    dialect.do_rollback = freeing(dialect.do_rollback)  # type: ignore[method-assign,assignment]


def store_call(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """A store read or attempt count; StoreUnavailable when the database cannot be reached."""
    try:
        return call(*args, **kwargs)
    except TRANSIENT_DB_ERRORS as exc:
        raise StoreUnavailable(f"the database is unavailable: {type(exc).__name__}: {exc}") from exc


def persist(store: Store, task_id: str, outcome: Outcome) -> dict[str, Any] | None:
    """The terminal claim, retried through a short database outage (retry.DATABASE); the bill written
    ({"cost", "usage"}) when this run made it, else None. StoreUnavailable once the policy gives up;
    StoreRejected when the database refuses the values for good (a DataError: retrying, or running the
    task again, would only bill again)."""
    tries = 0

    def claim() -> dict[str, Any] | None:
        nonlocal tries
        tries += 1
        return store.finish(task_id, outcome)

    try:
        claimed = retry.DATABASE.retrying(sleep=cpu_gate.sleep)(claim)  # the gate is free while it waits
    except TRANSIENT_DB_ERRORS as exc:
        log.error("store.finish_gave_up", error=str(exc), tries=tries)
        raise StoreUnavailable(f"cannot persist the result: {type(exc).__name__}: {exc}") from exc
    except (sa.exc.StatementError, ValueError) as exc:  # DataError; text the driver cannot encode
        cause = type(getattr(exc, "orig", None) or exc).__name__
        log.error("store.finish_refused", status=outcome.status, error=cause)
        raise StoreRejected(f"the database refused the {outcome.status} result ({cause}); "
                            "the attempts already billed stay billed") from exc
    if not claimed and tries > 1:
        # A try that raised may have committed before its connection broke: then it is ours.
        record = store_call(store.get, task_id)
        if record and record.status == outcome.status and record.attempts == outcome.attempt:
            claimed = {"cost": cost_as_text(record.cost), "usage": record.usage}
    if not claimed:
        log.info("task.already_terminal", status=outcome.status)
    return claimed
