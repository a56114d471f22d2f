"""One run, step by step (worker/pipeline.py), on doubles: the real store on in-memory SQLite, an
in-memory bus, a scripted model (tests/doubles.py). What each step publishes and persists, in order."""

from __future__ import annotations

import json
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from contracts import events as ev
from contracts.catalog import ModelInfo
from contracts.errors import ModelError
from contracts.job import message_for, parse_job
from contracts.settings import Settings
from contracts.store import Store
from tests.doubles import MemoryBus, ScriptedModel, StaticFetcher, broken, memory_store, worker_context
from worker import pipeline
from worker.intake import prompt

THINK = [("reasoning", "Three sides, "), ("reasoning", "a right angle."), ("answer", "Six "), ("answer", "square cm.")]


@pytest.fixture()
def store() -> Iterator[Store]:
    store = memory_store()
    yield store
    store.dispose()


def submit(store: Store, **fields: Any) -> str:
    job = parse_job({"images": ["s3://photos/triangle.png"], "prompt": "What is its area?", **fields})
    store.create_task(job)
    return job.task_id


def run(store: Store, model: ScriptedModel, task_id: str, **parts: Any) -> tuple[str | None, MemoryBus]:
    bus = parts.pop("bus", None) or MemoryBus()
    ctx = worker_context(store, model, bus=bus, **parts)
    return pipeline.run_task(message_for(task_id, 0), ctx, delivery_id=task_id), bus


def test_a_run_publishes_each_step_and_persists_exactly_what_it_streamed(store: Store) -> None:
    task_id = submit(store)
    model = ScriptedModel(THINK)
    outcome, bus = run(store, model, task_id)
    assert outcome == "completed"
    types = bus.types(task_id)
    assert types[:2] == [ev.STARTED, ev.IMAGES_READY] and types[-1] == ev.COMPLETED
    assert set(types[2:-1]) == {ev.REASONING_DELTA, ev.ANSWER_DELTA}
    record = store.get(task_id)
    assert record is not None and record.status == "completed" and record.attempts == 1
    assert record.reasoning == bus.text(task_id, ev.REASONING_DELTA) == "Three sides, a right angle."
    assert record.answer == bus.text(task_id, ev.ANSWER_DELTA) == "Six square cm."
    assert record.last_seq == bus.read_log(task_id)[-1]["seq"]
    (call,) = model.calls
    content = call["messages"][-1]["content"]
    assert [part["type"] for part in content] == ["image_url", "text"] and content[-1]["text"] == "What is its area?"
    (bill,) = store.usage_rows(task_id)
    assert bill["attempt"] == 1 and bill["outcome"] == "completed"


def test_a_retryable_model_error_voids_the_attempts_text_and_the_next_attempt_completes(store: Store) -> None:
    task_id = submit(store)
    model = ScriptedModel(broken(), THINK)
    outcome, bus = run(store, model, task_id)
    assert outcome == "completed" and [c["attempt"] for c in model.calls] == [1, 2]
    (retrying,) = [e for e in bus.read_log(task_id) if e["type"] == ev.RETRYING]
    assert retrying["attempt"] == 2 and retrying["error"]["code"] == "model.stream_broken"
    assert retrying["delay_s"] <= Settings(retry_base_s=0.001, retry_max_s=0.01).retry_max_s
    record = store.get(task_id)
    assert record is not None and record.attempts == 2 and record.answer == bus.text(task_id, ev.ANSWER_DELTA, 2)


def test_a_final_model_error_fails_the_task_once_with_its_code(store: Store) -> None:
    task_id = submit(store)
    model = ScriptedModel(broken("400 Input data may contain inappropriate content.", code="model.rejected"))
    outcome, bus = run(store, model, task_id)
    assert outcome == "failed" and len(model.calls) == 1
    (failed,) = [e for e in bus.read_log(task_id) if e["type"] == ev.FAILED]
    assert failed["error"] == {"code": "model.rejected", "retryable": False,
                               "message": "400 Input data may contain inappropriate content."}
    record = store.get(task_id)
    assert record is not None and (record.status, record.error_code) == ("failed", "model.rejected")


