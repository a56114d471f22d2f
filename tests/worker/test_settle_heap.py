"""Before its first task the worker loads what first runs would load lazily and freezes its start-up heap
(worker/lifecycle.py `_settle_heap`); a warm-up that fails is logged and the worker starts anyway."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from PIL import Image
from structlog.testing import capture_logs

from worker.lifecycle import _settle_heap
from worker.loop import WorkerLoop


class Model:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.warmed = False

    async def warm(self) -> None:
        if self.fail:
            raise RuntimeError("no client")
        self.warmed = True


@pytest.fixture()
def loop() -> Iterator[WorkerLoop]:
    worker_loop = WorkerLoop(name="settle-test").start()
    yield worker_loop
    worker_loop.stop()
    gc.unfreeze()  # the test process's heap goes back to the collector


def test_the_decoders_and_the_model_are_loaded_then_the_heap_frozen(loop: WorkerLoop) -> None:
    model = Model()
    frozen_before = gc.get_freeze_count()
    _settle_heap(SimpleNamespace(loop=loop, model=model))  # type: ignore[arg-type]
    assert model.warmed
    assert "WEBP" in Image.OPEN and "GIF" in Image.OPEN  # every decoder registered, not only the common five
    assert gc.get_freeze_count() > frozen_before


def test_a_failed_warm_up_is_logged_and_the_heap_still_frozen(loop: WorkerLoop) -> None:
    with capture_logs() as logs:
        _settle_heap(SimpleNamespace(loop=loop, model=Model(fail=True)))  # type: ignore[arg-type]
    assert [entry["error"] for entry in logs if entry["event"] == "worker.warm_up_failed"] == [
        "RuntimeError: no client"]
    assert gc.get_freeze_count() > 0
