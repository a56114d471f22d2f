"""The `qvq` command.

Exit codes: 0 completed, 1 the task failed, 2 bad usage, input or settings (also an unreachable
Redis or database), 3 the task was cancelled. Errors are one line on stderr; `qvq --debug ...`
shows the traceback instead.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from contracts.errors import ConfigError, RequestError
from contracts.settings import get_settings
from producer.cli_errors import EXIT_CANCELLED, EXIT_FAILED, EXIT_OK, EXIT_USAGE, explain  # noqa: F401 (commands use EXIT_USAGE)
from producer.intake import check_conversation, check_local_images, is_local, read_question

console = Console(highlight=False, soft_wrap=True)
notices = Console(stderr=True, highlight=False, soft_wrap=True)  # hints and waiting lines, never on stdout
EXIT_BY_STATUS = {"completed": EXIT_OK, "queued": EXIT_OK, "running": EXIT_OK, "cancelled": EXIT_CANCELLED}
EXIT_BY_EVENT = {"task.completed": EXIT_OK, "task.cancelled": EXIT_CANCELLED}


def _client() -> Any:
    """The HTTP client when --api or QVQ_API_URL names an API (with QVQ_API_KEY), else the Redis one."""
    settings = get_settings()
    context = click.get_current_context(silent=True)
    api_url = (context.meta.get("qvq.api_url") if context else None) or settings.api_url
    if api_url:
        from producer.http_client import HttpClient

        return HttpClient(api_url, settings.api_key)
    from producer.client import Client

    return Client(settings)


def _debug() -> bool:
    context = click.get_current_context(silent=True)
    return bool(context and context.find_root().params.get("debug"))


def _fail(exc: Exception) -> None:
    """One line on stderr and the exit code; the traceback only with --debug."""
    if _debug():
        raise exc
    problem = explain(exc)
    click.echo(f"error: {problem.line}", err=True)
    sys.exit(problem.exit_code)


def friendly_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn every error into one clear line and the right exit code (see producer/cli_errors.py)."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:
            _fail(exc)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show the traceback of an error instead of one line.")
@click.version_option(package_name="qvq-queue", prog_name="qvq", message="%(prog)s %(version)s")
def main(debug: bool) -> None:
    """qvq-queue: visual-reasoning jobs on Alibaba QVQ, streamed live, persisted with their bill.

    Exit codes: 0 completed, 1 the task failed, 2 bad usage, input or settings (an unreachable Redis
    or database included), 3 the task was cancelled."""


@main.command()
@click.argument("images", nargs=-1)
@click.option("--prompt", help="The question (a sample one is used when omitted); `-` reads it from stdin.")
@click.option("--prompt-file", type=click.Path(dir_okay=False, allow_dash=True), help="Read the question from a file.")
@friendly_errors
def demo(images: tuple[str, ...], prompt: str | None, prompt_file: str | None) -> None:
    """Run the whole pipeline on embedded defaults and stream the thinking and the answer."""
    from producer.demo import run_demo

    question = _question(prompt, prompt_file) if prompt or prompt_file else None
    check_local_images(images)
    sys.exit(run_demo(images, question, console))


@main.command()
@click.argument("images", nargs=-1)
@click.option("--prompt", help="The question about the images; `-` reads it from stdin.")
@click.option("--prompt-file", type=click.Path(dir_okay=False, allow_dash=True),
              help="Read the question from this file (`-`: stdin); for questions too long for a command line.")
@click.option("--model", help="qvq-max (default from QVQ_MODEL), qvq-plus, or a dated snapshot.")
@click.option("--conversation", "conversation_id", help="Continue this conversation (refused when unknown).")
@click.option("--new-conversation", is_flag=True, help="--conversation ID starts a new conversation.")
@click.option("--high-resolution", is_flag=True, help="Per-image token cap 16384 instead of 1280.")
@click.option("--tenant", help="Who pays; usage is accounted per tenant.")
@click.option("--task-id", help="Choose the task id (default: a UUID).")
@click.option("--idempotency-key", help="A repeated submit with the same key returns the first task.")
@click.option("--callback-url", help="POSTed the terminal event, signed (X-Qvq-Signature).")
@click.option("--follow", is_flag=True, help="Stream the task's events until it ends.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@friendly_errors
def submit(images: tuple[str, ...], prompt: str | None, prompt_file: str | None, model: str | None,
           conversation_id: str | None, new_conversation: bool, high_resolution: bool, tenant: str | None,
           task_id: str | None, idempotency_key: str | None, callback_url: str | None, follow: bool,
           as_json: bool) -> None:
    """Enqueue a job; prints the task id (or follows it live with --follow)."""
    question = _question(prompt, prompt_file)
    check_local_images(images)
    if any(is_local(ref) for ref in images):
        notices.print("note: local files are read by the worker from this machine's disk: it needs "
                      "QVQ_ALLOW_LOCAL_FILES=1 and must run on this host", markup=False)
    fields: dict[str, Any] = {k: v for k, v in {"conversation_id": conversation_id, "tenant": tenant, "task_id": task_id,
                                "idempotency_key": idempotency_key, "callback_url": callback_url}.items() if v}
    if high_resolution:
        fields["high_resolution"] = True
    with _client() as client:
        if hasattr(client, "redis"):  # over HTTP the API makes these checks itself
            _check_before_submit(client, conversation_id, new_conversation, bool(images), task_id, idempotency_key)
        handle = client.submit(images=list(images), prompt=question, model=model, **fields)
        if not follow:
            click.echo(json.dumps({"task_id": handle.task_id, "created": handle.created}) if as_json
                       else handle.task_id)
            return
        sys.exit(_follow(client, handle.task_id, 0, as_json))


def _check_before_submit(client: Any, conversation_id: str | None, new_conversation: bool, with_images: bool,
                         task_id: str | None, idempotency_key: str | None) -> None:
    if check_conversation(client.store, conversation_id, new=new_conversation, with_images=with_images) \
            and not new_conversation:
        notices.print(f"note: conversation {conversation_id} is new: this turn starts it", markup=False)
    if task_id and not idempotency_key and client.store.get(task_id) is not None:
        raise RequestError(f"{task_id!r} is already taken: choose another --task-id or leave it out",
                           field="task_id")
    client.redis.ping()  # an unreachable Redis is reported before anything is recorded


def _question(prompt: str | None, prompt_file: str | None) -> str:
    if "-" in (prompt, prompt_file) and sys.stdin.isatty():
        notices.print("reading the question from stdin: end it with Ctrl-D", markup=False)
    return read_question(prompt, prompt_file)


def _ping(client: Any) -> None:
    """Report an unreachable Redis before anything is touched (a client over HTTP has none)."""
    if hasattr(client, "redis"):
        client.redis.ping()


def _follow(client: Any, task_id: str, from_seq: int, as_json: bool) -> int:
    """Render the task's events; while it is queued, say on stderr what it waits for."""
    from producer.render import EventRenderer, print_json_events
    from producer.waiting import WaitingView, events_with_waiting

    if hasattr(client, "redis"):
        events = events_with_waiting(client, task_id, from_seq, WaitingView(notices))
    else:  # over HTTP: the API's own events (the queue is not ours to look at)
        events = client.events(task_id, from_seq=from_seq)
    terminal = print_json_events(events, sys.stdout) if as_json else EventRenderer(console).render_all(events)
    return EXIT_BY_EVENT.get(terminal["type"], EXIT_FAILED) if terminal else EXIT_FAILED


