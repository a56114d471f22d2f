"""The `qvq` command as a user runs it: a real process, a real worker, the emulator."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from contracts.job import parse_job
from contracts.settings import Settings
from contracts.store import Store
from producer.local.embedded import free_port
from tests.imagegen import make_image
from tests.producer import ApiServer
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(120)


@pytest.fixture()
def qvq(service_env: dict[str, str]) -> Any:
    """Run `qvq ARGS` as a user does; `env` overrides variables (None removes one), `stdin` is fed in."""

    def run(*args: str, check_code: int | None = 0, env: dict[str, str | None] | None = None,
            stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        merged: dict[str, str | None] = {**os.environ, **service_env, "LOG_LEVEL": "WARNING", **(env or {})}
        done = subprocess.run([sys.executable, "-m", "producer.cli", *args], capture_output=True, text=True,
                              env={k: v for k, v in merged.items() if v is not None}, input=stdin, timeout=90)
        if check_code is not None:
            assert done.returncode == check_code, (done.stdout, done.stderr)
        return done

    return run


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    """The error a command printed: exactly one line on stderr starting with "error:", no traceback."""
    lines = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("note:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    return lines[0]


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
    broken = tmp_path / "broken.png"
    broken.write_bytes(make_image("PNG", size=(80, 60))[:40])  # a PNG's start, cut short: only a decode tells
    task_id = qvq("submit", str(broken), "--prompt", "What is this?").stdout.strip()
    assert qvq("follow", task_id, check_code=1).returncode == 1
    listed = json.loads(qvq("failed", "--since", "1", "--json").stdout)
    assert [(t["task_id"], t["error"]["code"]) for t in listed] == [(task_id, "image.corrupt")]
    assert "image.corrupt" in qvq("failed").stdout
    assert qvq("result", task_id, check_code=1).returncode == 1


def test_bad_input_exits_2_with_a_clear_message(qvq: Any, image: str) -> None:
    done = qvq("submit", image, "--prompt", "hi", "--model", "qvq-ultra", check_code=2)
    assert "model.unknown" in done.stderr and "qvq-ultra" in done.stderr
    done = qvq("submit", "missing.png", "--prompt", "hi", check_code=2)
    assert "no such file 'missing.png'" in one_line_error(done)
    done = qvq("result", "no-such-task", check_code=2)
    assert "no task" in one_line_error(done)
    done = qvq("failed", "--since", "yesterday-ish", check_code=2)
    assert "--since" in one_line_error(done)
    assert "a question is required" in one_line_error(qvq("submit", image, check_code=2))
    debug = qvq("--debug", "result", "no-such-task", check_code=1)
    assert "Traceback" in debug.stderr and "no task" in debug.stderr


def test_a_conversation_turn_resends_the_earlier_turns(qvq: Any, start_worker: Any, image: str) -> None:
    start_worker()
    first = qvq("submit", image, "--prompt", "What colour?", "--conversation", "c-1", "--json")
    qvq("follow", json.loads(first.stdout)["task_id"], "--json")
    second = json.loads(qvq("submit", "--prompt", "And its size?", "--conversation", "c-1", "--json").stdout)
    qvq("follow", second["task_id"], "--json")
    alone = json.loads(qvq("submit", image, "--prompt", "And its size?", "--conversation", "c-2",
                           "--new-conversation", "--json").stdout)
    qvq("follow", alone["task_id"], "--json")
    with_history = json.loads(qvq("result", second["task_id"], "--json").stdout)
    without = json.loads(qvq("result", alone["task_id"], "--json").stdout)
    assert with_history["status"] == without["status"] == "completed"
    # The second turn carries the first prompt and answer (never its reasoning) as history.
    text_tokens = [r["usage"]["prompt_tokens_details"]["text_tokens"] for r in (with_history, without)]
    assert text_tokens[0] > text_tokens[1]


# -- errors: one line, the right exit code, no secret -------------------------------------------
def test_an_unreachable_redis_is_one_line_naming_the_setting(qvq: Any, image: str) -> None:
    task_id = qvq("submit", image, "--prompt", "hi").stdout.strip()
    dead = {"REDIS_URL": f"redis://:hunter2@127.0.0.1:{free_port()}/0"}
    for args in (("follow", task_id), ("submit", image, "--prompt", "hi"), ("cancel", task_id)):
        done = qvq(*args, env=dead, check_code=2)
        line = one_line_error(done)
        assert "cannot reach Redis" in line and "REDIS_URL" in line and "hunter2" not in done.stderr


def test_bad_settings_are_one_line_before_anything_starts(qvq: Any, image: str) -> None:
    line = one_line_error(qvq("worker", env={"QVQ_TASK_TIMEOUT_S": "9000"}, check_code=2))
    assert "QVQ_VISIBILITY_TIMEOUT_S" in line and "QVQ_TASK_TIMEOUT_S" in line
    line = one_line_error(qvq("submit", image, "--prompt", "hi", env={"QVQ_QUEUE": "two words"}, check_code=2))
    assert "QVQ_QUEUE" in line


def test_a_postgres_url_in_the_usual_spelling_is_accepted_and_its_password_never_shown(qvq: Any) -> None:
    # postgres:// goes to the installed psycopg driver; nothing listens on the port, so it cannot connect.
    done = qvq("result", "t-1", env={"DATABASE_URL": f"postgres://qvq:hunter2@127.0.0.1:{free_port()}/qvq"},
               check_code=2)
    line = one_line_error(done)
    assert "cannot use the database" in line and "DATABASE_URL" in line and "hunter2" not in done.stderr


def test_a_duplicate_task_id_is_refused(qvq: Any, image: str) -> None:
    qvq("submit", image, "--prompt", "hi", "--task-id", "t-dup")
    line = one_line_error(qvq("submit", image, "--prompt", "hi", "--task-id", "t-dup", check_code=2))
    assert "task_id" in line and "already taken" in line


def test_an_idempotency_key_reused_with_another_prompt_exits_2_naming_the_first_task(qvq: Any, image: str) -> None:
    first = json.loads(qvq("submit", image, "--prompt", "hi", "--idempotency-key", "k-cli", "--json").stdout)
    again = json.loads(qvq("submit", image, "--prompt", "hi", "--idempotency-key", "k-cli", "--json").stdout)
    task_id = first["task_id"]
    assert again == {**first, "created": False}
    line = one_line_error(qvq("submit", image, "--prompt", "bye", "--idempotency-key", "k-cli", check_code=2))
    assert "idempotency" in line and task_id in line


def test_version_comes_from_the_package_metadata(qvq: Any) -> None:
    assert qvq("--version").stdout.strip() == f"qvq {importlib.metadata.version('qvq-queue')}"


# -- refused before queueing ---------------------------------------------------------------------
def test_a_local_file_that_is_not_an_image_is_refused_before_queueing(qvq: Any, tmp_path: Path,
                                                                        redis_client: Any) -> None:
    notes = tmp_path / "notes.png"
    notes.write_text("shopping list: milk, eggs")
    line = one_line_error(qvq("submit", str(notes), "--prompt", "What is this?", check_code=2))
    assert "image.unsupported_format" in line and "notes.png" in line and "text, not an image" in line
    assert redis_client.llen("qvq") == 0  # nothing was queued


def test_a_local_image_gets_a_hint_about_the_worker(qvq: Any, image: str) -> None:
    done = qvq("submit", image, "--prompt", "hi")
    assert [line for line in done.stderr.splitlines() if line] == [
        "note: local files are read by the worker from this machine's disk: it needs QVQ_ALLOW_LOCAL_FILES=1 "
        "and must run on this host"]
    assert qvq("submit", "s3://photos/a.png", "--prompt", "hi").stderr == ""


def test_an_unknown_conversation_is_refused_unless_the_turn_starts_it(qvq: Any, image: str,
                                                                       redis_client: Any) -> None:
    line = one_line_error(qvq("submit", "--prompt", "And then?", "--conversation", "typo", check_code=2))
    assert "conversation.not_found" in line and "typo" in line
    assert redis_client.llen("qvq") == 0
    started = qvq("submit", image, "--prompt", "What colour?", "--conversation", "c-new")
    assert "conversation c-new is new" in started.stderr
    qvq("submit", "--prompt", "And then?", "--conversation", "c-new")  # it exists now
    line = one_line_error(qvq("submit", image, "--prompt", "hi", "--conversation", "c-new", "--new-conversation",
                              check_code=2))
    assert "already exists" in line


def test_a_long_question_comes_from_a_file_or_stdin(qvq: Any, image: str, tmp_path: Path) -> None:
    question = "Which of these numbers is largest? " + " ".join(str(n) for n in range(9000))  # ~50k chars
    path = tmp_path / "question.txt"
    path.write_text(question, encoding="utf-8")
    from_file = qvq("submit", image, "--prompt-file", str(path)).stdout.strip()
    from_stdin = qvq("submit", image, "--prompt", "-", stdin=question).stdout.strip()
    for task_id in (from_file, from_stdin):
        assert json.loads(qvq("result", task_id, "--json").stdout)["request"]["prompt"] == question
    line = one_line_error(qvq("submit", image, "--prompt", "hi", "--prompt-file", str(path), check_code=2))
    assert "not both" in line


# -- no silent waits -----------------------------------------------------------------------------
def test_a_queued_task_says_no_worker_consumes_its_queue_in_plain_text(
        service_env: dict[str, str], start_worker: Any, image: str) -> None:
    start_worker()  # consumes queue "qvq", not the one this task goes to
    env = {**os.environ, **service_env, "QVQ_QUEUE": "nobody-here"}
    process = subprocess.Popen([sys.executable, "-m", "producer.cli", "submit", image, "--prompt", "hi", "--follow"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stderr is not None
        lines = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any("no worker" in line for line in lines):
            lines.append(process.stderr.readline())
    finally:
        process.kill()
        process.communicate()
    assert "no worker is consuming queue nobody-here: start one with `qvq worker`\n" in lines
    assert not any("\x1b" in line or "\r" in line for line in lines)  # piped: no spinner, no control codes


def test_a_worker_on_the_chosen_queue_runs_the_task_and_the_viewer_counts_it(
        qvq: Any, start_worker: Any, image: str) -> None:
    start_worker(QVQ_QUEUE="mine")
    done = qvq("submit", image, "--prompt", "What colour?", "--follow", env={"QVQ_QUEUE": "mine"})
    assert "Answer" in done.stdout and "80x60" in done.stdout


def test_a_cancelled_task_exits_3(qvq: Any, image: str) -> None:
    task_id = qvq("submit", image, "--prompt", "hi").stdout.strip()  # no worker: it stays queued
    assert "cancel requested" in qvq("cancel", task_id).stdout
    qvq("follow", task_id, check_code=3)
    qvq("result", task_id, check_code=3)


def test_result_is_readable_with_the_bill_in_decimals(qvq: Any, start_worker: Any, image: str) -> None:
    start_worker()
    task_id = qvq("submit", image, "--prompt", "What colour?", "--model", "qvq-plus").stdout.strip()
    qvq("follow", task_id, "--json")
    text = qvq("result", task_id).stdout
    for part in ("completed", "Question", "What colour?", "Thinking", "Answer", "Usage", "prompt tokens",
                 "red.png", " CNY (input ", "first thinking "):
        assert part in text, part
    cost = next(line for line in text.splitlines() if line.startswith("cost "))
    assert re.fullmatch(r"cost +\d+\.\d+ CNY \(input \d+(\.\d+)? \+ output \d+(\.\d+)?\)", cost), cost
    # no float in scientific notation anywhere (the task id is hex: "823823be-0f..." is not one), no raw dict
    assert not re.search(r"\d[eE]-?\d", text.replace(task_id, "")) and "{" not in text


# -- the worker checks its model endpoint at start -----------------------------------------------
def test_a_worker_without_a_key_for_dashscope_refuses_to_start(qvq: Any) -> None:
    done = qvq("worker", env={"QVQ_BASE_URL": None, "DASHSCOPE_API_KEY": None}, check_code=None)
    assert done.returncode != 0
    assert "refused to start" in done.stderr and "DASHSCOPE_API_KEY is unset" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_worker_warns_when_its_model_endpoint_does_not_answer(start_worker: Any) -> None:
    worker = start_worker(QVQ_BASE_URL=f"http://127.0.0.1:{free_port()}/v1")
    (warning,) = wait_until(lambda: worker.log_events("worker.model_endpoint_unusable"), 15)
    assert warning["level"] == "warning" and warning["problem"].startswith("unreachable")


def test_an_unreachable_broker_says_which_setting_and_how_to_requeue(qvq: Any, image: str) -> None:
    broker = {"CELERY_BROKER_URL": f"redis://:hunter2@127.0.0.1:{free_port()}/0"}
    done = qvq("submit", image, "--prompt", "hi", env=broker, check_code=2)
    line = one_line_error(done)
    assert "cannot reach the Celery broker" in line and "CELERY_BROKER_URL" in line and "qvq retry" in line
    assert "hunter2" not in done.stderr


# -- the translation of third-party errors, one case each ------------------------------------------
def _raised(make: Any) -> BaseException:
    try:
        make()
    except BaseException as exc:  # what the library raises is the point
        return exc
    raise AssertionError("nothing was raised")


def test_driver_errors_become_one_line_without_the_address() -> None:
    import redis
    import sqlalchemy as sa

    from producer.cli.errors import EXIT_FAILED, EXIT_USAGE, explain

    refused = _raised(lambda: redis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=1).ping())
    problem = explain(refused)
    assert problem.exit_code == EXIT_USAGE and problem.line.startswith("cannot reach Redis: Connection refused")
    assert "127.0.0.1" not in problem.line

    psycopg_text = ('connection failed: connection to server at "10.1.2.3", port 5432 failed: '
                    'Connection refused\n\tIs the server running on that host?')
    problem = explain(sa.exc.OperationalError("SELECT 1", {}, Exception(psycopg_text)))
    assert problem.line.startswith("cannot use the database: Connection refused") and "10.1.2.3" not in problem.line

    problem = explain(sa.exc.IntegrityError("INSERT", {}, Exception("UNIQUE constraint failed: qvq_tasks.id")))
    assert problem.exit_code == EXIT_USAGE and "duplicate" in problem.line

    problem = explain(ZeroDivisionError("division by zero"))
    assert problem.exit_code == EXIT_FAILED and "--debug" in problem.line


def test_the_demo_keeps_its_job_from_other_workers_on_the_same_redis(qvq: Any, start_worker: Any) -> None:
    other = start_worker(name="prod")  # a worker already on this Redis, consuming queue "qvq"
    done = qvq("demo", "--prompt", "What shape is this?", env={"DASHSCOPE_API_KEY": None})
    assert "Answer" in done.stdout and "completed" in done.stdout
    assert "queue: qvq-demo-" in done.stdout
    assert not other.log_events(task_name="qvq.reason")  # the job went to the demo's own worker, never to this one


# -- where a new user trips: a refused key, a closed pipe, Ctrl-C, an empty database --------------
def spawn(service_env: dict[str, str], *args: str, **env: str) -> subprocess.Popen[str]:
    # SIGINT as a terminal gives it: a pytest-xdist worker ignores SIGINT, and a child would inherit that.
    return subprocess.Popen([sys.executable, "-m", "producer.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                            env={**os.environ, **service_env, "LOG_LEVEL": "WARNING", "PYTHONUNBUFFERED": "1", **env})


def test_a_refused_or_missing_api_key_exits_2(qvq: Any, service_env: dict[str, str]) -> None:
    key = "acme-key-0123456789abcdef"
    with ApiServer(Settings.from_env({**service_env, "QVQ_API_KEYS": f"acme:{key}"})) as api:
        for given in ("wrong-key-0123456789abcdef", None):
            done = qvq("tasks", check_code=2, env={"QVQ_API_URL": api.url, "QVQ_API_KEY": given})
            assert one_line_error(done).startswith("error: auth.")


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_stopping_a_follow_says_the_task_goes_on_and_how_to_follow_it_again(
        qvq: Any, service_env: dict[str, str], image: str, stop: int) -> None:
    task_id = qvq("submit", image, "--prompt", "hi").stdout.strip()  # no worker: it stays queued
    follower = spawn(service_env, "follow", task_id)
    assert follower.stdout is not None
    first_line: list[str] = []
    reader = threading.Thread(target=lambda: first_line.append(follower.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(timeout=60)  # the viewer printed the task's first event: it is following now
    assert first_line and "queued" in first_line[0], first_line
    follower.send_signal(stop)
    _, stderr = follower.communicate(timeout=30)
    assert follower.returncode == (130 if stop == signal.SIGINT else 143), stderr
    assert f"task {task_id} is queued" in stderr and f"qvq follow {task_id} --from-seq" in stderr
    assert "Aborted" not in stderr and "Traceback" not in stderr


def test_a_closed_pipe_ends_follow_quietly(qvq: Any, service_env: dict[str, str], image: str) -> None:
    task_id = qvq("submit", image, "--prompt", "hi").stdout.strip()
    qvq("cancel", task_id)
    reader = subprocess.run(f"{sys.executable} -m producer.cli follow --json {task_id} | head -c 1", shell=True,
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, **service_env, "LOG_LEVEL": "WARNING"})
    assert "unexpected" not in reader.stderr and "BrokenPipe" not in reader.stderr, reader.stderr


def test_reading_commands_create_no_tables(qvq: Any, tmp_path: Path) -> None:
    database = tmp_path / "fresh.db"
    url = f"sqlite:///{database}"
    for args in (("tasks",), ("failed",), ("usage",), ("result", "nope")):
        line = one_line_error(qvq(*args, check_code=2, env={"DATABASE_URL": url}))
        assert "no qvq tables" in line
    if database.exists():  # SQLite may leave an empty file; never a table
        with sqlite3.connect(database) as conn:
            assert conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall() == []
    assert not list(tmp_path.glob("*.lock"))
    Store.from_url(url).dispose()  # a writer creates them, and leaves no lock file beside the database
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("fresh.db")) == []


def test_a_directory_is_not_an_image(qvq: Any, tmp_path: Path) -> None:
    line = one_line_error(qvq("submit", str(tmp_path), "--prompt", "hi", check_code=2))
    assert "is a directory" in line


def test_a_bad_settings_value_is_never_shown(qvq: Any) -> None:
    line = one_line_error(qvq("tasks", check_code=2, env={"QVQ_WORKER_CONCURRENCY": "s3cr3t-abc"}))
    assert "QVQ_WORKER_CONCURRENCY" in line and "s3cr3t" not in line


def test_usage_by_tenant_names_the_rows_without_one(qvq: Any, service_env: dict[str, str]) -> None:
    store = Store.from_url(service_env["DATABASE_URL"])
    try:
        for tenant in ("acme", None):
            job = parse_job({"images": ["s3://b/k.png"], "prompt": "p", **({"tenant": tenant} if tenant else {})})
            store.create_task(job)
            store.record_usage(job.task_id, 1, model="qvq-max", tenant=tenant, prompt_tokens=10,
                               completion_tokens=5, estimated=False, outcome="completed")
    finally:
        store.dispose()
    out = qvq("usage", "--by", "tenant").stdout
    assert "(no tenant)" in out and "None" not in out
