"""`qvq demo`: the whole pipeline on embedded defaults, torn down cleanly at the end.

Redis: the one REDIS_URL names when it is set (and answers), else an embedded server of the demo's own
(never whatever happens to answer at localhost:6379). Store: SQLite. Model: the
emulator on a free port, unless DASHSCOPE_API_KEY is set (then the real service). Worker: a child
process running the real Celery worker with the threads pool.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any

from rich.console import Console

from contracts.errors import LocalServiceError
from contracts.redaction import shown_url
from contracts.settings import Settings
from producer.cli.render import EventRenderer
from producer.client import Client
from producer.local.embedded import EmbeddedRedis, redis_reachable, stop_process_group
from producer.local.worker_command import worker_command

SAMPLE_IMAGE = Path(__file__).resolve().parent.parent / "samples" / "triangle.png"
DEFAULT_PROMPT = "What is the area of the triangle in this picture? Show your reasoning."


def demo_environment(stack: ExitStack, console: Console) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("DATABASE_URL", "sqlite:///" + str(Path("qvq.db").resolve()))
    env["QVQ_ALLOW_LOCAL_FILES"] = "1"
    env.setdefault("LOG_LEVEL", "WARNING")
    # A queue of the demo's own: a worker already on this Redis (maybe one that bills the real
    # service) must not take the demo's job, nor the demo's worker someone else's.
    env["QVQ_QUEUE"] = f"qvq-demo-{os.getpid()}"
    redis_url = env.get("REDIS_URL")
    if redis_url and redis_reachable(redis_url):
        console.print(f"[dim]redis:[/] {shown_url(redis_url)} (REDIS_URL)")
    else:
        server = stack.enter_context(EmbeddedRedis())
        env["REDIS_URL"] = server.url
        env.pop("CELERY_BROKER_URL", None)
        console.print(f"[dim]redis:[/] embedded {Path(server.binary).name} at {server.url}")
    if env.get("DASHSCOPE_API_KEY"):
        console.print(f"[dim]model:[/] {env.get('QVQ_BASE_URL') or Settings().base_url} (real service)")
    else:
        from emulator.server import EmulatorConfig, EmulatorServer

        config = EmulatorConfig(tps=120.0, first_token_s=0.3, reasoning_tokens=160, answer_tokens=60)
        emulator = stack.enter_context(EmulatorServer(config))
        env["QVQ_BASE_URL"] = emulator.url
        console.print(f"[dim]model:[/] QVQ emulator at {emulator.url} (set DASHSCOPE_API_KEY for the real one)")
    console.print(f"[dim]store:[/] {env['DATABASE_URL']}  [dim]queue:[/] {env['QVQ_QUEUE']}")
    return env


def start_worker(env: dict[str, str], log_file: IO[bytes], concurrency: int = 8) -> subprocess.Popen[bytes]:
    """The real worker as a child process; its own output goes to a log file, not over the demo."""
    args = worker_command(concurrency=concurrency, queue=env["QVQ_QUEUE"], name=f"qvq-demo-{os.getpid()}@%h",
                          heartbeat=False, loglevel=env.get("LOG_LEVEL", "WARNING"))
    return subprocess.Popen(args, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)


def _events_while_alive(handle: Any, worker: subprocess.Popen[bytes], log_path: str) -> Iterator[dict[str, Any]]:
    """The task's events; if the worker dies first, say so and show its log instead of waiting forever."""
    last_seq = 0
    while True:
        try:
            for event in handle.events(from_seq=last_seq, idle_timeout=5):
                last_seq = event["seq"]
                yield event
            return
        except TimeoutError:
            if worker.poll() is not None:
                log = Path(log_path).read_text(errors="replace")[-3000:]
                Console(stderr=True, highlight=False).print(log, markup=False, style="dim")
                raise LocalServiceError(f"the demo worker exited with code {worker.returncode} (its log is above)") from None


def run_demo(images: Sequence[str], prompt: str | None, console: Console | None = None) -> int:
    console = console or Console(highlight=False, soft_wrap=True)
    started = time.monotonic()
    with ExitStack() as stack:
        env = demo_environment(stack, console)
        worker_log = stack.enter_context(tempfile.NamedTemporaryFile(prefix="qvq-demo-worker-", suffix=".log"))
        worker = start_worker(env, worker_log)
        stack.callback(stop_process_group, worker)  # SIGTERM: Celery's warm shutdown
        client = stack.enter_context(Client(Settings.from_env(env)))
        handle = client.submit(images=list(images) or [str(SAMPLE_IMAGE)], prompt=prompt or DEFAULT_PROMPT)
        terminal = EventRenderer(console).render_all(_events_while_alive(handle, worker, worker_log.name))
        record = client.get(handle.task_id)
        console.print(f"[dim]task {handle.task_id} {record.status}; "
                      f"demo took {time.monotonic() - started:.1f} s; "
                      f"`qvq result {handle.task_id}` shows it again[/]")
    return 0 if terminal and terminal["type"] == "task.completed" else 1
