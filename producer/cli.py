"""The `qvq` command. Exit codes: 0 done, 1 the task failed, 2 bad usage or input."""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from contracts.errors import ConfigError, QvqError
from contracts.settings import get_settings

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
console = Console(highlight=False, soft_wrap=True)


def _client() -> Any:
    from producer.client import Client

    return Client(get_settings())


def friendly_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn our errors into one clear line and the right exit code."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (ConfigError, KeyError) as exc:
            click.echo(f"error: {exc.args[0] if exc.args else exc}", err=True)
            sys.exit(EXIT_USAGE)
        except QvqError as exc:
            click.echo(f"error: {exc.code}: {exc.message}", err=True)
            sys.exit(EXIT_USAGE if exc.code in {"request.invalid", "model.unknown"} else EXIT_FAILED)
        except (TimeoutError, RuntimeError) as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_FAILED)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """qvq-queue: visual-reasoning jobs on Alibaba QVQ, streamed live, persisted with their bill."""


@main.command()
@click.argument("images", nargs=-1)
@click.option("--prompt", help="The question (a sample one is used when omitted).")
@friendly_errors
def demo(images: tuple[str, ...], prompt: str | None) -> None:
    """Run the whole pipeline on embedded defaults and stream the thinking and the answer."""
    from producer.demo import run_demo

    _check_local_paths(images)
    sys.exit(run_demo(images, prompt, console))


