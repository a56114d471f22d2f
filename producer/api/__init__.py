"""The HTTP API: what lives here.

    app.py            create_app: the routers, the middleware, the lifespan that builds the services
    deps.py           what routes depend on: the app's services and the principal of the request's key
    errors.py         every error answered in one shape (producer/wire.py's status table)
    responses.py      the JSON response class: always writable (a stored lone surrogate becomes U+FFFD)
    bodies.py         request bodies read within their limits (JSON, multipart)
    tasks.py          /v1/tasks, /v1/conversations
    uploads.py        /v1/uploads, /v1/tasks/upload
    events.py         /v1/tasks/{id}/events (Server-Sent Events)
    reports.py        /v1/usage, /v1/limits
    webhooks.py       /v1/webhooks/jobs (signed), /v1/webhooks/objects (object-store notifications)
    notifications.py  object-store notifications read into one shape (I/O-free)
    fanout.py         one Redis pub/sub connection for every event stream of the process
    ops.py            /livez, /readyz, /healthz, /metrics
    security.py       API keys, loopback-only without keys, browser headers
    schemas.py        request and response shapes (OpenAPI)
    openapi.py        the OpenAPI document
    page.py           the web viewer at /

Routes call producer/service/; nothing here is imported by the service layer or the clients.
"""

from __future__ import annotations

from producer.api.app import create_app

__all__ = ["create_app"]
