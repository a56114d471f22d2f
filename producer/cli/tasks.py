"""`qvq submit | follow | result | cancel | retry | tasks | failed`: one task's life, and the list of them.

Every command talks to a TaskClient (common.client(): the direct one, or HTTP with --api), never asking
which one it has.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

import click

from contracts.errors import RequestError
from producer.cli.common import (
    EXIT_BY_EVENT,
    EXIT_BY_STATUS,
    client,
    console,
    friendly_errors,
    moment,
    notices,
    print_rows,
    question,
)
from producer.cli.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_TERMINATED
from producer.cli.intake import check_conversation, check_local_images, is_local
from producer.cli.render import EventRenderer, money, print_json_events, print_record
from producer.cli.waiting import WaitingView, events_with_waiting
from producer.protocol import TaskClient


@click.command()
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
    text = question(prompt, prompt_file)
    check_local_images(images)
    fields: dict[str, Any] = {k: v for k, v in {"conversation_id": conversation_id, "tenant": tenant, "task_id": task_id,
                                "idempotency_key": idempotency_key, "callback_url": callback_url}.items() if v}
    if high_resolution:
        fields["high_resolution"] = True
    with client() as tasks:
        _check_before_submit(tasks, conversation_id, new_conversation, bool(images), task_id, idempotency_key)
        if any(is_local(ref) for ref in images) and not tasks.uploads_local_files:
            notices.print("note: local files are read by the worker from this machine's disk: it needs "
                          "QVQ_ALLOW_LOCAL_FILES=1 and must run on this host", markup=False)
        handle = tasks.submit(images=list(images), prompt=text, model=model, **fields)
        if not follow:
            click.echo(json.dumps({"task_id": handle.task_id, "created": handle.created}) if as_json
                       else handle.task_id)
            return
        sys.exit(follow_task(tasks, handle.task_id, 0, as_json))


def _check_before_submit(tasks: TaskClient, conversation_id: str | None, new_conversation: bool, with_images: bool,
                         task_id: str | None, idempotency_key: str | None) -> None:
    if check_conversation(tasks.conversation_exists, conversation_id, new=new_conversation, with_images=with_images) \
            and not new_conversation:
        notices.print(f"note: conversation {conversation_id} is new: this turn starts it", markup=False)
    if task_id and not idempotency_key and _exists(tasks, task_id):
        raise RequestError(f"{task_id!r} is already taken: choose another --task-id or leave it out",
                           field="task_id")
    tasks.ping()  # an unreachable service is reported before anything is recorded


def _exists(tasks: TaskClient, task_id: str) -> bool:
    try:
        tasks.get(task_id)
    except KeyError:  # NotFoundError
        return False
    return True


def follow_task(tasks: TaskClient, task_id: str, from_seq: int, as_json: bool) -> int:
    """Render the task's events; while it is queued, say on stderr what it waits for. The exit code.
    Ctrl-C or SIGTERM stops following (the spinner is stopped, the cursor shown again) and says how to
    follow the task again; the task itself goes on."""
    seen = [from_seq]
    stopped_by = [EXIT_INTERRUPTED]

    def tracked() -> Iterator[dict[str, Any]]:
        for event in events_with_waiting(tasks, task_id, from_seq, WaitingView(notices)):
            seen[0] = max(seen[0], int(event.get("seq") or 0))
            yield event

    try:
        with _sigterm_as_interrupt(stopped_by):
            terminal = print_json_events(tracked(), sys.stdout) if as_json else EventRenderer(console).render_all(
                tracked())
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM: every finally has run (the spinner is gone)
        _say_still_running(tasks, task_id, seen[0])
        return stopped_by[0]
    return EXIT_BY_EVENT.get(terminal["type"], EXIT_FAILED) if terminal else EXIT_FAILED


@contextlib.contextmanager
def _sigterm_as_interrupt(stopped_by: list[int]) -> Iterator[None]:
    """While following, SIGTERM unwinds like Ctrl-C (so finally blocks run and the cursor comes back)."""
    def terminate(_signum: int, _frame: Any) -> None:
        stopped_by[0] = EXIT_TERMINATED
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminate) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _say_still_running(tasks: TaskClient, task_id: str, seq: int) -> None:
    try:
        status = tasks.get(task_id).status
    except Exception:  # stopping must not fail on a lookup
        status = "not finished"
    click.echo(f"stopped following: task {task_id} is {status} and goes on without this viewer; "
               f"`qvq follow {task_id} --from-seq {seq}` follows it again, `qvq cancel {task_id}` stops it",
               err=True)


@click.command()
@click.argument("task_id")
@click.option("--from-seq", default=0, show_default=True, help="Only events after this seq.")
@click.option("--json", "as_json", is_flag=True, help="One JSON event per line.")
@friendly_errors
def follow(task_id: str, from_seq: int, as_json: bool) -> None:
    """Replay and then follow a task's events live."""
    with client(read_only=True) as tasks:
        tasks.get(task_id)
        tasks.ping()
        sys.exit(follow_task(tasks, task_id, from_seq, as_json))


