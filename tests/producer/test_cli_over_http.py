"""Every `qvq` command works over either transport: with --api it talks to the HTTP API, and shows the same
things it shows over Redis and the database (the client protocol, producer/protocol.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner

from contracts import events as ev
from contracts.settings import Settings
from contracts.store import COMPLETED, Outcome
from producer.cli import main
from producer.client import Client
from tests.imagegen import make_image
from tests.producer import ApiServer

pytestmark = pytest.mark.timeout(60)
#: Line breaks to str.splitlines (and so to httpx's iter_lines), never to the event-stream format.
BREAKS = "one\u2028two\u2029three\x85four\x1cfive\x1dsix\x1esix\u000bseven\u000ceight"


@pytest.fixture()
def settings(redis_url: str, redis_client: redis.Redis, sqlite_url: str) -> Settings:
    return Settings.from_env({"REDIS_URL": redis_url, "DATABASE_URL": sqlite_url})


@pytest.fixture()
def api(settings: Settings) -> Iterator[ApiServer]:
    with ApiServer(settings, keepalive_s=0.5) as server:
        yield server


@pytest.fixture()
def client(settings: Settings) -> Iterator[Client]:
    with Client(settings) as direct:
        yield direct


def qvq(api: ApiServer, *args: str) -> Any:
    return CliRunner().invoke(main, ["--api", api.url, *args])


def finished_task(client: Client, tmp_path: Path, reasoning: str, answer: str) -> str:
    """A task whose events (published as a worker would) and row hold the given text."""
    image = tmp_path / "a.png"
    image.write_bytes(make_image("PNG", (32, 32)))
    task_id = client.submit(images=[str(image)], prompt="Any breaks?").task_id
    for type_, text in ((ev.REASONING_DELTA, reasoning), (ev.ANSWER_DELTA, answer)):
        client.bus.publish(task_id, type_, 1, text=text)
    client.store.finish(task_id, Outcome(status=COMPLETED, attempt=1, reasoning=reasoning, answer=answer))
    client.bus.publish(task_id, ev.COMPLETED, 1, reasoning=reasoning, answer=answer, usage={}, cost={}, timings={})
    return task_id


def test_follow_over_http_shows_text_with_unicode_line_breaks_exactly(
        api: ApiServer, client: Client, tmp_path: Path) -> None:
    task_id = finished_task(client, tmp_path, f"think {BREAKS}", f"say {BREAKS}")
    followed = qvq(api, "follow", task_id, "--json")
    assert followed.exit_code == 0, followed.output
    events = [json.loads(line) for line in followed.output.split("\n") if line.startswith("{")]  # JSON Lines: \n only
    texts = {e["type"]: e["text"] for e in events if e["type"] in ev.DELTA_TYPES}
    assert texts == {ev.REASONING_DELTA: f"think {BREAKS}", ev.ANSWER_DELTA: f"say {BREAKS}"}
    shown = qvq(api, "follow", task_id)
    assert shown.exit_code == 0, shown.output
    assert "say one\u2028two\u2029three\x85four" in shown.output  # the renderer keeps these; C0 controls go


def test_limits_tasks_failed_usage_and_callbacks_answer_over_http(api: ApiServer, client: Client,
                                                                   tmp_path: Path) -> None:
    task_id = finished_task(client, tmp_path, "a", "b")
    limits = qvq(api, "limits", "--json")
    assert limits.exit_code == 0, limits.output
    state = json.loads(limits.output)
    assert {row["family"] for row in state["families"]} == {"qvq-max", "qvq-plus"} and state["limiter"] is False
    table = qvq(api, "limits")
    assert table.exit_code == 0 and "qvq-max" in table.output
    listed = qvq(api, "tasks", "--json")
    assert [row["task_id"] for row in json.loads(listed.output)] == [task_id]
    assert qvq(api, "failed", "--json").output.strip() == "[]"
    usage = qvq(api, "usage", "--by", "tenant")
    assert usage.exit_code == 0 and "total" in usage.output, usage.output
    shown = qvq(api, "callbacks", "show", task_id)
    assert shown.exit_code == 0 and shown.output.strip() == f"task {task_id} has no callback"
    redelivered = qvq(api, "callbacks", "redeliver", task_id)
    assert redelivered.exit_code == 2 and "has no callback to deliver" in redelivered.output


def test_a_conversation_is_checked_the_same_way_over_http(api: ApiServer, client: Client, tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    image.write_bytes(make_image("PNG", (32, 32)))
    unknown = qvq(api, "submit", "--conversation", "c-1", "--prompt", "And then?")
    assert unknown.exit_code == 2 and "no conversation 'c-1'" in unknown.output
    client.submit(images=[str(image)], prompt="First turn.", conversation_id="c-1")
    again = qvq(api, "submit", str(image), "--conversation", "c-1", "--new-conversation", "--prompt", "Again?")
    assert again.exit_code == 2 and "already exists" in again.output
