"""The web viewer in a real headless Chromium against the real API, worker and emulator."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from contracts import events as ev
from contracts.bus import EventBus
from contracts.job import parse_job
from contracts.settings import Settings
from contracts.store import Store
from tests.imagegen import make_image
from tests.producer import ApiServer, sse_events

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.timeout(90),
    pytest.mark.skipif(CHROMIUM is None, reason="needs a headless Chromium (/usr/bin/chromium: "
                                                "apt-get install -y chromium)"),
]


def chromium(url: str, profile: Path, *extra: str, budget_ms: int = 8000) -> str:
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
            f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}", *extra, url]
    done = subprocess.run(args, capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    return done.stdout.decode()


def element_text(dom: str, element_id: str) -> str:
    match = re.search(rf'<div id="{element_id}"[^>]*>(.*?)</div>', dom, re.DOTALL)
    assert match, f"no #{element_id} in the page"
    return html.unescape(re.sub(r"<[^>]+>", "", match.group(1)))


def test_the_page_shows_a_finished_task_thinking_answer_images_and_cost(
        service_env: dict[str, str], start_worker: Any, tmp_path: Path) -> None:
    uploads = str(tmp_path / "uploads")
    start_worker(QVQ_UPLOAD_URL=uploads)
    image = tmp_path / "green.png"
    image.write_bytes(make_image("PNG", size=(120, 80), color=(20, 200, 20)))
    with ApiServer(Settings.from_env({**service_env, "QVQ_UPLOAD_URL": uploads})) as api:
        upload = httpx.post(api.url + "/v1/uploads", files={"file": ("green.png", image.read_bytes(), "image/png")})
        ref = upload.json()["ref"]
        created = httpx.post(api.url + "/v1/tasks", json={"images": [ref], "model": "qvq-plus",
                                                          "prompt": "What colour is this square?"})
        assert created.status_code == 202, created.text
        task_id = created.json()["task_id"]
        with httpx.stream("GET", f"{api.url}/v1/tasks/{task_id}/events", timeout=30) as response:
            assert sse_events(response)[-1]["event"] == ev.COMPLETED
        record = httpx.get(f"{api.url}/v1/tasks/{task_id}").json()

        screenshot = tmp_path / "page.png"
        dom = chromium(f"{api.url}/?task={task_id}", tmp_path / "profile", "--dump-dom",
                       f"--screenshot={screenshot}", "--window-size=1200,900", "--hide-scrollbars")
    assert 'data-state="completed"' in dom
    assert element_text(dom, "answer") == record["answer"]
    assert element_text(dom, "thinking") == record["reasoning"]
    assert "120×80" in dom and ref in dom  # the images.ready table
    assert f"{record['cost']['total']} CNY" in dom and "completion tokens" in dom
    assert screenshot.stat().st_size > 10_000 and screenshot.read_bytes()[:4] == b"\x89PNG"


def test_the_page_clears_the_text_of_a_failed_attempt(
        redis_url: str, redis_client: redis.Redis, sqlite_url: str, tmp_path: Path) -> None:
    """A run that retried and then failed (so no final text overwrites the view): only the second
    attempt's text is on the page, with a notice that the first attempt's text was void."""
    settings = Settings.from_env({"REDIS_URL": redis_url, "DATABASE_URL": sqlite_url})
    store = Store.from_url(sqlite_url)
    job = parse_job({"images": ["s3://photos/a.png"], "prompt": "hi"})
    store.create_task(job)
    store.dispose()
    bus = EventBus(redis_client)
    bus.publish(job.task_id, ev.QUEUED, 0, model="qvq-max", image_count=1)
    bus.publish(job.task_id, ev.STARTED, 1, worker="w1")
    bus.publish(job.task_id, ev.REASONING_DELTA, 1, text="FIRST-THOUGHT")
    bus.publish(job.task_id, ev.ANSWER_DELTA, 1, text="FIRST-PARTIAL")
    bus.publish(job.task_id, ev.RETRYING, 2, error={"code": "model.stream_broken", "message": "cut"}, delay_s=0.1)
    bus.publish(job.task_id, ev.REASONING_DELTA, 2, text="SECOND-THOUGHT")
    bus.publish(job.task_id, ev.ANSWER_DELTA, 2, text="SECOND-<b>PARTIAL</b>")
    bus.publish(job.task_id, ev.FAILED, 2, error={"code": "model.timeout", "message": "too slow", "retryable": True})
    with ApiServer(settings) as api:
        dom = chromium(f"{api.url}/?task={job.task_id}", tmp_path / "profile", "--dump-dom")
    assert 'data-state="failed"' in dom
    assert element_text(dom, "thinking") == "SECOND-THOUGHT"
    assert element_text(dom, "answer") == "SECOND-<b>PARTIAL</b>"  # text, never markup
    assert "FIRST-" not in dom
    assert "partial text is void and was cleared" in dom and "model.timeout: too slow" in dom


def test_the_page_shows_a_task_held_back_by_flow_control(
        redis_url: str, redis_client: redis.Redis, sqlite_url: str, tmp_path: Path) -> None:
    settings = Settings.from_env({"REDIS_URL": redis_url, "DATABASE_URL": sqlite_url})
    store = Store.from_url(sqlite_url)
    job = parse_job({"images": ["s3://photos/a.png"], "prompt": "hi"})
    store.create_task(job)
    store.dispose()
    bus = EventBus(redis_client)
    bus.publish(job.task_id, ev.QUEUED, 0, model="qvq-max", image_count=1)
    bus.publish(job.task_id, ev.STARTED, 1, worker="w1")
    bus.publish(job.task_id, ev.WAITING, 1, reason="model_quota", wait_s=2.5)
    bus.publish(job.task_id, ev.CANCELLED, 1)  # ends the stream, so the headless page settles
    with ApiServer(settings) as api:
        dom = chromium(f"{api.url}/?task={job.task_id}", tmp_path / "profile", "--dump-dom")
    assert "Waiting: model quota (about 2.5 s)" in dom and "held back, not failed" in dom