@main.command()
@click.argument("task_id")
@click.option("--from-seq", default=0, show_default=True, help="Only events after this seq.")
@click.option("--json", "as_json", is_flag=True, help="One JSON event per line.")
@friendly_errors
def follow(task_id: str, from_seq: int, as_json: bool) -> None:
    """Replay and then follow a task's events live."""
    with _client() as client:
        client.get(task_id)
        _ping(client)
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
    sys.exit(EXIT_BY_STATUS.get(record.status, EXIT_FAILED))


def _utc(moment: dt.datetime) -> dt.datetime:
    return moment.astimezone(dt.UTC) if moment.tzinfo else moment  # SQLite gives naive UTC times


def _print_record(record: Any) -> None:
    from rich.text import Text

    from producer.render import clean, print_images, print_usage

    head = Text(clean(record.id), style="bold")
    head.append(f"  {record.status}", style="green" if record.status == "completed" else "yellow")
    head.append(f"  model {clean(record.model)}  attempts {record.attempts}"
                + (f"  tenant {clean(record.tenant)}" if record.tenant else "")
                + (f"  conversation {clean(record.conversation_id)}" if record.conversation_id else ""))
    console.print(head)
    times = [f"{label} {_utc(moment):%Y-%m-%d %H:%M:%S} UTC" for label, moment in
             (("created", record.created_at), ("started", record.started_at), ("finished", record.finished_at))
             if moment]
    console.print(Text("  ".join(times), style="dim"))
    question = (record.request or {}).get("prompt")
    if question:
        console.rule("Question", style="dim", align="left")
        console.print(Text(clean(question)))
    if record.images:
        console.print()
        print_images(console, record.images)
    for title, text, style in (("Thinking", record.reasoning, "dim"), ("Answer", record.answer, "")):
        if text:
            console.print()
            console.rule(title, style=style or "bold green", align="left")
            console.print(Text(clean(text), style=style))
    if record.error_code:
        line = Text(f"\n{clean(record.error_code)}", style="bold red")
        line.append(f": {clean(record.error_message)}", style="")
        console.print(line)
    console.print()
    print_usage(console, record.usage, record.cost, record.timings)


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
        from producer.render import money

        _print_rows((by, "calls", "estimated", "prompt tokens", "completion tokens", "total tokens", "cost (CNY)"),
                    [(str(row[by]), *(str(row[name]) for name in USAGE_COLUMNS[:-1]), money(row["cost_cny"], ""))
                     for row in [*out, {by: "total", **total}]])


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
        records = client.store.list_tasks(status="failed", since=_moment("--since", since))
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in records], default=str, indent=2))
        return
    _print_rows(("task", "created", "code", "message"),
                [(r.id, r.created_at.isoformat(timespec="seconds"), r.error_code or "", r.error_message or "")
                 for r in records])


