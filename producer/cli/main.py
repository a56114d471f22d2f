"""The `qvq` command group: its options (--debug, --version, --api) and its commands, each from the module
that holds it."""

from __future__ import annotations

import click

from producer.cli import batches, callbacks, reports, services, tasks
from producer.cli.common import API_URL_KEY


def _remember_api(context: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value:
        context.meta[API_URL_KEY] = value


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show the traceback of an error instead of one line.")
@click.option("--api", metavar="URL", expose_value=False, is_eager=True, callback=_remember_api,
              help="Talk to this HTTP API (with QVQ_API_KEY) instead of Redis and the database; or set QVQ_API_URL.")
@click.version_option(package_name="qvq-queue", prog_name="qvq", message="%(prog)s %(version)s")
def main(debug: bool) -> None:
    """qvq-queue: visual-reasoning jobs on Alibaba QVQ, streamed live, persisted with their bill.

    Exit codes: 0 completed, 1 the task failed, 2 bad usage, input or settings (an unreachable Redis
    or database included), 3 the task was cancelled."""


for command in (services.demo, tasks.submit, tasks.follow, tasks.result, tasks.cancel, reports.usage,
                reports.limits, tasks.failed, tasks.list_tasks, tasks.retry, services.worker, services.flower, services.api,
                services.emulator, callbacks.callbacks, batches.batch):
    main.add_command(command)
