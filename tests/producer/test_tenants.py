"""Tenants are walls: every endpoint, tried with another tenant's key, answers like a missing task and
changes nothing; every refusal gives its documented status and code and leaves nothing behind."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from contracts.settings import Settings
from contracts.store import Store
from producer.api import create_app
from tests.imagegen import make_image
from tests.producer import ApiServer

pytestmark = pytest.mark.timeout(90)

ACME, GLOBEX, ADMIN = "acme-key-0123456789abcdef", "globex-key-0123456789abcdef", "admin-key-0123456789abcdef"
KEYS = (f"acme:{ACME}", f"globex:{GLOBEX}", ADMIN)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture()
def settings(redis_url: str, redis_client: redis.Redis, sqlite_url: str, tmp_path: Path) -> Settings:
    return Settings.from_env({"REDIS_URL": redis_url, "DATABASE_URL": sqlite_url,
                              "QVQ_API_KEYS": ",".join(KEYS), "QVQ_UPLOAD_URL": str(tmp_path / "uploads")})


@pytest.fixture()
def api(settings: Settings) -> Iterator[ApiServer]:
    with ApiServer(settings, keepalive_s=0.2) as server:
        yield server


class Tenant:
    def __init__(self, api: ApiServer, key: str) -> None:
        self.http = httpx.Client(base_url=api.url + "/v1", headers=auth(key), timeout=10)

    def submit(self, **fields: Any) -> httpx.Response:
        return self.http.post("/tasks", json={"images": ["s3://photos/a.png"], "prompt": "What is it?", **fields})

    def upload(self, png: bytes) -> str:
        response = self.http.post("/uploads", files={"file": ("x.png", png, "image/png")})
        assert response.status_code == 201, response.text
        return str(response.json()["ref"])


def snapshot(settings: Settings, redis_client: redis.Redis) -> tuple[Any, ...]:
    """Everything a request could change: rows, uploads, and every Redis key with its length."""
    store = Store.from_url(settings.database_url)
    rows = sorted((r.id, r.status, r.tenant, r.attempts, r.run) for r in store.list_tasks(limit=1000))
    uploads = store.expired_uploads(at=__import__("datetime").datetime.max.replace(tzinfo=__import__("datetime").UTC))
    store.dispose()
    keys = sorted((k, redis_client.type(k), redis_client.xlen(k) if redis_client.type(k) == b"stream" else 0)
                  for k in redis_client.keys("*"))
    return rows, sorted(u.id for u in uploads), keys


def test_another_tenants_task_answers_like_a_missing_one_everywhere_and_nothing_changes(
        api: ApiServer, settings: Settings, redis_client: redis.Redis) -> None:
    acme, globex = Tenant(api, ACME), Tenant(api, GLOBEX)
    created = acme.submit(metadata={"secret": "acme's"})
    assert created.status_code == 202
    task = created.json()["task_id"]
    before = snapshot(settings, redis_client)

    def missing_like(response: httpx.Response, path: str) -> None:
        twin = globex.http.request(response.request.method, path.replace(task, "no-such-task-000"))
        assert response.status_code == twin.status_code == 404, (path, response.text)
        assert response.json() == {"error": {**twin.json()["error"],
                                             "message": twin.json()["error"]["message"].replace("no-such-task-000", task)}}

    for method, path in (("GET", f"/tasks/{task}"), ("GET", f"/tasks/{task}/events"),
                         ("POST", f"/tasks/{task}/cancel"), ("POST", f"/tasks/{task}/retry")):
        missing_like(globex.http.request(method, path), path)
    assert task not in str(globex.http.get("/tasks").json())
    assert globex.http.get("/tasks", params={"tenant": "acme"}).status_code == 403
    assert globex.http.get("/usage", params={"tenant": "acme"}).status_code == 403
    assert snapshot(settings, redis_client) == before  # nothing read changed anything


def test_a_tenant_cannot_submit_as_another_reuse_its_keys_uploads_or_conversations(
        api: ApiServer, settings: Settings, redis_client: redis.Redis) -> None:
    acme, globex = Tenant(api, ACME), Tenant(api, GLOBEX)
    png = make_image("PNG", size=(32, 32), color=(0, 128, 0))
    acme_upload = acme.upload(png)
    first = acme.submit(idempotency_key="order-7", conversation_id="chat-1", images=[acme_upload])
    assert first.status_code == 202
    before = snapshot(settings, redis_client)

    as_acme = globex.submit(tenant="acme")
    assert as_acme.status_code == 403 and as_acme.json()["error"] == {
        "code": "auth.forbidden", "field": "tenant", "message": "this key submits for tenant 'globex' only"}
    their_upload = globex.submit(images=[acme_upload])
    assert their_upload.status_code == 404 and their_upload.json()["error"]["field"] == "images[0]"
    assert their_upload.json()["error"]["code"] == "image.not_found"
    their_chat = globex.submit(conversation_id="chat-1", images=[])  # answered exactly like a missing one
    missing = globex.submit(conversation_id="chat-404", images=[])
    assert their_chat.status_code == missing.status_code == 404
    assert their_chat.json()["error"] == {**missing.json()["error"], "message": missing.json()["error"]["message"]
                                          .replace("chat-404", "chat-1")}
    assert snapshot(settings, redis_client) == before
    own_chat = globex.submit(conversation_id="chat-1", images=["s3://photos/b.png"])  # ids are per tenant:
    assert own_chat.status_code == 202  # this starts globex's own chat-1, which never sees acme's turns

    same_key = globex.submit(idempotency_key="order-7")
    assert same_key.status_code == 202 and same_key.json()["task_id"] != first.json()["task_id"]
    again = acme.submit(idempotency_key="order-7", conversation_id="chat-1", images=[acme_upload])
    assert again.status_code == 200 and again.json() == {"task_id": first.json()["task_id"], "created": False}
    own_turn = acme.submit(conversation_id="chat-1", images=[])
    assert own_turn.status_code == 202


def test_an_admin_key_sees_and_acts_for_every_tenant(api: ApiServer) -> None:
    acme, admin = Tenant(api, ACME), Tenant(api, ADMIN)
    task = acme.submit().json()["task_id"]
    assert admin.http.get(f"/tasks/{task}").json()["tenant"] == "acme"
    for_globex = admin.submit(tenant="globex")
    assert for_globex.status_code == 202
    listed = admin.http.get("/tasks").json()["tasks"]
    assert {t["tenant"] for t in listed} == {"acme", "globex"}
    assert {t["tenant"] for t in admin.http.get("/tasks", params={"tenant": "globex"}).json()["tasks"]} == {"globex"}
    assert admin.http.post(f"/tasks/{task}/cancel").status_code == 202


def test_listing_pages_with_a_cursor(api: ApiServer) -> None:
    acme = Tenant(api, ACME)
    ids = {acme.submit().json()["task_id"] for _ in range(5)}
    seen: list[str] = []
    cursor = None
    while True:
        page = acme.http.get("/tasks", params={"limit": 2, **({"cursor": cursor} if cursor else {})}).json()
        seen += [t["task_id"] for t in page["tasks"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) == 5 and set(seen) == ids
    assert acme.http.get("/tasks", params={"cursor": "garbage!"}).status_code == 422
    anywhere = acme.http.get("/tasks", params={"cursor": "9999999999999999-z"})  # any position reads on,
    assert {t["task_id"] for t in anywhere.json()["tasks"]} == ids  # within the caller's tenant
    assert acme.http.get("/tasks", params={"cursor": "0-a"}).json()["tasks"] == []


# -- refusals ----------------------------------------------------------------------------------
def test_files_on_the_server_are_never_named_over_http(api: ApiServer, settings: Settings,
                                                       redis_client: redis.Redis) -> None:
    acme = Tenant(api, ACME)
    before = snapshot(settings, redis_client)
    for ref, status in (("file:///etc/shadow", 422), ("/etc/passwd", 422), ("relative/photo.png", 422),
                        ("FILE:///srv/scans/private.png", 422), ("upload://" + "0" * 32, 404),
                        ("upload://../../etc/passwd", 422)):
        response = acme.submit(images=[ref])
        assert response.status_code == status, (ref, response.text)
        assert response.json()["error"]["field"] == "images[0]"
    assert snapshot(settings, redis_client) == before


def test_bodies_are_json_bounded_and_ids_safe(api: ApiServer, settings: Settings, redis_client: redis.Redis) -> None:
    acme = Tenant(api, ACME)
    before = snapshot(settings, redis_client)
    url = "/tasks"
    plain = acme.http.post(url, content=b'{"images": ["s3://a/b.png"], "prompt": "hi"}',
                           headers={"Content-Type": "text/plain"})
    assert plain.status_code == 415 and plain.json()["error"]["code"] == "request.unsupported_media_type"
    big = acme.http.post(url, content=b" " * (settings.max_request_bytes + 1), headers={"Content-Type": "application/json"})
    assert big.status_code == 413 and big.json()["error"]["code"] == "request.too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while it streams in
        for _ in range(40):
            yield b" " * 65536
    streamed = acme.http.post(url, content=chunks(), headers={"Content-Type": "application/json"})
    assert streamed.status_code == 413
    deep = acme.http.post(url, content=b"[" * 200_000, headers={"Content-Type": "application/json"})
    assert deep.status_code == 400 and deep.json()["error"]["code"] == "request.invalid"
    nested: Any = {}
    for _ in range(12):
        nested = {"n": nested}
    assert acme.submit(metadata=nested).json()["error"]["field"] == "metadata"
    assert acme.submit(metadata={"blob": "x" * 20_000}).json()["error"]["field"] == "metadata"
    for bad_id in ("任务-1", "a/b", "x" * 129, "-lead", "sp ace"):
        response = acme.submit(task_id=bad_id)
        assert response.status_code == 422 and response.json()["error"]["field"] == "task_id", bad_id
    assert snapshot(settings, redis_client) == before

    assert acme.submit(task_id="mine-1").status_code == 202
    taken = Tenant(api, GLOBEX).submit(task_id="mine-1")
    assert taken.status_code == 409 and taken.json()["error"] == {
        "code": "request.invalid", "field": "task_id",
        "message": "task_id: a task with this id already exists; choose another (or omit it)"}


def test_an_upload_without_a_key_is_refused_before_it_is_read(api: ApiServer, tmp_path: Path) -> None:
    def endless() -> Iterator[bytes]:
        for _ in range(10_000):  # 640 MB if anyone read it
            yield b"x" * 65536
    headers = {"Content-Type": "multipart/form-data; boundary=xyz"}
    response = httpx.post(api.url + "/v1/uploads", content=endless(), headers=headers, timeout=10)
    assert response.status_code == 401 and response.json()["error"]["code"] == "auth.required"
    assert not (tmp_path / "uploads").exists() or not any((tmp_path / "uploads").iterdir())


def test_an_upload_over_the_limit_is_refused_while_it_streams(api: ApiServer, settings: Settings) -> None:
    acme = Tenant(api, ACME)
    png = make_image("PNG", size=(32, 32), color=(9, 9, 9))
    over = acme.http.post("/uploads", files={"file": ("big.png", png + b"\0" * (settings.max_image_bytes + 1))})
    assert over.status_code == 413
    assert acme.http.post("/uploads", content=b"x", headers={"Content-Type": "application/json"}).status_code == 415


def test_errors_never_show_internal_addresses(settings: Settings) -> None:
    from producer.local.embedded import EmbeddedRedis

    with EmbeddedRedis() as dead_soon:
        down = settings.with_overrides(redis_url=dead_soon.url)
        with ApiServer(down) as api:
            dead_soon.stop()
            response = Tenant(api, ACME).submit()
    assert response.status_code == 503 and response.json()["error"]["code"] == "unavailable"
    assert "127.0.0.1" not in response.text and str(dead_soon.port) not in response.text


# -- the browser, and deny by default -----------------------------------------------------------
def test_pages_and_answers_carry_browser_hardening_headers(api: ApiServer) -> None:
    for path in ("/", "/v1/tasks", "/healthz"):
        response = httpx.get(api.url + path, headers=auth(ACME))
        assert response.headers["x-frame-options"] == "DENY", path
        assert response.headers["x-content-type-options"] == "nosniff"
        assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
        assert "access-control-allow-origin" not in response.headers
    page_policy = httpx.get(api.url + "/").headers["content-security-policy"]
    assert "'unsafe-inline'" not in page_policy and "script-src 'sha256-" in page_policy
    preflight = httpx.options(api.url + "/v1/tasks", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers


def test_cors_only_for_the_configured_origins(settings: Settings) -> None:
    with ApiServer(settings.with_overrides(cors_origins=("https://app.example",))) as api:
        allowed = httpx.get(api.url + "/v1/tasks", headers={"Origin": "https://app.example", **auth(ACME)})
        other = httpx.get(api.url + "/v1/tasks", headers={"Origin": "https://evil.example", **auth(ACME)})
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    assert "access-control-allow-origin" not in other.headers


def test_without_keys_only_loopback_callers_are_answered(settings: Settings) -> None:
    open_api = settings.with_overrides(api_keys=())

    async def call(client_host: str, app_settings: Settings) -> int:
        app = create_app(app_settings)
        transport = httpx.ASGITransport(app=app, client=(client_host, 40000))  # in process: no connection
        async with httpx.AsyncClient(transport=transport, base_url="http://qvq") as client:
            return (await client.get("/")).status_code

    assert asyncio.run(call("203.0.113.7", open_api)) == 403
    assert asyncio.run(call("203.0.113.7", open_api.with_overrides(api_insecure=True))) == 200
    assert asyncio.run(call("127.0.0.1", open_api)) == 200


def test_a_malformed_key_list_fails_at_start_without_showing_the_key() -> None:
    from contracts.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        Settings.from_env({"QVQ_API_KEYS": "acme:short-secret"})
    assert "short-secret" not in str(info.value) and "QVQ_API_KEYS entry 1" in str(info.value)
