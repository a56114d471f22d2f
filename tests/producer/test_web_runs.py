"""The web viewer of a retried task (headless Chromium, as tests/producer/test_web.py): the SSE stream
from seq 0 replays the failed first run and then the completed second one; the page shows the
completed run's text only."""

from __future__ import annotations

from pathlib import Path

import redis

from contracts import events as ev
from contracts.bus import EventBus
from contracts.job import parse_job
from contracts.settings import Settings
from contracts.store import Store
from tests.producer import ApiServer
from tests.producer.test_web import chromium, element_text, pytestmark  # noqa: F401  (the browser marks)


def test_the_page_shows_only_the_latest_runs_text(redis_url: str, redis_client: redis.Redis, sqlite_url: str,
                                                  tmp_path: Path) -> None:
    settings = Settings.from_env({"REDIS_URL": redis_url, "DATABASE_URL": sqlite_url})
    store = Store.from_url(sqlite_url)
    job = parse_job({"images": ["s3://photos/a.png"], "prompt": "hi"})
    store.create_task(job)
    store.dispose()
    bus = EventBus(redis_client)
    task = job.task_id
    bus.publish(task, ev.QUEUED, 0, model="qvq-max", image_count=1, run=0)
    bus.publish(task, ev.STARTED, 1, worker="w1")
    bus.publish(task, ev.REASONING_DELTA, 1, text="FIRST-THOUGHT")
    bus.publish(task, ev.ANSWER_DELTA, 1, text="FIRST-PARTIAL")
    bus.publish(task, ev.FAILED, 1, error={"code": "model.timeout", "message": "too slow", "retryable": True})
    bus.publish(task, ev.QUEUED, 1, model="qvq-max", image_count=1, run=1)
    bus.publish(task, ev.STARTED, 2, worker="w1")
    bus.publish(task, ev.REASONING_DELTA, 2, text="SECOND-THOUGHT")
    bus.publish(task, ev.ANSWER_DELTA, 2, text="SECOND-ANSWER")
    bus.publish(task, ev.COMPLETED, 2, reasoning="SECOND-THOUGHT", answer="SECOND-ANSWER",
                usage={"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
                cost={"input": 0.1, "output": 0.1, "total": 0.2, "currency": "CNY"}, timings={"total_s": 1.0})
    with ApiServer(settings) as api:
        dom = chromium(f"{api.url}/?task={task}", tmp_path / "profile", "--dump-dom")
    assert 'data-state="completed"' in dom
    assert element_text(dom, "thinking") == "SECOND-THOUGHT"
    assert element_text(dom, "answer") == "SECOND-ANSWER"
    assert "FIRST-" not in dom and "Retried as run 1" in dom
