"""GET /v1/tasks/{id} shows why flow control holds a task back, as the worker's limiter marks it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis

from contracts.events import WAITING
from contracts.job import parse_job
from contracts.settings import Settings
from contracts.store import Store
from tests.producer import ApiServer
from worker.flow.control import FlowControl

pytestmark = pytest.mark.timeout(60)


@pytest.fixture()
def settings(redis_url: str, redis_client: redis.Redis, sqlite_url: str) -> Settings:
    return Settings.from_env({"REDIS_URL": redis_url, "DATABASE_URL": sqlite_url})


@pytest.fixture()
def api(settings: Settings) -> Iterator[ApiServer]:
    with ApiServer(settings, keepalive_s=0.2) as server:
        yield server


def test_a_held_back_task_shows_its_wait_reason_and_estimate(api: ApiServer, settings: Settings,
                                                             redis_client: redis.Redis) -> None:
    store = Store.from_url(settings.database_url)
    job = parse_job({"images": ["s3://photos/a.png"], "prompt": "What is it?"})
    store.create_task(job)
    published: list[tuple[str, dict[str, Any]]] = []
    control = FlowControl(settings, redis_client, store)

    control._mark_waiting(job.task_id, "model_quota", 12.5, lambda type_, **fields: published.append((type_, fields)))
    shown = httpx.get(f"{api.url}/v1/tasks/{job.task_id}", timeout=10).json()
    assert shown["waiting"]["reason"] == "model_quota" and shown["waiting"]["wait_s"] == 12.5
    assert published == [(WAITING, {"reason": "model_quota", "wait_s": 12.5})]

    control._mark_waiting(job.task_id, "model_quota", 12.0, lambda type_, **fields: published.append((type_, fields)))
    assert len(published) == 1  # the same wait, re-estimated by less than a second: no new event
    control._clear_waiting(job.task_id)
    assert httpx.get(f"{api.url}/v1/tasks/{job.task_id}", timeout=10).json()["waiting"] is None
    store.dispose()
