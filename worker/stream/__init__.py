"""The model call and its text on its way out: what lives here.

    model.py       the QVQ call (openai SDK, streamed), errors mapped to ours
    chunks.py      a lean reader of the model's server-sent events
    coalesce.py    deltas coalesced (every QVQ_COALESCE_MS or QVQ_COALESCE_CHARS)
    publisher.py   events group-committed to Redis, many per round trip
"""
