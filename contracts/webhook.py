"""Signed callbacks: how the worker signs the terminal event it POSTs to a job's callback_url, and how
a receiver checks it.

Header `X-Qvq-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>" with QVQ_WEBHOOK_SECRET>`.
Signing the timestamp with the body lets a receiver refuse replays older than its tolerance.
"""

from __future__ import annotations

import hashlib
import hmac
import time

SIGNATURE_HEADER = "X-Qvq-Signature"
DEFAULT_TOLERANCE_S = 300
MAX_HEADER_CHARS = 256


def sign(body: bytes, secret: str, timestamp: int | None = None) -> str:
    moment = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(secret.encode(), f"{moment}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={moment},v1={digest}"


def verify(body: bytes, header: str, secret: str, *, tolerance_s: int = DEFAULT_TOLERANCE_S,
           now: float | None = None) -> bool:
    """True when the header is a valid signature of body made within tolerance_s seconds; never raises:
    any malformed input (wrong types, non-ASCII, garbage, huge) is simply not a valid signature."""
    return verified_digest(body, header, secret, tolerance_s=tolerance_s, now=now) is not None


def verified_digest(body: bytes, header: str, secret: str, *, tolerance_s: int = DEFAULT_TOLERANCE_S,
                    now: float | None = None) -> str | None:
    """The `v1` digest of the header that verifies body with secret (what identifies this signed request,
    e.g. for replay protection), or None. The header is read strictly: exactly one `t`, one or more `v1`
    (several during a secret rotation) and nothing else, each `name=value` once split on commas."""
    try:
        return _verified(body, header, secret, tolerance_s, time.time() if now is None else now)
    except (ValueError, TypeError, KeyError, UnicodeError, OverflowError):
        return None


def parse_header(header: str) -> tuple[str, list[str]] | None:
    """(t, [v1, ...]) of a well-formed signature header, or None."""
    if not isinstance(header, str) or len(header) > MAX_HEADER_CHARS or not header.isascii():
        return None
    stamps: list[str] = []
    digests: list[str] = []
    for item in header.split(","):
        name, sep, value = item.strip().partition("=")
        if not sep or name not in ("t", "v1"):
            return None
        (stamps if name == "t" else digests).append(value)
    if len(stamps) != 1 or not digests or not stamps[0].isdigit():
        return None
    if not all(len(digest) == 64 and all(ch in "0123456789abcdef" for ch in digest) for digest in digests):
        return None
    return stamps[0], digests


def _verified(body: bytes, header: str, secret: str, tolerance_s: int, now: float) -> str | None:
    if not (isinstance(body, bytes | bytearray) and isinstance(secret, str)):
        return None
    parsed = parse_header(header)
    if parsed is None:
        return None
    stamp, given = parsed
    moment = int(stamp)
    if abs(now - moment) > tolerance_s:
        return None
    expected = sign(bytes(body), secret, moment).split("v1=", 1)[1]
    return next((digest for digest in given if hmac.compare_digest(expected, digest)), None)
