"""`qvq tasks` and GET /v1/tasks list the same summaries; `waiting` finds the tasks flow control holds back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import httpx
import redis

from contracts import keys
from contracts.settings import Settings
from tests.producer import ApiServer


def qvq(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "producer.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **env, "LOG_LEVEL": "WARNING"}, timeout=90)


def test_tasks_lists_newest_first_filters_and_finds_the_waiting_ones(
        service_env: dict[str, str], make_client: Any, redis_client: redis.Redis) -> None:
    client = make_client()
    ids = [client.submit(images=["s3://photos/a.png"], prompt=f"q{i}", tenant=tenant).task_id
           for i, tenant in enumerate(("acme", "acme", "globex"))]
    client.cancel(ids[0])
    redis_client.set(keys.waiting_key(ids[1]), json.dumps({"reason": "model_quota", "wait_s": 3, "since": time.time()}))

    listed = qvq(service_env, "tasks", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [t["task_id"] for t in json.loads(listed.stdout)] == ids[::-1]
    by_tenant = json.loads(qvq(service_env, "tasks", "--tenant", "acme", "--json").stdout)
    assert {t["task_id"] for t in by_tenant} == set(ids[:2])
    cancelled = json.loads(qvq(service_env, "tasks", "--status", "cancelled", "--json").stdout)
    assert [t["task_id"] for t in cancelled] == [ids[0]] and cancelled[0]["status"] == "cancelled"
    waiting = json.loads(qvq(service_env, "tasks", "--status", "waiting", "--json").stdout)
    assert [t["task_id"] for t in waiting] == [ids[1]]
    piped = qvq(service_env, "tasks", "--limit", "2")
    assert piped.stdout.splitlines()[0].split("\t")[:2] == ["task", "status"] and len(piped.stdout.splitlines()) == 3

    with ApiServer(Settings.from_env(service_env)) as api:
        over_http = httpx.get(api.url + "/v1/tasks", params={"status": "waiting"}).json()["tasks"]
        assert over_http == waiting
        http = qvq({**service_env, "QVQ_API_URL": api.url}, "tasks", "--json")
        assert json.loads(http.stdout) == json.loads(listed.stdout), http.stderr
