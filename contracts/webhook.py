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
    try:
        return _verify(body, header, secret, tolerance_s, time.time() if now is None else now)
    except (ValueError, TypeError, KeyError, UnicodeError, OverflowError):
        return False


def _verify(body: bytes, header: str, secret: str, tolerance_s: int, now: float) -> bool:
    if not (isinstance(body, bytes | bytearray) and isinstance(header, str) and isinstance(secret, str)):
        return False
    if len(header) > MAX_HEADER_CHARS or not header.isascii():
        return False
    parts = dict(item.split("=", 1) for item in header.split(","))
    stamp, given = parts["t"], parts["v1"]
    if not (stamp.isdigit() and len(given) == 64):
        return False
    moment = int(stamp)
    if abs(now - moment) > tolerance_s:
        return False
    expected = sign(bytes(body), secret, moment).split("v1=", 1)[1]
    return hmac.compare_digest(expected, given)
