"""Secrets out of what we write down: one function for every log line and every stored or published error.

A URL may carry a secret in its query (`?token=...`, a presigned `X-Amz-Signature=...`) or its userinfo,
and a request path may carry an API key (`?api_key=`, also spelled `api%5Fkey`). `redact` drops the
query, fragment and credentials of every URL in a text, and masks the value of every secret-looking
parameter left in it (a request path, a form body). It is I/O-free and idempotent.
"""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit

MASK = "***"
#: A parameter name that may hold a secret (compared after percent-decoding, case-insensitively).
SECRET_NAME = re.compile(r"key|token|secret|sig|pass|pwd|auth|cred|session|cookie|code|jwt|bearer", re.I)
_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]{0,15}://[^\s\"'<>`]+")
_PAIR = re.compile(r"(?P<lead>[?&;])(?P<name>[^=&;#\s]{1,100})=(?P<value>[^&;#\s\"']*)")
_BEARER = re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]+")


def redact(text: str) -> str:
    """`text` with every URL shown without query, fragment or credentials, secret-looking parameters
    masked, and bearer tokens masked."""
    if not text:
        return text
    text = _URL.sub(lambda match: shown_url(match.group(0)), text)
    text = _PAIR.sub(_mask_pair, text)
    return _BEARER.sub(rf"\g<1>{MASK}", text)


def shown_url(url: str) -> str:
    """A URL for people: scheme, host, port and path (with `?...` when a query was dropped), at most 300
    characters; `<invalid URL>` when it does not parse."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<invalid URL>"
    if ":" in host:
        host = f"[{host}]"
    dropped = "?..." if parts.query else ""
    return f"{parts.scheme}://{host}{port}{parts.path}{dropped}"[:300]


def _mask_pair(match: re.Match[str]) -> str:
    if not SECRET_NAME.search(unquote(match.group("name"))):
        return match.group(0)
    return f"{match.group('lead')}{match.group('name')}={MASK}"