@main.command()
@click.option("--status", type=click.Choice(["queued", "running", "completed", "failed", "cancelled", "waiting"]),
              help="Only these (waiting: queued or running tasks held back by flow control).")
@click.option("--since", help="ISO date/time or a number of hours ago (e.g. 24).")
@click.option("--tenant", help="Only this tenant's tasks.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--json", "as_json", is_flag=True, help="One JSON array of task summaries.")
@friendly_errors
def tasks(status: str | None, since: str | None, tenant: str | None, limit: int, as_json: bool) -> None:
    """List tasks, newest first."""
    from producer.render import money

    with _client() as client:
        found = client.tasks(status=status, since=_moment("--since", since), limit=limit, tenant=tenant)
    if as_json:
        click.echo(json.dumps(found, ensure_ascii=False, indent=2, default=str))
        return
    _print_rows(("task", "status", "model", "tenant", "created", "attempts", "error", "cost"),
                [(t["task_id"], t["status"], t["model"], t["tenant"] or "", (t["created_at"] or "")[:19],
                  str(t["attempts"]), (t["error"] or {}).get("code", ""),
                  money(t["cost"]["total"], t["cost"].get("currency", "CNY")) if t.get("cost") else "")
                 for t in found])


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
        _ping(client)  # an unreachable Redis is reported before the task is touched
        from_seq = client.retry(task_id)
        if follow:  # the log still holds the earlier attempts' events: start after them
            sys.exit(_follow(client, task_id, from_seq, as_json))
    if as_json:
        click.echo(json.dumps({"task_id": task_id, "from_seq": from_seq}))
    else:
        click.echo(f"{task_id} queued again; follow it with: qvq follow {task_id} --from-seq {from_seq}")


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
@friendly_errors
def worker(ctx: click.Context) -> None:
    """Run a worker (threads pool, queue QVQ_QUEUE); extra options go to `celery worker`."""
    from producer.worker_command import celery_worker_args

    settings = get_settings()
    from worker.app import app

    app.worker_main(celery_worker_args(concurrency=settings.worker_concurrency, queue=settings.queue,
                                       extra=ctx.args))


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
@click.option("--tps", type=float, help="Tokens per second (default 0: as fast as possible).")
@click.option("--first-token-s", type=float, help="Delay before the first token (default 0).")
@click.option("--reasoning-tokens", type=int, help="Chunks of thinking, at least (default 40).")
@click.option("--answer-tokens", type=int, help="Chunks of answer, at least (default 20).")
@click.option("--rpm", type=int, help="Rate limit: requests per minute, also per second (rpm/60); beyond it 429 "
              "with Retry-After, like the service (default 0: none).")
