"""The one place the worker's command line is written (`qvq worker`, the demo, the tests, the benchmarks).

Importing this module imports no worker code: a process that starts workers need not load them.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from contracts.job import QUEUE

CELERY_APP = "worker.celery:app"


def celery_worker_args(*, concurrency: int, queue: str = QUEUE, pool: str = "threads", name: str | None = None,
                       heartbeat: bool = True, loglevel: str | None = None,
                       extra: Sequence[str] = ()) -> list[str]:
    """`worker ...` as `celery -A worker.celery:app` takes it: the queue, the pool, and no gossip or mingle
    (workers share nothing but the queue; with hundreds of them, gossip is pure overhead)."""
    args = ["worker", "-Q", queue, "-P", pool, "-c", str(concurrency), "--without-gossip", "--without-mingle"]
    if name:
        args += ["-n", name]
    if not heartbeat:
        args.append("--without-heartbeat")
    if loglevel:
        args += ["--loglevel", loglevel]
    return [*args, *extra]


def worker_command(*, concurrency: int, queue: str = QUEUE, pool: str = "threads", name: str | None = None,
                   heartbeat: bool = True, loglevel: str | None = None, extra: Sequence[str] = ()) -> list[str]:
    """The full command line of a worker child process (this interpreter, `-m celery`)."""
    return [sys.executable, "-m", "celery", "-A", CELERY_APP,
            *celery_worker_args(concurrency=concurrency, queue=queue, pool=pool, name=name, heartbeat=heartbeat,
                                loglevel=loglevel, extra=extra)]
