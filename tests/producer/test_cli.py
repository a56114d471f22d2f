"""The `qvq` command as a user runs it: a real process, a real worker, the emulator."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.imagegen import make_image

pytestmark = pytest.mark.timeout(120)


@pytest.fixture()
def qvq(service_env: dict[str, str]) -> Any:
    def run(*args: str, check_code: int | None = 0) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, **service_env, "LOG_LEVEL": "WARNING"}
        done = subprocess.run([sys.executable, "-m", "producer.cli", *args], env=env, capture_output=True,
                              text=True, timeout=90)
        if check_code is not None:
            assert done.returncode == check_code, (done.stdout, done.stderr)
        return done

    return run


@pytest.fixture()
def image(tmp_path: Path) -> str:
    path = tmp_path / "red.png"
    path.write_bytes(make_image("PNG", size=(80, 60), color=(220, 20, 20)))
    return str(path)


def test_submit_result_usage_and_cancel_from_the_command_line(qvq: Any, start_worker: Any, image: str) -> None:
    start_worker()
    submitted = json.loads(qvq("submit", image, "--prompt", "What colour?", "--model", "qvq-plus",
                               "--tenant", "acme", "--json").stdout)
    task_id = submitted["task_id"]
    assert submitted["created"] is True
    qvq("follow", task_id, "--json")
    record = json.loads(qvq("result", task_id, "--json").stdout)
    assert record["status"] == "completed" and "80x60" in record["answer"]
    assert "Answer" in qvq("result", task_id).stdout

    by_tenant = json.loads(qvq("usage", "--by", "tenant", "--json").stdout)["rows"]
    assert by_tenant[0]["tenant"] == "acme" and by_tenant[0]["calls"] == 1
    assert "qvq-plus" in qvq("usage").stdout
    assert "already finished" in qvq("cancel", task_id).stdout


def test_failed_tasks_are_listed_with_their_codes(qvq: Any, start_worker: Any, tmp_path: Path) -> None:
    start_worker()
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    task_id = qvq("submit", str(text), "--prompt", "What is this?").stdout.strip()
    assert qvq("follow", task_id, check_code=1).returncode == 1
    listed = json.loads(qvq("failed", "--since", "1", "--json").stdout)
    assert [(t["task_id"], t["error"]["code"]) for t in listed] == [(task_id, "image.unsupported_format")]
    assert "image.unsupported_format" in qvq("failed").stdout
    assert qvq("result", task_id, check_code=1).returncode == 1


def test_bad_input_exits_2_with_a_clear_message(qvq: Any, image: str) -> None:
    done = qvq("submit", image, "--prompt", "hi", "--model", "qvq-ultra", check_code=2)
    assert "model.unknown" in done.stderr and "qvq-ultra" in done.stderr
    done = qvq("submit", "missing.png", "--prompt", "hi", check_code=2)
    assert "no such file 'missing.png'" in done.stderr
    done = qvq("result", "no-such-task", check_code=2)
    assert "no task" in done.stderr
    done = qvq("failed", "--since", "yesterday-ish", check_code=2)
    assert "--since" in done.stderr


def test_a_conversation_turn_resends_the_earlier_turns(qvq: Any, start_worker: Any, image: str) -> None:
    start_worker()
    first = qvq("submit", image, "--prompt", "What colour?", "--conversation", "c-1", "--json")
    qvq("follow", json.loads(first.stdout)["task_id"], "--json")
    second = json.loads(qvq("submit", "--prompt", "And its size?", "--conversation", "c-1", "--json").stdout)
    qvq("follow", second["task_id"], "--json")
    alone = json.loads(qvq("submit", "--prompt", "And its size?", "--conversation", "c-2", "--json").stdout)
    qvq("follow", alone["task_id"], "--json")
    with_history = json.loads(qvq("result", second["task_id"], "--json").stdout)
    without = json.loads(qvq("result", alone["task_id"], "--json").stdout)
    assert with_history["status"] == without["status"] == "completed"
    # The second turn carries the first prompt and answer (never its reasoning) as history.
    assert with_history["usage"]["prompt_tokens"] > without["usage"]["prompt_tokens"]
