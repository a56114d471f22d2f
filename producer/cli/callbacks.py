"""`qvq callbacks show | redeliver TASK_ID`: a task's callback delivery, over either transport."""

from __future__ import annotations

import json

import click

from producer.cli.common import client, friendly_errors


@click.group()
def callbacks() -> None:
    """A task's callback delivery: show it, send it again."""


@callbacks.command("show")
@click.argument("task_id")
@friendly_errors
def show(task_id: str) -> None:
    """The delivery of the task's callback: status, tries, last answer."""
    with client(read_only=True) as tasks:
        delivery = tasks.callback(task_id)
    click.echo(json.dumps(delivery, indent=2, default=str) if delivery else f"task {task_id} has no callback")


@callbacks.command("redeliver")
@click.argument("task_id")
@friendly_errors
def redeliver(task_id: str) -> None:
    """Send the task's callback again now (a fresh retry window)."""
    with client() as tasks:
        delivery = tasks.redeliver_callback(task_id)
    click.echo(f"callback {delivery['event_id']} queued for delivery to {delivery['url']}")
