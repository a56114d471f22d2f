"""The producer: everything that submits and watches tasks. What lives here.

    client.py       Client: the Python client over Redis and the database (acts as an admin)
    aio.py          AsyncClient: the same for asyncio programs
    http_client/    HttpClient, AsyncHttpClient: the same over the HTTP API (only a URL and a key)
    protocol.py     TaskClient / AsyncTaskClient: what every client offers; TaskHandle
    results.py      waiting for a task's result, once for every client
    service/        the operations under every way in (submit, get, cancel, retry, list, usage, uploads,
                    callbacks), each checked against the principal it acts for
    api/            the HTTP API (FastAPI): routes over service/, webhooks, SSE, the web viewer
    cli/            the `qvq` command
    local/          a throwaway Redis server and the worker's command line
    wire.py         how errors travel over HTTP, both ways
    moments.py      points in time as callers write them

The producer never imports worker code; `qvq worker` loads it when it runs.
"""
