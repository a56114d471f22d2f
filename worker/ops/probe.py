"""Whether the model endpoint a worker is about to call can be used: checked once, at start.

A worker pointed at DashScope without a key would fail every task it takes (and look healthy doing
so): it refuses to start. An endpoint that does not answer `GET {base_url}/models` is logged as a
warning; the worker still starts (the endpoint may come back, and retries cover a short outage).

The probe is a coroutine on the worker's loop, started at worker_ready and not waited for: the worker
consumes at once, however slowly the endpoint answers, and the whole probe (connection, headers and
body) has a total deadline of PROBE_TIMEOUT_S.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlparse

import httpx

from contracts.logging import get_logger
from contracts.settings import Settings

log = get_logger(__name__)

PROBE_TIMEOUT_S = 3.0
DASHSCOPE_HOST_SUFFIX = ".aliyuncs.com"


def missing_key(settings: Settings) -> str | None:
    """Why this worker cannot call its endpoint at all, or None."""
    host = urlparse(settings.base_url).hostname or ""
    if settings.dashscope_api_key or not host.endswith(DASHSCOPE_HOST_SUFFIX):
        return None
    return ("QVQ_BASE_URL is Alibaba's DashScope service but DASHSCOPE_API_KEY is unset: set the key, or point "
            "QVQ_BASE_URL at an emulator (`qvq emulator`, then QVQ_BASE_URL=http://127.0.0.1:8001/v1)")


async def probe(settings: Settings, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when `GET {base_url}/models` answers 2xx within `timeout` in all, else what went wrong (no
    address, no key in it)."""
    headers = {"Authorization": f"Bearer {settings.dashscope_api_key}"} if settings.dashscope_api_key else {}
    url = settings.base_url.rstrip("/") + "/models"
    try:
        async with asyncio.timeout(timeout), httpx.AsyncClient(timeout=timeout, trust_env=False) as client:
            response = await client.get(url, headers=headers)
    except (TimeoutError, httpx.TimeoutException):
        return f"no answer within {timeout:g} s"
    except httpx.HTTPError as exc:
        return f"unreachable ({type(exc).__name__})"
    if response.status_code in (401, 403):
        return f"HTTP {response.status_code}: the key was refused (check DASHSCOPE_API_KEY)"
    if response.status_code >= 400:
        return f"HTTP {response.status_code}"
    return None


async def report(settings: Settings) -> None:
    """Probe, and log a warning when the endpoint is not usable (what worker_ready starts)."""
    problem = await probe(settings)
    if problem:
        log.warning("worker.model_endpoint_unusable", model_endpoint=settings.base_url, problem=problem,
                    hint="tasks fail or retry until the endpoint answers GET /models")
