"""The store keeps tenants apart: idempotency keys, conversation history, listings and usage."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from contracts.errors import IdempotencyMismatch
from contracts.job import parse_job
from contracts.store import ANY_TENANT, COMPLETED, Outcome, Store


def _done(store: Store, tenant: str | None, conversation: str, prompt: str, answer: str) -> str:
    job = parse_job({"images": ["s3://b/k.png"], "prompt": prompt, "conversation_id": conversation,
                     **({"tenant": tenant} if tenant else {})})
    store.create_task(job)
    store.begin_attempt(job.task_id)
    store.finish(job.task_id, Outcome(status=COMPLETED, attempt=1, answer=answer,
                                      usage={"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
                                      cost={"input": 0.01, "output": 0.02, "total": 0.03}))
    return job.task_id


def test_history_listing_and_usage_stay_within_a_tenant(database_url: str) -> None:
    store = Store.from_url(database_url)
    _done(store, "acme", "chat", "acme asks", "acme's answer")
    _done(store, "globex", "chat", "globex asks", "globex's answer")  # e.g. written by an admin key
    _done(store, None, "chat", "nobody asks", "nobody's answer")
    later = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=5)
    assert [(t.prompt, t.answer) for t in store.history("chat", later, "acme")] == [("acme asks", "acme's answer")]
    assert [(t.prompt, t.answer) for t in store.history("chat", later, None)] == [("nobody asks", "nobody's answer")]
    assert {r.tenant for r in store.list_tasks(tenant="globex")} == {"globex"}
    assert len(store.list_tasks(tenant=ANY_TENANT)) == 3
    assert [row["tenant"] for row in store.usage_summary("tenant", tenant="acme")] == ["acme"]
    assert store.conversation_tenants("chat") == {"acme", "globex", None}
    assert store.conversation_tenants("other") == set()
    store.dispose()


def test_idempotency_keys_are_per_tenant(database_url: str) -> None:
    store = Store.from_url(database_url)
    first, created = store.create_task(parse_job({"images": ["s3://b/k.png"], "prompt": "p", "tenant": "acme",
                                                  "idempotency_key": "k-1"}))
    again, created_again = store.create_task(parse_job({"images": ["s3://b/k.png"], "prompt": "p",
                                                        "tenant": "acme", "idempotency_key": "k-1"}))
    other, created_other = store.create_task(parse_job({"images": ["s3://b/k.png"], "prompt": "p",
                                                        "tenant": "globex", "idempotency_key": "k-1"}))
    store.dispose()
    assert created and not created_again and again.id == first.id
    assert created_other and other.id != first.id


@pytest.mark.parametrize("change", [{"prompt": "another question"}, {"images": ["s3://b/other.png"]},
                                    {"model": "qvq-plus"}, {"high_resolution": True}, {"metadata": {"x": 1}}])
def test_an_idempotency_key_used_with_another_request_is_a_mismatch(database_url: str, change: dict[str, Any],
                                                                    ) -> None:
    store = Store.from_url(database_url)
    try:
        request = {"images": ["s3://b/k.png"], "prompt": "p", "tenant": "acme", "idempotency_key": "k-2"}
        first, _ = store.create_task(parse_job(request))
        with pytest.raises(IdempotencyMismatch) as caught:
            store.create_task(parse_job({**request, **change}))
        assert caught.value.code == "idempotency.mismatch" and first.id in caught.value.message
        assert store.create_task(parse_job(request))[0].id == first.id  # the same request still returns it
    finally:
        store.dispose()
