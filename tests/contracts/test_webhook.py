"""Callback signatures: what a receiver checks, and that checking never raises on hostile input."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from contracts.webhook import parse_header, sign, verified_digest, verify

BODY = b'{"task_id":"t1","type":"task.completed"}'


def test_a_fresh_signature_verifies_and_an_old_or_tampered_one_does_not() -> None:
    assert verify(BODY, sign(BODY, "k", timestamp=1000), "k", now=1100)
    assert not verify(BODY, sign(BODY, "k", timestamp=1000), "k", now=2000)
    assert not verify(BODY + b" ", sign(BODY, "k", timestamp=1000), "k", now=1000)
    assert not verify(BODY, sign(BODY, "other", timestamp=1000), "k", now=1000)


def test_hostile_headers_are_refused_without_raising() -> None:
    good = sign(BODY, "k", timestamp=1000)
    for header in ("", "garbage", "t=,v1=", "t=1000", "v1=abc", "t=1000,v1=é", "t=é,v1=00",
                   "t=1000,v1=" + "é" * 64, "t=١٠٠٠,v1=" + good.split("v1=")[1], "t=-1000,v1=00",
                   "t=1" + "0" * 400 + ",v1=00", good + ",x", good.replace("t=", "t= "), "\ud800", good * 1000):
        assert verify(BODY, header, "k", now=1000) is False, header


def test_wrong_types_are_refused_without_raising() -> None:
    good = sign(BODY, "k", timestamp=1000)
    bad: list[tuple[Any, Any, Any]] = [(None, good, "k"), (BODY, None, "k"), (BODY, good, None),
                                       ("text body", good, "k"), (BODY, good.encode(), "k"), (BODY, good, "\ud800")]
    for body, header, secret in bad:
        assert verify(body, header, secret, now=1000) is False


@given(body=st.binary(max_size=2000), header=st.text(max_size=500), secret=st.text(max_size=100),
       now=st.floats(allow_nan=False, allow_infinity=False, min_value=-1e12, max_value=1e12))
def test_verify_never_raises(body: bytes, header: str, secret: str, now: float) -> None:
    assert verify(body, header, secret, now=now) in (True, False)


@given(body=st.binary(max_size=2000), header=st.from_regex(r"\At=[0-9é٣]{0,14},v1=[0-9a-fé]{0,70}(,.*)?\Z"),
       secret=st.text(max_size=100))
def test_verify_never_raises_on_near_miss_headers(body: bytes, header: str, secret: str) -> None:
    assert verify(body, header, secret, now=1000) in (True, False)


@given(body=st.binary(max_size=2000), secret=st.text(max_size=100), stamp=st.integers(0, 2**40))
def test_every_signature_made_by_sign_verifies(body: bytes, secret: str, stamp: int) -> None:
    assert verify(body, sign(body, secret, timestamp=stamp), secret, now=stamp)


def test_the_header_is_read_strictly() -> None:
    body = b'{"x": 1}'
    header = sign(body, "s" * 32)
    stamp, digest = header.split(",")
    assert parse_header(header) == (stamp[2:], [digest[3:]])
    assert verified_digest(body, header, "s" * 32) == digest[3:]
    for bad in (header + ",zv1=deadbeef", header + ",x=v1=cafe", header + "," + stamp, header + ",v1=abc",
                digest, stamp, header.upper(), header + ",", f"{stamp},v1={digest[3:].upper()}"):
        assert parse_header(bad) is None and verified_digest(body, bad, "s" * 32) is None, bad
    assert verified_digest(body, f"{stamp},v1={'0' * 64},{digest}", "s" * 32) == digest[3:]
