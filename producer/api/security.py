"""Who is calling, and what a browser may do with our pages.

- `Authenticator`: the tenant of a request comes from its key (contracts.tenants). With no keys
  configured the API is a single-user one: every caller acts as admin, and `LoopbackOnly` refuses
  callers that are not on this machine unless QVQ_API_INSECURE=1 (deny by default).
- `SecurityHeaders`: CSP (the viewer's inline script and style allowed by their hashes only),
  frame-ancestors 'none' / X-Frame-Options, nosniff, no referrer. CORS stays off unless
  QVQ_CORS_ORIGINS names the origins allowed.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import re
from typing import Any

from fastapi import Request
from fastapi.security import APIKeyQuery, HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from contracts.errors import AuthError
from contracts.tenants import ADMIN, KeyRing, Principal

bearer_scheme = HTTPBearer(auto_error=False, scheme_name="bearer",
                           description="`Authorization: Bearer <key>`, a key from QVQ_API_KEYS")
query_key_scheme = APIKeyQuery(name="api_key", auto_error=False, scheme_name="api_key_query",
                               description="The key as ?api_key=, for EventSource (events only)")
CHALLENGE = {"WWW-Authenticate": "Bearer"}


class Authenticator:
    def __init__(self, keys: KeyRing) -> None:
        self.keys = keys

    def principal(self, token: str | None) -> Principal:
        if not self.keys.enabled:
            return ADMIN
        if not token:
            raise AuthError("an API key is required: Authorization: Bearer <key>", code="auth.required",
                            headers=CHALLENGE)
        principal = self.keys.authenticate(token)
        if principal is None:
            raise AuthError("the API key is not valid", code="auth.invalid", headers=CHALLENGE)
        return principal


def bearer_token(credentials: HTTPAuthorizationCredentials | None) -> str | None:
    return credentials.credentials.strip() if credentials is not None else None


def authenticator(request: Request) -> Authenticator:
    return request.app.state.authenticator  # type: ignore[no-any-return]


# -- deny by default ---------------------------------------------------------------------------
def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


class LoopbackOnly:
    """An API without keys answers only callers on this machine."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not is_loopback((scope.get("client") or ("",))[0]):
            await _send_json(send, 403, {"error": {
                "code": "auth.forbidden", "field": None,
                "message": "this API has no keys (QVQ_API_KEYS) and answers only on loopback"}})
            return
        await self.app(scope, receive, send)


async def _send_json(send: Send, status: int, body: dict[str, Any]) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


# -- browser hardening -------------------------------------------------------------------------
def _inline_hashes(html: str, tag: str) -> list[str]:
    blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
    return [f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks]


def page_policy(html: str) -> str:
    """The web viewer's Content-Security-Policy: its inline script and style by their hashes only."""
    return "; ".join([
        "default-src 'none'", f"script-src {' '.join(_inline_hashes(html, 'script'))}",
        f"style-src {' '.join(_inline_hashes(html, 'style'))}", "img-src 'self' data: blob:",
        "connect-src 'self'", "form-action 'self'", "base-uri 'none'", "frame-ancestors 'none'",
    ])


API_POLICY = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'"
#: FastAPI's /docs page loads Swagger UI from its CDN and starts it with an inline script.
DOCS_POLICY = ("default-src 'none'; script-src https://cdn.jsdelivr.net 'unsafe-inline'; "
               "style-src https://cdn.jsdelivr.net; img-src 'self' data: https://fastapi.tiangolo.com; "
               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'")


class SecurityHeaders:
    def __init__(self, app: ASGIApp, *, page_csp: str) -> None:
        self.app = app
        self.page_csp = page_csp

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        policy = self.page_csp if path == "/" else DOCS_POLICY if path.startswith("/docs") else API_POLICY

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(b"content-security-policy", policy.encode()), (b"x-frame-options", b"DENY"),
                            (b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
                            (b"cross-origin-opener-policy", b"same-origin")]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)
