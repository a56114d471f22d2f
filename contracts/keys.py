"""Every Redis key and channel the service uses, named once (the broker's own keys are in contracts/broker.py).

    qvq:task:{id}                  pub/sub channel of a task's events
    qvq:task:{id}:log              stream: the replay log (field `event`)
    qvq:task:{id}:seq              counter handing out seq, atomically with the publish
    qvq:task:{id}:cancel           set when a cancel was asked for
    qvq:task:{id}:lease            held by the worker running the task
    qvq:cancel                     pub/sub: task ids whose cancel was asked for, to every worker
    qvq:flow:model:{family}:*      the model limiter's windows and queue (hash tag: one slot per family)
    qvq:flow:tenant:{tenant}:*     a tenant's running slots and request window
    qvq:flow:waiting:{id}          why a task is held back (JSON), while it is
    qvq:flow:parked, :payloads     tasks parked for tenant concurrency (zset by due time, hash of payloads)
    qvq:budget:{tenant}:{period}*  a tenant's spent and reserved money for a UTC day or month
    qvq:callbacks:due              zset: callback deliveries by the time they are due
    qvq:sweep:*                    the recovery sweep's round lock, suspects, cursors
    qvq:batch:{id}                 pub/sub channel of a batch's events (and :log, :seq as for a task)
    qvq:batch:{id}:tick            held for a moment after a batch.progress (at most a few per second)
    qvq:batch:{id}:order           "<round> <done>" of the last batch event: done never goes back in a round
    qvq:cache:{tenant}:{key}       the result cache: the task whose answer this request has (TTL)
    qvq:cache:{tenant}:{key}:flight  held by the one run computing it (single flight)

Keys of one tenant or model family carry a `{hash tag}`, so the Lua scripts that touch several of them
run on one slot of a Redis Cluster.
"""

from __future__ import annotations

TASK_PREFIX = "qvq:task:"
BATCH_PREFIX = "qvq:batch:"
CACHE_PREFIX = "qvq:cache:"
CANCEL_CHANNEL = "qvq:cancel"
FLOW_PREFIX = "qvq:flow:"
BUDGET_PREFIX = "qvq:budget:"
CALLBACKS_DUE = "qvq:callbacks:due"  # zset: event id -> unix time it is due

PARKED = f"{FLOW_PREFIX}parked"  # zset: task id -> due (unix ms)
PARKED_PAYLOADS = f"{FLOW_PREFIX}parked:payloads"  # hash: task id -> queue message JSON

SWEEP_LOCK = "qvq:sweep:lock"
SWEEP_SUSPECTS = "qvq:sweep:suspects:"  # + kind: hash task id -> when a round first saw it (unix s)
SWEEP_REPAIRED_UNTIL = "qvq:sweep:repaired_until"  # logs of tasks that ended before this were checked
SWEEP_QUEUED_CURSOR = "qvq:sweep:queued_cursor"  # the id the next batch of queued tasks starts after


# -- one task ------------------------------------------------------------------------------------
def channel(task_id: str) -> str:
    """The live pub/sub channel of a task."""
    return f"{TASK_PREFIX}{task_id}"


def log_key(task_id: str) -> str:
    """The replay stream of a task (one field, `event`, holding the event JSON)."""
    return f"{TASK_PREFIX}{task_id}:log"


def seq_key(task_id: str) -> str:
    """The counter that hands out `seq` for a task, atomically with the publish."""
    return f"{TASK_PREFIX}{task_id}:seq"


def cancel_key(task_id: str) -> str:
    """Set when a cancel was asked for; checked by the worker before and during a run."""
    return f"{TASK_PREFIX}{task_id}:cancel"


def lease_key(task_id: str) -> str:
    """Held by the worker running the task (worker/recovery/lease.py), so a redelivery never runs it twice."""
    return f"{TASK_PREFIX}{task_id}:lease"


# -- one batch -----------------------------------------------------------------------------------
def batch_stream_keys(batch_id: str) -> tuple[str, str, str]:
    """A batch's seq counter, replay log and channel (the publish script's keys, as for a task)."""
    base = f"{BATCH_PREFIX}{batch_id}"
    return f"{base}:seq", f"{base}:log", base


def batch_order_key(batch_id: str) -> str:
    """"<round> <done>" of the last batch event published: a later one never goes back (bus/publish.py)."""
    return f"{BATCH_PREFIX}{batch_id}:order"


def batch_tick_key(batch_id: str) -> str:
    """Set for a moment after a batch.progress: progress is published at most a few times a second."""
    return f"{BATCH_PREFIX}{batch_id}:tick"


# -- the result cache ----------------------------------------------------------------------------
def cache_key(tenant: str | None, key: str) -> str:
    """The task whose answer a request (by its content key) has, per tenant (worker/cache.py)."""
    return f"{CACHE_PREFIX}{{{tenant or '-'}}}:{key}"


def cache_flight_key(tenant: str | None, key: str) -> str:
    """Held by the run computing an answer, so identical concurrent jobs make one model call."""
    return f"{cache_key(tenant, key)}:flight"


# -- flow control --------------------------------------------------------------------------------
def requests_key(family: str) -> str:
    return f"{FLOW_PREFIX}model:{{{family}}}:requests"  # zset: grant id -> grant time (ms)


def tokens_key(family: str) -> str:
    return f"{FLOW_PREFIX}model:{{{family}}}:tokens"  # zset: "<id>:<kind>:<tokens>" -> time charged (ms)


def waiters_key(family: str) -> str:
    return f"{FLOW_PREFIX}model:{{{family}}}:waiters"  # zset: ticket -> fair-queue round


def alive_key(family: str) -> str:
    return f"{FLOW_PREFIX}model:{{{family}}}:alive"  # zset: ticket -> expiry (ms)


def rounds_key(family: str) -> str:
    return f"{FLOW_PREFIX}model:{{{family}}}:rounds"  # hash: ":served" -> round served last, tenant -> its last round


def tightened_key(family: str) -> str:
    return f"{FLOW_PREFIX}model:{{{family}}}:tightened"  # set after a 429, expires after its Retry-After


def tenant_slots_key(tenant: str | None) -> str:
    return f"{FLOW_PREFIX}tenant:{{{tenant or '-'}}}:running"  # zset: holder -> lease expiry (ms)


def tenant_requests_key(tenant: str | None) -> str:
    return f"{FLOW_PREFIX}tenant:{{{tenant or '-'}}}:requests"  # zset: grant id -> time (ms)


def waiting_key(task_id: str) -> str:
    return f"{FLOW_PREFIX}waiting:{task_id}"  # JSON {reason, wait_s, since}, while flow control holds it back


def budget_keys(tenant: str | None, day: str, month: str) -> tuple[str, ...]:
    """Per period (the UTC day, then the month): the hash {spent, reserved}, the zset of reservations by
    expiry, and the hash of their amounts."""
    base = f"{BUDGET_PREFIX}{{{tenant or '-'}}}"
    return tuple(f"{base}:{period}{suffix}" for period in (day, month) for suffix in ("", ":res", ":amt"))
