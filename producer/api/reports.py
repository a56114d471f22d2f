"""/v1/usage and /v1/limits: the ledger's report and the model limiter's state.

| method + path | does |
|---|---|
| GET /v1/usage | tokens and cost: ?by=model|tenant|day&since=&until= (&tenant= for admin keys) |
| GET /v1/limits | per model family: requests and tokens this second and minute against the limits, waiters |
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query

from producer.api import schemas
from producer.api.deps import Api, Caller
from producer.api.tasks import query_moment

router = APIRouter(tags=["reports"])


@router.get("/usage", response_model=schemas.UsageReport, responses=schemas.error_responses(400, 401, 403, 422, 503))
async def get_usage(
    api: Api, principal: Caller,
    by: Annotated[Literal["model", "tenant", "day"], Query()] = "model",
    since: Annotated[str | None, Query(description="inclusive; " + schemas.DATETIME_DESCRIPTION,
                                       json_schema_extra={"format": "date-time"})] = None,
    until: Annotated[str | None, Query(description="exclusive; " + schemas.DATETIME_DESCRIPTION,
                                       json_schema_extra={"format": "date-time"})] = None,
    tenant: Annotated[str | None, Query(pattern=schemas.SAFE_ID_PATTERN, description="admin keys only")] = None,
) -> dict[str, Any]:
    """Tokens and cost (CNY, exact decimals) of the caller's tenant, grouped."""
    return await api.run(api.services.tasks.usage, principal, by, since=query_moment(since, "since"),
                         until=query_moment(until, "until"), tenant=tenant)


@router.get("/limits", response_model=schemas.Limits, responses=schemas.error_responses(401, 503))
async def get_limits(api: Api, principal: Caller) -> dict[str, Any]:
    """The fleet's model limiter now (the same for every tenant: it names none)."""
    return await api.run(api.services.tasks.limits)
