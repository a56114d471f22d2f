"""`qvq batch submit | status | results | cancel | retry`: one question over many objects (README, Batches).

    qvq batch submit s3://shop/photos/ --suffix .jpg --prompt "Is the label readable?" --dry-run
    qvq batch submit s3://shop/photos/ --suffix .jpg --prompt "Is the label readable?" --follow
    qvq batch results b-1f2e... --csv > labels.csv

--follow draws a progress bar (done/items, rate, ETA, cost) on a terminal and prints a plain line per
progress event (at most one a second) when piped. Every command talks to a TaskClient (direct, or HTTP
with --api).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from typing import Any

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from contracts import events as ev
from contracts.batches.progress import ENDED
from producer.cli.common import client, console, friendly_errors, notices, question
from producer.cli.errors import EXIT_CANCELLED, EXIT_FAILED, EXIT_OK
from producer.cli.render import money
from producer.protocol import TaskClient

PLAIN_EVERY_S = 1.0  # piped: at most one progress line a second


@click.group()
def batch() -> None:
    """Batches: one question over every object under a prefix, or over a list of references."""


@batch.command("submit")
@click.argument("sources", nargs=-1, required=True)
@click.option("--prompt", help="The question, asked of every item; `-` reads it from stdin.")
@click.option("--prompt-file", type=click.Path(dir_okay=False, allow_dash=True), help="Read the question from a file.")
@click.option("--suffix", default=None, help="With a prefix: only keys ending with this (e.g. .jpg).")
@click.option("--refs-file", type=click.File("r"), help="A file of image references, one per line (`-`: stdin).")
@click.option("--model", help="qvq-max (default from QVQ_MODEL), qvq-plus, or a dated snapshot.")
@click.option("--high-resolution", is_flag=True, help="Per-image token cap 16384 instead of 1280.")
@click.option("--tenant", help="Who pays; budgets and limits apply per item.")
@click.option("--batch-id", help="Choose the id: submitting it again adds only objects that are new.")
@click.option("--callback-url", help="POSTed batch.completed (signed), once per round.")
@click.option("--max-cost", "max_cost", help="CNY: refused if the estimate may cost more; no item starts once spent.")
@click.option("--cache", is_flag=True, help="Answer from the result cache when an item was answered before.")
@click.option("--dry-run", is_flag=True, help="Count the items and estimate the cost; queue nothing.")
@click.option("--follow", is_flag=True, help="Show the batch's progress until it ends.")
@click.option("--json", "as_json", is_flag=True, help="Print the API's answer as JSON.")
@friendly_errors
def submit(sources: tuple[str, ...], prompt: str | None, prompt_file: str | None, suffix: str | None,
           refs_file: Any, model: str | None, high_resolution: bool, tenant: str | None, batch_id: str | None,
           callback_url: str | None, max_cost: str | None, cache: bool, dry_run: bool, follow: bool,
           as_json: bool) -> None:
    """Submit a batch. SOURCES: one prefix (s3://bucket/prefix/ ending in "/", or oss://...), every object
    under it; or image references (`-` reads more from stdin, one per line)."""
    request = _request(sources, refs_file, suffix, question(prompt, prompt_file))
    options = {"model": model, "tenant": tenant, "batch_id": batch_id, "callback_url": callback_url,
               "max_cost_cny": max_cost}
    request.update({name: value for name, value in options.items() if value is not None})
    request.update({name: True for name, on in (("high_resolution", high_resolution), ("cache", cache),
                                                ("dry_run", dry_run)) if on})
    with client() as tasks:
        if not as_json and console.is_terminal:
            notices.print("listing and estimating..." if dry_run else "listing, estimating and queuing...",
                          markup=False)
        answer = tasks.submit_batch(request)
        if as_json:
            click.echo(json.dumps(answer))
        else:
            _print_submitted(answer)
        if follow and not dry_run:
            sys.exit(_follow(tasks, answer["batch_id"]))


def is_prefix(source: str) -> bool:
    """s3://bucket/prefix/ (ending in "/") or a bare s3://bucket (or oss://): every object under it."""
    scheme, _, rest = source.partition("://")
    return scheme.lower() in ("s3", "oss") and (rest.endswith("/") or "/" not in rest)


def _request(sources: tuple[str, ...], refs_file: Any, suffix: str | None, prompt: str) -> dict[str, Any]:
    if len(sources) == 1 and is_prefix(sources[0]):
        return {"source": sources[0], "prompt": prompt, **({"suffix": suffix} if suffix else {})}
    if suffix:
        raise click.UsageError("--suffix filters a prefix listing; with references, pass only the ones you want")
    refs = [ref for ref in sources if ref != "-"]
    if refs_file is not None or "-" in sources:
        handle: Any = refs_file if refs_file is not None else sys.stdin
        refs += [line.strip() for line in handle if line.strip()]
    if not refs:
        raise click.UsageError("no references: give a prefix, references, or --refs-file")
    return {"items": refs, "prompt": prompt}


def _print_submitted(answer: dict[str, Any]) -> None:
    estimate = answer.get("estimate") or {}
    cost = (f"estimated {money(estimate.get('cost_cny_min'))} to {money(estimate.get('cost_cny_max'))}, "
            f"{estimate.get('image_tokens', 0):,} image tokens") if estimate else "no estimate"
    unread = f" ({estimate['unread']} sizes unread: counted at the limits)" if estimate.get("unread") else ""
    if answer.get("dry_run"):
        click.echo(f"{answer['items']:,} items; {cost}{unread}; nothing queued (dry run)")
        return
    added = answer.get("created", answer["items"])
    click.echo(f"batch {answer['batch_id']}: {answer['items']:,} items ({added:,} new); {cost}{unread}")


@batch.command("status")
@click.argument("batch_id")
@click.option("--follow", is_flag=True, help="Show the progress until the batch ends.")
@click.option("--json", "as_json", is_flag=True, help="Print the API's answer as JSON.")
@friendly_errors
def status(batch_id: str, follow: bool, as_json: bool) -> None:
    """A batch's status: items by status, cost so far, rate and ETA."""
    with client(read_only=True) as tasks:
        if follow:
            sys.exit(_follow(tasks, batch_id))
        view = tasks.batch(batch_id)
        click.echo(json.dumps(view) if as_json else _line(view))


@batch.command("results")
@click.argument("batch_id")
@click.option("--jsonl", "fmt", flag_value="jsonl", default=True, help="JSON Lines (the default).")
@click.option("--csv", "fmt", flag_value="csv", help="CSV, with a header line.")
@friendly_errors
def results(batch_id: str, fmt: str) -> None:
    """The finished items' results, one line each, in the batch's order (while it runs: those so far)."""
    with client(read_only=True) as tasks:
        view = tasks.batch(batch_id)
        if view["status"] not in ENDED:
            notices.print(f"batch {batch_id} is {view['status']}: only the {view['done']:,} items that ended "
                          f"so far (of {view['items']:,})", markup=False)
        for line in tasks.batch_results(batch_id, fmt):
            sys.stdout.write(line)


@batch.command("cancel")
@click.argument("batch_id")
@friendly_errors
def cancel(batch_id: str) -> None:
    """Cancel the queued items and stop the running ones."""
    with client() as tasks:
        answer = tasks.cancel_batch(batch_id)
        click.echo(f"batch {batch_id}: {answer['cancelled']:,} queued items cancelled, "
                   f"{answer['stopping']:,} running ones stopping")


@batch.command("retry")
@click.argument("batch_id")
@click.option("--follow", is_flag=True, help="Show the progress until the batch ends again.")
@friendly_errors
def retry(batch_id: str, follow: bool) -> None:
    """Queue the batch's failed items again (each a new run)."""
    with client() as tasks:
        answer = tasks.retry_batch(batch_id)
        click.echo(f"batch {batch_id}: {answer['retried']:,} failed items queued again")
        if follow and answer["retried"]:
            sys.exit(_follow(tasks, batch_id))


# -- progress --------------------------------------------------------------------------------------
def _line(view: dict[str, Any]) -> str:
    counts = ", ".join(f"{n:,} {name}" for name, n in sorted(view.get("counts", {}).items())) or "no items"
    eta = "" if view.get("eta_s") in (None, 0, 0.0) else f", ETA {_duration(float(view['eta_s']))}"
    return (f"batch {view['batch_id']} {view['status']}: {view['done']:,}/{view['items']:,} done ({counts}); "
            f"{money(view.get('cost'))}; {view.get('rate', 0):.2f} items/s{eta}")


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _follow(tasks: TaskClient, batch_id: str) -> int:
    """Show the batch's progress to its end; the exit code says how it ended (0 all completed, 1 some
    failed, 3 cancelled)."""
    view = tasks.batch(batch_id)
    events = tasks.batch_events(batch_id)
    last = _bar(view, events) if console.is_terminal else _plain(view, events)
    final = tasks.batch(batch_id) if last is None else {**view, **last, "batch_id": batch_id}
    click.echo(_line(final))
    if final.get("status") == "cancelled":
        return EXIT_CANCELLED
    return EXIT_FAILED if final.get("counts", {}).get("failed") else EXIT_OK


def _bar(view: dict[str, Any], events: Iterator[dict[str, Any]]) -> dict[str, Any] | None:
    columns = (TextColumn("[bold]{task.fields[batch]}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]} items/s"), TextColumn("ETA {task.fields[eta]}"),
               TextColumn("{task.fields[cost]}"), TextColumn("{task.fields[failed]}"), TimeElapsedColumn())
    last = None
    with Progress(*columns, console=console, transient=False) as progress:
        bar = progress.add_task("batch", total=view["items"] or None, completed=view["done"], **_fields(view))
        for event in events:
            last = event
            progress.update(bar, total=event["items"] or None, completed=event["done"], **_fields(event))
            if event["type"] == ev.BATCH_COMPLETED:
                break
    return last


def _plain(view: dict[str, Any], events: Iterator[dict[str, Any]]) -> dict[str, Any] | None:
    click.echo(_line(view))
    last, shown_at = None, time.monotonic()
    for event in events:
        last = event
        if event["type"] == ev.BATCH_COMPLETED:
            break
        if time.monotonic() - shown_at >= PLAIN_EVERY_S:
            click.echo(_line({**view, **event}))
            shown_at = time.monotonic()
    return last


def _fields(view: dict[str, Any]) -> dict[str, Any]:
    eta = view.get("eta_s")
    failed = view.get("counts", {}).get("failed", 0)
    return {"batch": str(view.get("batch_id", ""))[:24], "rate": f"{view.get('rate', 0):.2f}",
            "eta": "-" if eta is None else _duration(float(eta)), "cost": money(view.get("cost")),
            "failed": f"{failed:,} failed" if failed else ""}
