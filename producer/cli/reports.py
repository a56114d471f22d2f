"""`qvq usage` and `qvq limits`: the ledger's report and the model limiter's state, over either transport."""

from __future__ import annotations

import csv
import json
import sys

import click

from producer.cli.common import client, friendly_errors, moment, print_rows
from producer.cli.render import money


@click.command()
@click.option("--by", type=click.Choice(["model", "tenant", "day"]), default="model", show_default=True)
@click.option("--since", help="From (inclusive): an ISO date/time, or a number of hours ago (e.g. 24).")
@click.option("--until", help="To (exclusive): an ISO date/time, or a number of hours ago.")
@click.option("--tenant", help="Only this tenant's usage.")
@click.option("--json", "as_json", is_flag=True, help="Rows and total as JSON (costs as exact decimal strings).")
@click.option("--csv", "as_csv", is_flag=True, help="Rows as CSV, then a total row.")
@friendly_errors
def usage(by: str, since: str | None, until: str | None, tenant: str | None, as_json: bool, as_csv: bool) -> None:
    """Tokens and cost (CNY) from the ledger: every billed attempt, failed and cancelled ones included."""
    with client(read_only=True) as tasks:
        report = tasks.usage(by, since=moment("--since", since), until=moment("--until", until), tenant=tenant)
    rows = [*report["rows"], {by: "total", **report["total"]}]
    columns = list(report["total"])  # the counts, then cost_cny: the report's own order
    if as_json:
        click.echo(json.dumps(report, indent=2))
    elif as_csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow((by, *columns))
        for row in rows:
            writer.writerow((row[by] or "", *(row[name] for name in columns)))
    else:
        print_rows((by, "calls", "estimated", "prompt tokens", "completion tokens", "total tokens", "cost (CNY)"),
                   [(_group(row[by], by), *(str(row[name]) for name in columns[:-1]), money(row["cost_cny"], ""))
                    for row in rows])


def _group(value: object, by: str) -> str:
    """A group's name in the table: tasks without a tenant are "(no tenant)", never "None"."""
    return f"(no {by})" if value is None or value == "" else str(value)


@click.command()
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def limits(as_json: bool) -> None:
    """Flow control now: per model family, requests and tokens used this second and minute against the
    limits (QVQ_MODEL_LIMITS), calls waiting for quota, and any hold after a 429."""
    with client(read_only=True) as tasks:
        state = tasks.limits()
    if as_json:
        click.echo(json.dumps(state, indent=2))
        return
    if not state["limiter"]:
        click.echo("the model limiter is off (QVQ_FLOW_CONTROL=0, or the emulator without QVQ_MODEL_LIMITS)", err=True)
    print_rows(("family", "requests 1s", "requests 60s", "tokens 1s", "tokens 60s", "waiting", "held after 429 (s)"),
               [(r["family"], f"{r['requests_1s']}/{r['rps']}", f"{r['requests_60s']}/{r['rpm']}",
                 f"{r['tokens_1s']}/{r['tps']}", f"{r['tokens_60s']}/{r['tpm']}", str(r["waiting"]),
                 f"{r['tightened_s']:g}") for r in state["families"]])
