"""What every `qvq` command shares: the client it talks to, its consoles, one line per error, the exit codes,
tables, and the options read the same way everywhere (the question, points in time)."""

from __future__ import annotations

import datetime as dt
import os
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from contracts.errors import ConfigError
from contracts.settings import get_settings
from producer.cli.errors import EXIT_CANCELLED, EXIT_OK, EXIT_PIPE, explain
from producer.cli.intake import read_question
from producer.moments import parse_iso
from producer.protocol import TaskClient

console = Console(highlight=False, soft_wrap=True)
notices = Console(stderr=True, highlight=False, soft_wrap=True)  # hints and waiting lines, never on stdout
EXIT_BY_STATUS = {"completed": EXIT_OK, "queued": EXIT_OK, "running": EXIT_OK, "cancelled": EXIT_CANCELLED}
EXIT_BY_EVENT = {"task.completed": EXIT_OK, "task.cancelled": EXIT_CANCELLED}
API_URL_KEY = "qvq.api_url"


def client(*, read_only: bool = False) -> TaskClient:
    """The HTTP client when --api or QVQ_API_URL names an API (with QVQ_API_KEY), else the direct one.

    Each is imported when a command first needs it: `qvq --help` and `qvq --version` load neither
    (the direct client brings Celery, SQLAlchemy and Redis: 0.4 s of a command's start). `read_only`
    commands never create or migrate the database's tables (the direct client refuses a database without
    them, in one line)."""
    settings = get_settings()
    context = click.get_current_context(silent=True)
    api_url = (context.meta.get(API_URL_KEY) if context else None) or settings.api_url
    if api_url:
        from producer.http_client import HttpClient

        return HttpClient(api_url, settings.api_key)
    from producer.client import Client

    return Client(settings, read_only=read_only)


def _debug() -> bool:
    context = click.get_current_context(silent=True)
    return bool(context and context.find_root().params.get("debug"))


def friendly_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn every error into one clear line on stderr and the right exit code (producer/cli/errors.py);
    the traceback only with --debug."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except BrokenPipeError:  # the reader went away (`qvq follow --json | head -3`): stop quietly
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # Python's own flush at exit must not fail again
            sys.exit(EXIT_PIPE)
        except Exception as exc:
            if _debug():
                raise
            problem = explain(exc)
            click.echo(f"error: {problem.line}", err=True)
            sys.exit(problem.exit_code)

    return wrapper


def question(prompt: str | None, prompt_file: str | None) -> str:
    if "-" in (prompt, prompt_file) and sys.stdin.isatty():
        notices.print("reading the question from stdin: end it with Ctrl-D", markup=False)
    return read_question(prompt, prompt_file)


def moment(option: str, value: str | None) -> dt.datetime | None:
    """--since/--until: a number of hours ago, or an ISO date/time."""
    if not value:
        return None
    try:
        return dt.datetime.now(dt.UTC) - dt.timedelta(hours=float(value))
    except ValueError:
        pass
    try:
        return parse_iso(value)
    except ValueError as exc:
        raise ConfigError(f"{option} {value!r}: expected hours ago or an ISO date/time") from exc


def print_rows(columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """A table on a terminal; tab-separated lines when piped, so nothing is cut or wrapped for grep."""
    if not console.is_terminal:
        for row in (columns, *rows):
            click.echo("\t".join(row))
        return
    table = Table(*columns)
    for row in rows:
        table.add_row(*row)
    console.print(table)
