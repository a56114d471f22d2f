"""The HTTP-only clients: producer.client.Client's surface over the HTTP API, needing nothing but
QVQ_API_URL and QVQ_API_KEY (no Redis or database credentials).

    with HttpClient() as client:                       # or HttpClient("https://qvq.example", "key")
        handle = client.submit(images=["s3://bucket/photo.jpg"], prompt="What is wrong here?")
        for event in handle.events():                  # SSE; a dropped connection resumes (Last-Event-ID)
            ...
        record = handle.result(timeout=300)

    async with AsyncHttpClient() as client:            # the same, awaited
        handle = await client.submit(...)
        async for event in handle.events(): ...

    core.py   the I/O-free core: requests built, answers read (records, errors, pages), a followed
              stream's state (EventStreamDecoder: text with U+2028 or U+0085 arrives whole)
    sync.py   HttpClient (httpx.Client)
    aio.py    AsyncHttpClient (httpx.AsyncClient)

Errors (contracts/errors.py, mapped by producer/wire.py): 422/409 -> RequestError/ConflictError (with
`field`), 401/403 -> AuthError, 404 -> NotFoundError (also a KeyError, as Client.get raises), 503 or no
answer -> UnavailableError, others -> ApiCallError; waiting too long -> WaitTimeout (a TimeoutError).
"""

from __future__ import annotations

from producer.http_client.aio import AsyncHttpClient
from producer.http_client.core import HttpTaskRecord
from producer.http_client.sync import HttpClient

__all__ = ["AsyncHttpClient", "HttpClient", "HttpTaskRecord"]
