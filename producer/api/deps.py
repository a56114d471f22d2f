"""What every route depends on: the app's services (built by the lifespan) and the principal of the
request's key (contracts/tenants.py; producer/api/security.py checks it)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials
from starlette.concurrency import run_in_threadpool

from contracts.settings import Settings
from contracts.tenants import Principal
from producer.aio import AsyncClient
from producer.api.fanout import FanoutHub
from producer.api.security import authenticator, bearer_scheme, bearer_token, query_key_scheme
from producer.service import Services

T = TypeVar("T")


@dataclass
class AppServices:
    """What the routes use; built and closed by the app's lifespan (producer/api/app.py)."""

    settings: Settings
    services: Services
    aclient: AsyncClient  # rows read for the event streams, in a thread
    fanout: FanoutHub  # one pub/sub connection for every event stream of this process
    keepalive_s: float

    async def run(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """A short blocking call (the store, Redis) in the server's thread pool."""
        return await run_in_threadpool(call, *args, **kwargs)


def app_services(request: Request) -> AppServices:
    return request.app.state.services  # type: ignore[no-any-return]


async def caller(request: Request,
                 credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer_scheme)]) -> Principal:
    """The principal of the request's bearer key."""
    return authenticator(request).principal(bearer_token(credentials))


async def viewer(request: Request,
                 credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer_scheme)],
                 api_key: Annotated[str | None, Security(query_key_scheme)] = None) -> Principal:
    """As `caller`, also accepting ?api_key= (EventSource cannot send headers)."""
    return authenticator(request).principal(bearer_token(credentials) or api_key)


Api = Annotated[AppServices, Depends(app_services)]
Caller = Annotated[Principal, Depends(caller)]
Viewer = Annotated[Principal, Depends(viewer)]