@main.command()
@click.argument("images", nargs=-1)
@click.option("--prompt", required=True, help="The question about the images.")
@click.option("--model", help="qvq-max (default from QVQ_MODEL), qvq-plus, or a dated snapshot.")
@click.option("--conversation", "conversation_id", help="Continue this conversation.")
@click.option("--high-resolution", is_flag=True, help="Per-image token cap 16384 instead of 1280.")
@click.option("--tenant", help="Who pays; usage is accounted per tenant.")
@click.option("--task-id", help="Choose the task id (default: a UUID).")
@click.option("--idempotency-key", help="A repeated submit with the same key returns the first task.")
@click.option("--follow", is_flag=True, help="Stream the task's events until it ends.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@friendly_errors
def submit(images: tuple[str, ...], prompt: str, model: str | None, conversation_id: str | None,
           high_resolution: bool, tenant: str | None, task_id: str | None, idempotency_key: str | None,
           follow: bool, as_json: bool) -> None:
    """Enqueue a job; prints the task id (or follows it live with --follow)."""
    _check_local_paths(images)
    fields: dict[str, Any] = {k: v for k, v in {"conversation_id": conversation_id, "tenant": tenant, "task_id": task_id,
                                "idempotency_key": idempotency_key}.items() if v}
    if high_resolution:
        fields["high_resolution"] = True
    with _client() as client:
        handle = client.submit(images=list(images), prompt=prompt, model=model, **fields)
        if not follow:
            click.echo(json.dumps({"task_id": handle.task_id, "created": handle.created}) if as_json
                       else handle.task_id)
            return
        sys.exit(_follow(client, handle.task_id, 0, as_json))


def _check_local_paths(images: tuple[str, ...]) -> None:
    """A plain path names a file on this machine: refuse a missing one here, before anything is queued."""
    for index, ref in enumerate(images):
        if "://" not in ref and not os.path.isfile(os.path.expanduser(ref)):
            raise click.UsageError(f"images[{index}]: no such file {ref!r}")


def _follow(client: Any, task_id: str, from_seq: int, as_json: bool) -> int:
    from producer.render import EventRenderer, print_json_events

    events = client.events(task_id, from_seq=from_seq)
    terminal = print_json_events(events, sys.stdout) if as_json else EventRenderer(console).render_all(events)
    return EXIT_OK if terminal and terminal["type"] == "task.completed" else EXIT_FAILED


@main.command()
@click.argument("task_id")
@click.option("--from-seq", default=0, show_default=True, help="Only events after this seq.")
@click.option("--json", "as_json", is_flag=True, help="One JSON event per line.")
@friendly_errors
def follow(task_id: str, from_seq: int, as_json: bool) -> None:
    """Replay and then follow a task's events live."""
    with _client() as client:
        client.get(task_id)
        sys.exit(_follow(client, task_id, from_seq, as_json))


@main.command()
@click.argument("task_id")
@click.option("--json", "as_json", is_flag=True, help="The whole record as JSON.")
@friendly_errors
def result(task_id: str, as_json: bool) -> None:
    """Show the persisted result of a task."""
    with _client() as client:
        record = client.get(task_id)
    if as_json:
        click.echo(json.dumps(record.to_dict(), ensure_ascii=False, indent=2, default=str))
    else:
        _print_record(record)
    sys.exit(EXIT_OK if record.status in {"completed", "queued", "running"} else EXIT_FAILED)


def _print_record(record: Any) -> None:
    console.print(f"[bold]{record.id}[/]  {record.status}  model={record.model}  attempts={record.attempts}")
    if record.reasoning:
        console.rule("Thinking", style="dim", align="left")
        console.print(record.reasoning, style="dim", markup=False)
    if record.answer:
        console.rule("Answer", style="bold green", align="left")
        console.print(record.answer, markup=False)
    if record.error_code:
        console.print(f"[red]{record.error_code}[/]: {record.error_message}")
    if record.usage:
        console.print(f"usage: {json.dumps(record.usage)}")
    if record.cost:
        console.print(f"cost: {record.cost['total']} {record.cost['currency']}")
    if record.timings:
        console.print(f"timings: {json.dumps(record.timings)}")


@main.command()
@click.argument("task_id")
@friendly_errors
def cancel(task_id: str) -> None:
    """Stop a queued or running task."""
    with _client() as client:
        changed = client.cancel(task_id)
    click.echo("cancel requested" if changed else "already finished")


USAGE_COLUMNS = ("calls", "estimated_calls", "prompt_tokens", "completion_tokens", "total_tokens", "cost_cny")


@main.command()
@click.option("--by", type=click.Choice(["model", "tenant", "day"]), default="model", show_default=True)
@click.option("--since", help="From (inclusive): an ISO date/time, or a number of hours ago (e.g. 24).")
@click.option("--until", help="To (exclusive): an ISO date/time, or a number of hours ago.")
@click.option("--tenant", help="Only this tenant's usage.")
@click.option("--json", "as_json", is_flag=True, help="Rows and total as JSON (costs as exact decimal strings).")
@click.option("--csv", "as_csv", is_flag=True, help="Rows as CSV, then a total row.")
@friendly_errors
def usage(by: str, since: str | None, until: str | None, tenant: str | None, as_json: bool, as_csv: bool) -> None:
    """Tokens and cost (CNY) from the ledger: every billed attempt, failed and cancelled ones included."""
    from decimal import Decimal

    from contracts.store import ANY_TENANT

    with _client() as client:
        rows = client.store.usage_summary(by, tenant=ANY_TENANT if tenant is None else tenant,
                                          since=_moment("--since", since), until=_moment("--until", until))
    out = [{by: None if row[by] is None else str(row[by]),
            **{name: int(row.get(name) or 0) for name in USAGE_COLUMNS[:-1]},
            "cost_cny": str(Decimal(row["cost_cny"] or 0))} for row in rows]
    total: dict[str, Any] = {name: sum(r[name] for r in out) for name in USAGE_COLUMNS[:-1]}
    total["cost_cny"] = str(sum((Decimal(str(r["cost_cny"])) for r in out), Decimal(0)))
    if as_json:
        click.echo(json.dumps({"rows": out, "total": total}, indent=2))
    elif as_csv:
        import csv

        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow((by, *USAGE_COLUMNS))
        for row in [*out, {by: "total", **total}]:
            writer.writerow((row[by] or "", *(row[name] for name in USAGE_COLUMNS)))
    else:
        _print_rows((by, "calls", "estimated", "prompt tokens", "completion tokens", "total tokens", "cost (CNY)"),
                    [(str(row[by]), *(str(row[name]) for name in USAGE_COLUMNS)) for row in [*out, {by: "total", **total}]])


def _moment(option: str, value: str | None) -> dt.datetime | None:
    if not value:
        return None
    try:
        return dt.datetime.now(dt.UTC) - dt.timedelta(hours=float(value))
    except ValueError:
        pass
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError as exc:
        raise ConfigError(f"{option} {value!r}: expected hours ago or an ISO date/time") from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


@main.command()
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def limits(as_json: bool) -> None:
    """Flow control now: per model family, requests and tokens used this second and minute against the
    limits (QVQ_MODEL_LIMITS), calls waiting for quota, and any hold after a 429."""
    from contracts import flow

    settings = get_settings()
    with _client() as client:
        rows = flow.snapshot(client.redis, settings.model_limits)
    if as_json:
        click.echo(json.dumps({"limiter": settings.flow_control, "families": rows}, indent=2))
        return
    if not settings.flow_control:
        click.echo("the model limiter is off (QVQ_FLOW_CONTROL=0, or the emulator without QVQ_MODEL_LIMITS)", err=True)
    _print_rows(("family", "requests 1s", "requests 60s", "tokens 1s", "tokens 60s", "waiting", "held after 429 (s)"),
                [(r["family"], f"{r['requests_1s']}/{r['rps']}", f"{r['requests_60s']}/{r['rpm']}",
                  f"{r['tokens_1s']}/{r['tps']}", f"{r['tokens_60s']}/{r['tpm']}", str(r["waiting"]),
                  f"{r['tightened_s']:g}") for r in rows])


@main.command()
@click.option("--since", help="ISO date/time or a number of hours ago (e.g. 24).")
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def failed(since: str | None, as_json: bool) -> None:
    """List failed tasks with their error codes."""
    with _client() as client:
        records = client.store.list_tasks(status="failed", since=_parse_since(since))
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in records], default=str, indent=2))
        return
    _print_rows(("task", "created", "code", "message"),
                [(r.id, r.created_at.isoformat(timespec="seconds"), r.error_code or "", r.error_message or "")
                 for r in records])


