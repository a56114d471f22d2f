"""Shared fixtures: real Redis, SQLite and PostgreSQL stores, the emulator over HTTP, a real
S3-protocol server, and factories for clients and worker processes that clean up after themselves."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from contracts.settings import Settings
from producer.client import Client
from producer.local.embedded import EmbeddedRedis
from tests import services
from tests.services import ThrowawayPostgres, WorkerProcess, postgres_server_url, shared_redis_url


@pytest.fixture(scope="session", autouse=True)
def worker_log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Worker logs in the run's temporary directory, which pytest deletes after three more runs."""
    services.LOG_DIR = tmp_path_factory.mktemp("worker-logs")
    return services.LOG_DIR


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """The run's own Redis on a free port (QVQ_TEST_REDIS_URL points the tests at another one)."""
    url = shared_redis_url()
    if url:
        yield url
        return
    with EmbeddedRedis() as server:
        yield server.url


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[ThrowawayPostgres | None]:
    server = postgres_server_url()
    if server is None:
        yield None
        return
    database = ThrowawayPostgres(server)
    yield database
    database.drop()


@pytest.fixture()
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture(scope="session")
def emulator() -> Iterator[Any]:
    from emulator.server import EmulatorConfig, EmulatorServer

    with EmulatorServer(EmulatorConfig()) as server:
        yield server


@pytest.fixture(scope="session")
def s3() -> Iterator[Any]:
    from tests.s3server import s3_server_fixture

    yield from s3_server_fixture()


def _sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'qvq.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each store backend in turn; PostgreSQL is skipped with a reason when none is reachable."""
    if request.param == "sqlite":
        yield _sqlite_url(tmp_path)
        return
    database = request.getfixturevalue("postgres_database")
    if database is None:
        pytest.skip("PostgreSQL not reachable at 127.0.0.1:5432 (set QVQ_TEST_POSTGRES_URL)")
    database.reset()
    yield database.url


@pytest.fixture()
def sqlite_url(tmp_path: Path) -> str:
    return _sqlite_url(tmp_path)


@pytest.fixture()
def service_env(redis_url: str, redis_client: redis.Redis, emulator: Any, s3: Any, sqlite_url: str,
                monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The environment a worker and a client share in a test (override DATABASE_URL as needed)."""
    env = {
        "REDIS_URL": redis_url,
        "DATABASE_URL": sqlite_url,
        "QVQ_BASE_URL": emulator.url,
        "S3_ENDPOINT_URL": s3.endpoint_url,
        "AWS_ACCESS_KEY_ID": s3.access_key,
        "AWS_SECRET_ACCESS_KEY": s3.secret_key,
        "AWS_DEFAULT_REGION": s3.region,
        "QVQ_ALLOW_LOCAL_FILES": "1",
        "QVQ_ALLOW_PRIVATE_URLS": "1",
        "QVQ_COALESCE_MS": "20",
        "QVQ_RETRY_BASE_S": "0.05",
        "QVQ_RETRY_MAX_S": "2",
    }
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(name, env[name])
    return env


@pytest.fixture()
def start_worker(service_env: dict[str, str]) -> Iterator[Any]:
    """Factory: start_worker(**env_overrides) -> a running WorkerProcess, stopped at teardown."""
    workers: list[WorkerProcess] = []

    def start(concurrency: int = 20, name: str = "w", **overrides: str) -> WorkerProcess:
        worker = WorkerProcess({**service_env, **overrides}, concurrency=concurrency, name=name)
        workers.append(worker)
        return worker.start()

    yield start
    for worker in workers:
        worker.stop()
        if os.environ.get("QVQ_TEST_SHOW_WORKER_LOGS"):
            print(worker.log())


@pytest.fixture()
def make_client(service_env: dict[str, str]) -> Iterator[Any]:
    """Factory: make_client(**env_overrides) -> a producer Client, closed at teardown."""
    clients: list[Client] = []

    def make(**overrides: str) -> Client:
        client = Client(Settings.from_env({**service_env, **overrides}))
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()
