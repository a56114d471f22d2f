"""The OpenAPI document is one generated clients can use, and the served API keeps to it: schemathesis
runs every check against it over real HTTP (a bounded number of examples; QVQ_SLOW=1 runs more)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from contracts.settings import Settings
from tests.producer import ApiServer

pytestmark = pytest.mark.timeout(600)
KEY = "schemathesis-key-0123456789abcdef"
ROOT = Path(__file__).resolve().parents[2]
CONFIG = Path(__file__).with_name("schemathesis.toml")


@pytest.fixture()
def api(redis_url: str, redis_client: redis.Redis, sqlite_url: str, tmp_path: Path) -> Iterator[ApiServer]:
    settings = Settings.from_env({"REDIS_URL": redis_url, "DATABASE_URL": sqlite_url,
                                  "QVQ_API_KEYS": f"acme:{KEY}", "QVQ_UPLOAD_URL": str(tmp_path / "uploads")})
    with ApiServer(settings, keepalive_s=0.2) as server:
        yield server


def test_the_document_declares_bodies_errors_statuses_and_security(api: ApiServer) -> None:
    document = httpx.get(api.url + "/openapi.json").json()
    schemes = document["components"]["securitySchemes"]
    assert schemes["bearer"] == {"type": "http", "scheme": "bearer",
                                 "description": schemes["bearer"]["description"]}
    submit = document["paths"]["/v1/tasks"]["post"]
    assert submit["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/JobRequestBody"}
    assert set(submit["responses"]) >= {"200", "202", "400", "401", "403", "409", "413", "415", "422", "503"}
    error = submit["responses"]["413"]["content"]["application/json"]["schema"]
    assert error == {"$ref": "#/components/schemas/ErrorBody"}
    assert "HTTPValidationError" not in document["components"]["schemas"]  # FastAPI's {detail} is never sent
    events = document["paths"]["/v1/tasks/{task_id}/events"]["get"]["responses"]["200"]["content"]
    assert list(events) == ["text/event-stream"]
    ids = []
    for name, path in document["paths"].items():
        for operation in path.values():
            assert bool(operation.get("security")) is name.startswith("/v1/"), operation["operationId"]
            assert operation["responses"]["500"]["content"]["application/json"]["schema"] == error
            ids.append(operation["operationId"])
    assert len(ids) == len(set(ids)) and all(re.fullmatch(r"[a-z][a-z_]*[a-z]", i) for i in ids), ids
    assert {"submit_task", "get_task", "list_tasks", "task_events", "cancel_task"} <= set(ids), ids
    record = document["components"]["schemas"]["TaskRecord"]["properties"]
    typed = {"images": "ImageSummary", "usage": "Usage", "cost": "Cost", "timings": "Timings",
             "callback": "CallbackDelivery", "waiting": "Waiting", "error": "TaskError"}
    for name, model in typed.items():  # a generated client gets classes, not bare dicts
        assert f"#/components/schemas/{model}" in str(record[name]), (name, record[name])
    assert len(record) >= 26
    ready = document["paths"]["/readyz"]["get"]["responses"]
    assert ready["503"]["content"]["application/json"]["schema"]["properties"]["redis"] == {"type": "boolean"}


def test_schemathesis_finds_nothing_with_every_check(api: ApiServer) -> None:
    examples = "100" if os.environ.get("QVQ_SLOW") == "1" else "8"
    # every check is on by default; the configuration relaxes two on the form operations, a hook says what
    # an image part's bytes are
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.producer.schemathesis_hooks",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "--config-file", str(CONFIG), "run", api.url + "/openapi.json",
         "--max-examples", examples, "--seed", "20261202", "--workers", "1",
         "--header", f"Authorization: Bearer {KEY}", "--no-color"],
        capture_output=True, text=True, timeout=540, env=env, cwd=ROOT)
    failures = result.stdout[result.stdout.find("= FAILURES ="):result.stdout.find("= SUMMARY =")]
    assert result.returncode == 0, failures[:12000] + result.stdout[-3000:] + result.stderr[-2000:]
