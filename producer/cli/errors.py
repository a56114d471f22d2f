"""What a `qvq` user sees when something goes wrong: one line naming what to fix, and an exit code.

The third-party errors a command can meet (Redis, the broker, SQLAlchemy and its drivers) are
translated here and nowhere else. Lines name the setting to check, never its value: a URL may hold
a password, and an internal address means nothing to the person at the terminal.
"""

from __future__ import annotations

from dataclasses import dataclass

import click

from contracts.errors import ConfigError, ImageError, QvqError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CANCELLED = 0, 1, 2, 3
#: Stopped by the person (Ctrl-C: 128 + SIGINT, or SIGTERM: 128 + 15) or by a closed pipe (128 + SIGPIPE),
#: as shells report them; the task itself goes on.
EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_PIPE = 130, 143, 141
#: Codes that mean the request itself was wrong, or the key refused (exit 2); other QvqErrors are
#: failures (exit 1).
USAGE_CODES = {"request.invalid", "model.unknown", "conversation.not_found", "idempotency.mismatch",
               "auth.required", "auth.invalid",
               "auth.forbidden", "request.too_large", "request.unsupported_media_type"}


@dataclass(frozen=True)
class Problem:
    line: str
    exit_code: int


def explain(exc: BaseException) -> Problem:
    """The one line and the exit code for an exception that reached the command line."""
    for translate in (_ours, _redis, _broker, _database):
        problem = translate(exc)
        if problem is not None:
            return problem
    if isinstance(exc, TimeoutError | RuntimeError):
        return Problem(str(exc), EXIT_FAILED)
    return Problem(f"unexpected {type(exc).__name__}: {_first_line(str(exc))} (run `qvq --debug ...` "
                   "for the traceback)", EXIT_FAILED)


def _ours(exc: BaseException) -> Problem | None:
    if isinstance(exc, ConfigError):
        return Problem(f"{exc} (fix the setting and try again)", EXIT_USAGE)
    if isinstance(exc, click.ClickException):
        return Problem(exc.format_message(), exc.exit_code)
    if isinstance(exc, KeyError) and str(exc.args[0] if exc.args else "").startswith(("no task", "no batch")):
        return Problem(str(exc.args[0]), EXIT_USAGE)
    if isinstance(exc, QvqError):
        unreachable = _redis(exc.__cause__) or _broker(exc.__cause__) if exc.__cause__ else None
        if unreachable:  # EnqueueError: the queue was unreachable
            return Problem(f"{unreachable.line}; {_task_part(exc.message)}", EXIT_USAGE)
        refused = exc.code in USAGE_CODES or isinstance(exc, ImageError)  # an ImageError here: checked before queueing
        return Problem(f"{exc.code}: {exc.message}", EXIT_USAGE if refused else EXIT_FAILED)
    return None


def _task_part(message: str) -> str:
    # "could not enqueue task <id>: <driver text>": keep the task, drop the driver's text (an address).
    head = message.split(":", 1)[0]
    task = head.removeprefix("could not enqueue task ").strip()
    return f"task {task} is marked failed: `qvq retry {task}` queues it again" if task != head else head


# The translators import the libraries whose errors they read when an error is explained, not when the
# command starts (`qvq --help` loads none of them).
def _redis(exc: BaseException) -> Problem | None:
    import redis

    if isinstance(exc, redis.AuthenticationError | redis.exceptions.AuthenticationWrongNumberOfArgsError):
        return Problem("Redis refused the credentials (check the password in REDIS_URL)", EXIT_USAGE)
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
        return Problem(f"cannot reach Redis: {_reason(exc)} (check REDIS_URL, and that Redis is running)",
                       EXIT_USAGE)
    return None


def _broker(exc: BaseException) -> Problem | None:
    from kombu.exceptions import OperationalError

    if isinstance(exc, OperationalError):
        return Problem(f"cannot reach the Celery broker: {_reason(exc)} (check CELERY_BROKER_URL, or REDIS_URL "
                       "when it is unset)", EXIT_USAGE)
    return None


def _database(exc: BaseException) -> Problem | None:
    import sqlalchemy as sa

    if isinstance(exc, sa.exc.NoSuchModuleError | sa.exc.ArgumentError):
        return Problem("DATABASE_URL is not a database URL this install can open: use sqlite:///path.db or "
                       "postgresql://user@host/db", EXIT_USAGE)
    if isinstance(exc, ModuleNotFoundError) and exc.name in {"psycopg", "psycopg2", "MySQLdb", "pymysql"}:
        return Problem(f"DATABASE_URL needs the {exc.name} driver, which is not installed (for PostgreSQL: "
                       "pip install 'qvq-queue[postgres]')", EXIT_USAGE)
    if isinstance(exc, sa.exc.OperationalError | sa.exc.ProgrammingError) and _missing_schema(exc):
        return Problem("the database at DATABASE_URL has no qvq tables yet (nothing was submitted there?): a "
                       "reading command creates none; check DATABASE_URL", EXIT_USAGE)
    if isinstance(exc, sa.exc.IntegrityError):
        return Problem("the database refused a duplicate (a task id or idempotency key already used?)",
                       EXIT_USAGE)
    if isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError | sa.exc.TimeoutError):
        orig = getattr(exc, "orig", None) or exc
        return Problem(f"cannot use the database: {_reason(orig)} (check DATABASE_URL, and that the "
                       "database is running)", EXIT_USAGE)
    return None


def _missing_schema(exc: BaseException) -> bool:
    from contracts.store import Store

    return Store.is_missing_schema(exc)


def _reason(exc: BaseException) -> str:
    """Why a connection failed, without the address: the OS error when there is one, else the last
    clause of the driver's first line ("...port 5432 failed: Connection refused" -> "Connection refused")."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return str(seen.strerror)
        if isinstance(seen, TimeoutError):
            return "timed out"
        seen = seen.__cause__ or seen.__context__
    line = _first_line(str(exc))
    return line.rsplit(": ", 1)[-1].strip().rstrip(".") or type(exc).__name__


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""
