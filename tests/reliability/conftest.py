"""Fixtures of the reliability tests (helpers in tests/reliability/__init__.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.reliability import Stack


@pytest.fixture(scope="package")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One shared stack with one worker (50 streams): tests submit their own tasks and only look at those."""
    with Stack(tmp_path_factory.mktemp("shared-stack")) as shared:
        shared.start_worker(concurrency=50, name="shared")
        yield shared


@pytest.fixture()
def make_stack(tmp_path: Path) -> Iterator[Callable[..., Stack]]:
    """Factory: make_stack(**env) -> a fresh, private Stack (no worker started), closed at teardown."""
    stacks: list[Stack] = []

    def make(**env: Any) -> Stack:
        created = Stack(tmp_path / f"stack{len(stacks)}", **env)
        stacks.append(created)
        return created

    yield make
    for created in stacks:
        created.close()
