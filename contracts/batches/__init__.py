"""Batches: many objects, one question (README, Batches). What lives here:

    request.py   the batch request, validated once (BatchRequest), and each item's job request
    estimate.py  image tokens from each object's first bytes (a ranged read) and the cost range
    progress.py  batch.progress and batch.completed: the tally, at most a few a second, the completion
                 claimed once per round, and its callback
    follow.py    following a batch's log (replay and live in one XREAD), I/O-free

The service (producer/service/batches.py) lists, estimates and queues; the worker reports each item's end.
"""
