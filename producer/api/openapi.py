"""The OpenAPI document: FastAPI's, with the job request's schema and the one error shape FastAPI cannot infer."""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute

from producer.api import schemas
from producer.api.notifications import NOTIFICATION_SCHEMAS

DESCRIPTION = "Visual-reasoning jobs on Alibaba QVQ: submit, watch live, get the result."


def operation_id(route: APIRoute) -> str:
    """An operation's id is its route function's name (`submit_task`, `get_task`): what a generated
    client names its method."""
    return route.name


def document(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes, description=DESCRIPTION)
    components = doc.setdefault("components", {}).setdefault("schemas", {})
    for model in (schemas.NewJobBody, schemas.FollowUpBody, schemas.BatchRequestBody, schemas.ErrorBody):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(schema.pop("$defs", {}))
        components[model.__name__] = schema
    components["JobRequestBody"] = schemas.JOB_BODY_SCHEMA
    components.update(schemas.metadata_schemas())
    components.update(NOTIFICATION_SCHEMAS)
    for body in (schemas.NewJobBody, schemas.FollowUpBody):
        components[body.__name__]["properties"]["metadata"] = schemas.METADATA_PROPERTY
    _name_patterns_as_property_names(components)
    _replace_fastapi_errors(doc)
    _declare_server_errors(doc)
    doc["components"].setdefault("securitySchemes", {})["webhook_signature"] = {
        "type": "apiKey", "in": "header", "name": "X-Qvq-Signature",
        "description": 't=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>"> with QVQ_WEBHOOK_SECRET(S)'}
    signed = doc.get("paths", {}).get("/v1/webhooks/jobs", {}).get("post")
    if signed is not None:
        signed["security"] = [{"webhook_signature": []}]
    app.openapi_schema = doc
    return doc


def _replace_fastapi_errors(doc: dict[str, Any]) -> None:
    """FastAPI documents its own {"detail": [...]} 422 on routes with parameters; this API answers
    every error as ErrorBody instead."""
    error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}}
    for path in doc.get("paths", {}).values():
        for operation in path.values():
            response = operation.get("responses", {}).get("422")
            if response and "HTTPValidationError" in json.dumps(response):
                operation["responses"]["422"] = {"description": "a field is invalid (request.invalid)", **error}
    for name in ("HTTPValidationError", "ValidationError"):
        doc.get("components", {}).get("schemas", {}).pop(name, None)


def _declare_server_errors(doc: dict[str, Any]) -> None:
    """Every operation may answer 500 (`internal`, as ErrorBody); /readyz documents its 503 body."""
    error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}}
    for path in doc.get("paths", {}).values():
        for operation in path.values():
            operation.setdefault("responses", {}).setdefault(
                "500", {"description": "an internal error (internal); nothing internal is shown", **error})
    ready = doc.get("paths", {}).get("/readyz", {}).get("get")
    if ready is not None:
        checks = {"type": "object", "required": ["status", "redis", "database"], "properties": {
            "status": {"type": "string", "enum": ["ready", "not_ready"]},
            "redis": {"type": "boolean"}, "database": {"type": "boolean"}}}
        for status, description in (("200", "Redis and the database answer"),
                                    ("503", "Redis or the database does not answer (false)")):
            ready["responses"][status] = {"description": description,
                                          "content": {"application/json": {"schema": checks}}}


def _name_patterns_as_property_names(node: Any) -> None:
    """Pydantic writes a dict with constrained keys as `patternProperties`, which leaves every other key
    allowed; `propertyNames` + `additionalProperties` says what the API checks (no key outside it)."""
    if isinstance(node, list):
        for item in node:
            _name_patterns_as_property_names(item)
        return
    if not isinstance(node, dict):
        return
    patterns = node.get("patternProperties")
    if isinstance(patterns, dict) and len(patterns) == 1 and "additionalProperties" not in node:
        ((pattern, value),) = patterns.items()
        del node["patternProperties"]
        node["propertyNames"] = {"pattern": pattern}
        node["additionalProperties"] = value
    for child in node.values():
        _name_patterns_as_property_names(child)
