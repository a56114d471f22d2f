"""The `qvq` command: what lives here.

    main.py       the command group and its options; every command is added there
    common.py     what commands share: the client (direct, or HTTP with --api), consoles, errors, tables
    tasks.py      submit, follow, result, cancel, retry, tasks, failed
    reports.py    usage, limits
    callbacks.py  callbacks show, callbacks redeliver
    services.py   demo, worker, api, emulator (the processes this package runs)
    errors.py     one line and an exit code for every error a command can meet
    render.py     a task's events and record on a terminal (or plain, when piped)
    waiting.py    what a queued task waits for, said while it waits
    intake.py     what `submit` checks before anything is queued

Exit codes: 0 completed, 1 the task failed, 2 bad usage, input or settings, 3 cancelled.
"""

from __future__ import annotations

from producer.cli.main import main

__all__ = ["main"]