def test_retries_stop_at_the_attempt_cap(store: Store) -> None:
    task_id = submit(store)
    model = ScriptedModel(broken(), broken(), broken())
    settings = Settings(max_attempts=2, retry_base_s=0.001, retry_max_s=0.01)
    outcome, bus = run(store, model, task_id, settings=settings)
    assert outcome == "failed" and len(model.calls) == 2
    assert bus.types(task_id).count(ev.RETRYING) == 1


def test_a_cancel_mid_stream_ends_the_run_cancelled_with_the_partial_text(store: Store) -> None:
    task_id = submit(store)
    ctx_cancels: list[Any] = []

    def cancel() -> None:
        ctx_cancels[0].cancel(task_id)

    model = ScriptedModel([("reasoning", "Counting the sides"), cancel, ("reasoning", " never sent")])
    bus = MemoryBus()
    ctx = worker_context(store, model, bus=bus)
    ctx_cancels.append(ctx.cancels)
    outcome = pipeline.run_task(message_for(task_id, 0), ctx, delivery_id=task_id)
    assert outcome == "cancelled" and bus.types(task_id)[-1] == ev.CANCELLED
    record = store.get(task_id)
    assert record is not None and record.status == "cancelled" and record.reasoning == "Counting the sides"


def test_a_job_over_the_models_input_is_refused_before_any_call(store: Store,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prompt, "model_info", lambda name: ModelInfo(name, "qvq-max", 0, 0, max_input=10))
    task_id = submit(store)
    model = ScriptedModel(THINK)
    outcome, bus = run(store, model, task_id)
    assert outcome == "failed" and model.calls == []
    assert bus.types(task_id) == [ev.STARTED, ev.IMAGES_READY, ev.FAILED]
    record = store.get(task_id)
    assert record is not None and record.error_code == "images.token_budget_exceeded"
    assert store.usage_rows(task_id) == []  # nothing billed


def test_a_delta_that_cannot_be_published_never_stops_the_result(store: Store) -> None:
    task_id = submit(store)
    bus = MemoryBus(fail=lambda type_: type_ in ev.DELTA_TYPES)
    outcome, _ = run(store, ScriptedModel(THINK), task_id, bus=bus)
    assert outcome == "completed" and bus.types(task_id)[-1] == ev.COMPLETED
    record = store.get(task_id)
    assert record is not None and record.answer == "Six square cm."  # the row has the text the screens missed
    seqs = [event["seq"] for event in bus.read_log(task_id)]
    assert seqs[-1] > seqs[-2] + 1  # the lost deltas left a hole in seq: every follower says stream.gap


def test_a_message_for_another_run_is_refused_and_nothing_runs(store: Store) -> None:
    task_id = submit(store)
    model = ScriptedModel(THINK)
    ctx = worker_context(store, model)
    assert pipeline.run_task(message_for(task_id, 3), ctx, delivery_id=task_id) == pipeline.REJECTED
    assert model.calls == []
    record = store.get(task_id)
    assert record is not None and record.status == "queued"


# -- the retry decision ----------------------------------------------------------------------------
def _task_run(attempt: int = 1, retry_base: int = 0, **settings: Any) -> pipeline.TaskRun:
    run = pipeline.TaskRun.__new__(pipeline.TaskRun)
    run.ctx = SimpleNamespace(settings=Settings(**settings))  # type: ignore[assignment]
    run.attempt, run.retry_base = attempt, retry_base
    return run


def test_no_retry_when_retry_after_would_pass_the_time_limit() -> None:
    error = ModelError("429 slow down", code="model.rate_limited", retry_after_s=30.0)
    watch = SimpleNamespace(remaining_s=lambda: 10.0, should_stop=lambda: False)
    with pytest.raises(ModelError) as raised:
        _task_run()._before_retry(error, watch)
    assert raised.value is error and error.retryable


def test_no_retry_past_the_attempt_cap_counted_from_the_last_manual_retry() -> None:
    error = ModelError("503", code="model.unavailable")
    watch = SimpleNamespace(remaining_s=lambda: 100.0, should_stop=lambda: False)
    with pytest.raises(ModelError):
        _task_run(attempt=4, retry_base=0)._before_retry(error, watch)
    with pytest.raises(ModelError):
        _task_run(attempt=8, retry_base=4)._before_retry(error, watch)
    rejected = ModelError("400", code="model.rejected")
    with pytest.raises(ModelError):
        _task_run(attempt=1)._before_retry(rejected, watch)