@click.command()
@click.argument("task_id")
@click.option("--json", "as_json", is_flag=True, help="The whole record as JSON.")
@friendly_errors
def result(task_id: str, as_json: bool) -> None:
    """Show the persisted result of a task."""
    with client(read_only=True) as tasks:
        record = tasks.get(task_id)
    if as_json:
        click.echo(json.dumps(record.to_dict(), ensure_ascii=False, indent=2, default=str))
    else:
        print_record(console, record)
    sys.exit(EXIT_BY_STATUS.get(record.status, EXIT_FAILED))


@click.command()
@click.argument("task_id")
@friendly_errors
def cancel(task_id: str) -> None:
    """Stop a queued or running task."""
    with client() as tasks:
        changed = tasks.cancel(task_id)
    click.echo("cancel requested" if changed else "already finished")


@click.command()
@click.argument("task_id")
@click.option("--follow", "follow_it", is_flag=True, help="Follow the new attempt's events until it ends.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@friendly_errors
def retry(task_id: str, follow_it: bool, as_json: bool) -> None:
    """Queue a failed or cancelled task again (same task id, a new attempt)."""
    with client() as tasks:
        tasks.ping()  # an unreachable service is reported before the task is touched
        from_seq = tasks.retry(task_id)
        if follow_it:  # the log still holds the earlier attempts' events: start after them
            sys.exit(follow_task(tasks, task_id, from_seq, as_json))
    if as_json:
        click.echo(json.dumps({"task_id": task_id, "from_seq": from_seq}))
    else:
        click.echo(f"{task_id} queued again; follow it with: qvq follow {task_id} --from-seq {from_seq}")


@click.command("tasks")
@click.option("--status", type=click.Choice(["queued", "running", "completed", "failed", "cancelled", "waiting"]),
              help="Only these (waiting: queued or running tasks held back by flow control).")
@click.option("--since", help="ISO date/time or a number of hours ago (e.g. 24).")
@click.option("--tenant", help="Only this tenant's tasks.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--json", "as_json", is_flag=True, help="One JSON array of task summaries.")
@friendly_errors
def list_tasks(status: str | None, since: str | None, tenant: str | None, limit: int, as_json: bool) -> None:
    """List tasks, newest first."""
    with client(read_only=True) as tasks:
        found = tasks.tasks(status=status, since=moment("--since", since), limit=limit, tenant=tenant)
    if as_json:
        click.echo(json.dumps(found, ensure_ascii=False, indent=2, default=str))
        return
    print_rows(("task", "status", "model", "tenant", "created", "attempts", "error", "cost"),
               [(t["task_id"], t["status"], t["model"], t["tenant"] or "", (t["created_at"] or "")[:19],
                 str(t["attempts"]), (t["error"] or {}).get("code", ""),
                 money(t["cost"]["total"], t["cost"].get("currency", "CNY")) if t.get("cost") else "")
                for t in found])


@click.command()
@click.option("--since", help="ISO date/time or a number of hours ago (e.g. 24).")
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def failed(since: str | None, as_json: bool) -> None:
    """List failed tasks with their error codes."""
    with client(read_only=True) as tasks:
        found = tasks.tasks(status="failed", since=moment("--since", since))
    if as_json:
        click.echo(json.dumps(found, ensure_ascii=False, default=str, indent=2))
        return
    print_rows(("task", "created", "code", "message"),
               [(t["task_id"], (t["created_at"] or "")[:19], (t["error"] or {}).get("code") or "",
                 (t["error"] or {}).get("message") or "") for t in found])