def _print_rows(columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """A table on a terminal; tab-separated lines when piped, so nothing is cut or wrapped for grep."""
    if not console.is_terminal:
        for row in (columns, *rows):
            click.echo("\t".join(row))
        return
    table = Table(*columns)
    for row in rows:
        table.add_row(*row)
    console.print(table)


@main.command()
@click.argument("task_id")
@click.option("--follow", is_flag=True, help="Follow the new attempt's events until it ends.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@friendly_errors
def retry(task_id: str, follow: bool, as_json: bool) -> None:
    """Queue a failed or cancelled task again (same task id, a new attempt)."""
    with _client() as client:
        from_seq = client.retry(task_id)
        if follow:  # the log still holds the earlier attempts' events: start after them
            sys.exit(_follow(client, task_id, from_seq, as_json))
    if as_json:
        click.echo(json.dumps({"task_id": task_id, "from_seq": from_seq}))
    else:
        click.echo(f"{task_id} queued again; follow it with: qvq follow {task_id} --from-seq {from_seq}")


def _parse_since(since: str | None) -> dt.datetime | None:
    if not since:
        return None
    try:
        return dt.datetime.now(dt.UTC) - dt.timedelta(hours=float(since))
    except ValueError:
        pass
    try:
        parsed = dt.datetime.fromisoformat(since)
    except ValueError as exc:
        raise ConfigError(f"--since {since!r}: expected hours or an ISO date") from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
def worker(ctx: click.Context) -> None:
    """Run a worker (threads pool, queue qvq); extra options go to `celery worker`."""
    from worker.app import app

    settings = get_settings()
    argv = ["worker", "-Q", "qvq", "-P", "threads", "-c", str(settings.worker_concurrency),
            "--without-gossip", "--without-mingle", *ctx.args]
    app.worker_main(argv)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True)
@friendly_errors
def api(host: str, port: int) -> None:
    """Run the HTTP API (enqueue, status, cancel, SSE events) and the web viewer at /."""
    import uvicorn

    from contracts.logging import configure
    from producer.api import create_app
    from producer.security import is_loopback

    settings = get_settings()
    if not settings.api_keys and not settings.api_insecure and not (host == "localhost" or is_loopback(host)):
        raise click.UsageError(f"refusing to serve on {host} without API keys: set QVQ_API_KEYS "
                               "(tenant:key,...), or QVQ_API_INSECURE=1 to serve an open API anyway")
    configure(settings.log_format, settings.log_level)
    click.echo(f"qvq API on http://{host}:{port}/  (docs: /docs)", err=True)
    uvicorn.run(create_app(settings), host=host, port=port, log_config=None, proxy_headers=False,
                timeout_graceful_shutdown=5)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8001, show_default=True)
@click.option("--tps", default=0.0, show_default=True, help="Tokens per second (0: as fast as possible).")
@click.option("--first-token-s", default=0.0, show_default=True, help="Delay before the first token.")
@click.option("--reasoning-tokens", default=40, show_default=True)
@click.option("--answer-tokens", default=20, show_default=True)
@click.option("--rpm", default=0, show_default=True, help="Rate limit: requests per minute, also per second "
              "(rpm/60); beyond it 429 with Retry-After, like the service (0: none).")
@click.option("--tpm", default=0, show_default=True, help="Rate limit: tokens per minute, also per second (0: none).")
def emulator(host: str, port: int, tps: float, first_token_s: float, reasoning_tokens: int,
             answer_tokens: int, rpm: int, tpm: int) -> None:
    """Run the QVQ-compatible emulator (OpenAI-style streaming HTTP)."""
    from emulator.server import EmulatorConfig, serve

    config = EmulatorConfig(tps=tps, first_token_s=first_token_s, reasoning_tokens=reasoning_tokens,
                            answer_tokens=answer_tokens, rpm=rpm, tpm=tpm)
    click.echo(f"QVQ emulator on http://{host}:{port}/v1  (QVQ_BASE_URL=http://{host}:{port}/v1)", err=True)
    serve(host, port, config)


if __name__ == "__main__":
    main()
