"""/livez answers while the process does; /readyz follows Redis and the database; /healthz stays."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from contracts.settings import Settings
from producer.api import ops
from producer.local.embedded import EmbeddedRedis
from tests.ops import free_port
from tests.producer import ApiServer

pytestmark = pytest.mark.timeout(60)


def test_livez_stays_up_while_readyz_follows_redis(tmp_path: Path) -> None:
    redis_server = EmbeddedRedis().start()
    settings = Settings.from_env({"REDIS_URL": redis_server.url, "DATABASE_URL": f"sqlite:///{tmp_path / 'q.db'}"})
    try:
        with ApiServer(settings) as api:
            assert httpx.get(f"{api.url}/livez").status_code == 200
            ready = httpx.get(f"{api.url}/readyz")
            assert (ready.status_code, ready.json()) == (200, {"status": "ready", "redis": True, "database": True})

            redis_server.close()

            assert httpx.get(f"{api.url}/livez").json() == {"status": "ok"}
            down = httpx.get(f"{api.url}/readyz", timeout=10)
            assert (down.status_code, down.json()) == (503, {"status": "not_ready", "redis": False,
                                                            "database": True})
            assert httpx.get(f"{api.url}/healthz", timeout=10).status_code == 503  # unchanged: it checks both
            assert httpx.get(f"{api.url}/metrics", timeout=10).status_code == 200  # no queue depth, no error
    finally:
        redis_server.close()


def test_readyz_reports_a_database_that_does_not_answer(redis_url: str) -> None:
    closed = free_port()  # nothing listens there: the connection is refused on loopback
    app = FastAPI()
    ops.install(app, Settings.from_env({"REDIS_URL": redis_url,
                                        "DATABASE_URL": f"postgresql+psycopg://qvq@127.0.0.1:{closed}/qvq"}))
    with TestClient(app) as client:
        assert client.get("/livez").status_code == 200
        response = client.get("/readyz")
    assert (response.status_code, response.json()) == (503, {"status": "not_ready", "redis": True,
                                                             "database": False})