@click.option("--tpm", type=int, help="Rate limit: tokens per minute, also per second (default 0: none).")
@friendly_errors
def emulator(host: str, port: int, tps: float | None, first_token_s: float | None, reasoning_tokens: int | None,
             answer_tokens: int | None, rpm: int | None, tpm: int | None) -> None:
    """Run the QVQ-compatible emulator (OpenAI-style streaming HTTP); see docs/emulator.md.

    Flags win over QVQ_EMULATOR_* variables; a prompt's `[[emulator: ...]]` directive wins over both."""
    from emulator.server import EmulatorConfig, serve

    config = EmulatorConfig.from_env(tps=tps, first_token_s=first_token_s, reasoning_tokens=reasoning_tokens,
                                     answer_tokens=answer_tokens, rpm=rpm, tpm=tpm)
    click.echo(f"QVQ emulator on http://{host}:{port}/v1  (QVQ_BASE_URL=http://{host}:{port}/v1)", err=True)
    serve(host, port, config)


# -- callbacks and the HTTP API option (webhooks, docs/webhooks.md) ----------------------------------
def _remember_api(context: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value:
        context.meta["qvq.api_url"] = value


main.params.append(click.Option(
    ["--api"], metavar="URL", expose_value=False, is_eager=True, callback=_remember_api,
    help="Talk to this HTTP API (with QVQ_API_KEY) instead of Redis and the database; or set QVQ_API_URL."))


@main.group()
def callbacks() -> None:
    """A task's callback delivery: show it, send it again."""


@callbacks.command("show")
@click.argument("task_id")
@friendly_errors
def callbacks_show(task_id: str) -> None:
    """The delivery of the task's callback: status, tries, last answer."""
    with _client() as client:
        record = client.get(task_id)
        delivery = getattr(record, "callback", None)
        if delivery is None and hasattr(client, "redis"):
            found = client.store.task_callback(task_id)
            delivery = found.to_dict() if found else None
    click.echo(json.dumps(delivery, indent=2, default=str) if delivery else f"task {task_id} has no callback")


@callbacks.command("redeliver")
@click.argument("task_id")
@friendly_errors
def callbacks_redeliver(task_id: str) -> None:
    """Send the task's callback again now (a fresh retry window)."""
    with _client() as client:
        if hasattr(client, "redeliver_callback"):
            delivery = client.redeliver_callback(task_id)
        else:
            delivery = _redeliver_direct(client, task_id)
    click.echo(f"callback {delivery['event_id']} queued for delivery to {delivery['url']}")


def _redeliver_direct(client: Any, task_id: str) -> dict[str, Any]:
    from contracts import callbacks as cb

    client.get(task_id)
    record = client.store.redeliver_callback(task_id)
    if record is None:
        raise KeyError(f"task {task_id} has no callback to deliver")
    client.celery.send_task(cb.TASK_NAME, args=[record.event_id], queue=cb.QUEUE, serializer="json")
    return dict(record.to_dict())


if __name__ == "__main__":
    main()