@pytest.mark.parametrize("text", ["a NUL \x00 in the answer", "a lone surrogate \ud800 in the answer"])
def test_an_answer_the_database_refuses_fails_the_task_once_and_bills_once(database_url: str, text: str) -> None:
    """A permanent store error (PostgreSQL refuses NUL; no database takes a lone surrogate) ends the task
    as failed with store.rejected, once: no second run, one ledger row, the terminal event published."""
    store = Store.from_url(database_url)
    store.create_schema()
    try:
        task_id = submit(store)
        model = ScriptedModel([("reasoning", "Thinking. "), ("answer", text)])
        outcome, bus = run(store, model, task_id)
        if outcome == "completed":  # SQLite keeps NUL: then the text must come back whole
            record = store.get(task_id)
            assert record is not None and record.answer == text and "\x00" in text
            return
        assert outcome == "failed" and len(model.calls) == 1
        record = store.get(task_id)
        assert record is not None and record.status == "failed" and record.error_code == "store.rejected"
        assert record.answer in (None, "") and record.attempts == 1
        assert len(store.usage_rows(task_id)) == 1
        assert bus.types(task_id)[-1] == ev.FAILED
        (failed,) = [e for e in bus.read_log(task_id) if e["type"] == ev.FAILED]
        assert failed["error"]["code"] == "store.rejected" and failed["error"]["retryable"] is False
    finally:
        store.dispose()


def _turn(store: Store, model: ScriptedModel, images: list[str], prompt: str, **parts: Any) -> tuple[str, MemoryBus]:
    task_id = submit(store, images=images, prompt=prompt, conversation_id="chat-1")
    outcome, bus = run(store, model, task_id, **parts)
    return task_id, bus


def test_a_later_turn_sends_the_earlier_turns_whole_with_their_images_and_counts_them(store: Store) -> None:
    model = ScriptedModel(THINK, THINK)
    _turn(store, model, ["s3://photos/triangle.png"], "What is its area?")
    second, bus = _turn(store, model, [], "And the second triangle?")
    messages = model.calls[-1]["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    first_user = messages[0]["content"]
    assert [p["type"] for p in first_user] == ["image_url", "text"] and first_user[1]["text"] == "What is its area?"
    assert messages[1]["content"] == "Six square cm." and "Three sides" not in json.dumps(messages)  # no reasoning
    assert [p["type"] for p in messages[2]["content"]] == ["text"]
    (ready,) = [e for e in bus.read_log(second) if e["type"] == ev.IMAGES_READY]
    assert [(i["ref"], i["history"], i["turn"]) for i in ready["images"]] == [("s3://photos/triangle.png", True, 1)]
    assert ready["image_tokens"] == ready["images"][0]["tokens"] > 0
    record = store.get(second)
    assert record is not None and record.images == []  # the row keeps this turn's own images


def test_a_history_over_the_models_input_is_refused_before_any_call_naming_the_turn(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    model = ScriptedModel(THINK)
    _turn(store, model, ["s3://photos/triangle.png"], "What is its area?")
    monkeypatch.setattr(prompt, "model_info", lambda name: ModelInfo(name, "qvq-max", 0, 0, max_input=10))
    second, _ = _turn(store, model, [], "And now?")
    assert len(model.calls) == 1  # only the first turn called the model
    record = store.get(second)
    assert record is not None and record.error_code == "images.token_budget_exceeded"
    assert "turn 1" in (record.error_message or "")


def test_an_earlier_image_that_changed_refuses_the_turn(store: Store) -> None:
    model = ScriptedModel(THINK)
    _turn(store, model, ["s3://photos/triangle.png"], "What is its area?")
    changed = StaticFetcher(size=(84, 56))  # the same reference now holds another picture
    second, _ = _turn(store, model, [], "And now?", fetcher=changed)
    record = store.get(second)
    assert record is not None and record.status == "failed" and record.error_code == "image.not_found"
    assert "turn 1" in (record.error_message or "") and "changed" in (record.error_message or "")
    assert len(model.calls) == 1
