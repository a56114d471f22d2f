"""The worker: Celery processes that run QVQ jobs. What lives here, and what each part may import.

    celery.py      the Celery app and its configuration (imports nothing else of the worker)
    lifecycle.py   every signal handler; the process's context built, its loops started and stopped
    tasks.py       the thin Celery tasks (qvq.reason, qvq.callback)
    context.py     the outside systems of one process (Redis, the store, the model, the sender...)
    pipeline.py    one task, start to finish, as a list of steps (TaskRun)
    intake/        the queue message, image fetching (one source per scheme), validation, the prompt
    stream/        the model call, its chunks, delta coalescing, group-committed publishing
    flow/          flow control: model limiter, tenant fairness, budgets, parking
    recovery/      leases, cancel and time limit, the recovery sweep
    callbacks/     durable signed callbacks
    ops/           health endpoints, task metrics, the model endpoint probe

Nothing imports tasks.py; only tasks.py imports lifecycle.py (for the context); celery.py imports
nothing of the worker; nothing here imports producer/ (tests/test_house.py checks all three).
"""
