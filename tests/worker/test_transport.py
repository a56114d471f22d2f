"""The model's network backend (worker/stream/transport.py) under httpx, on loopback: plain and TLS
requests, a stalled body that trips the read timeout, a refused connection, a peer that closes mid-body."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from pathlib import Path

import httpx
import pytest

from worker.stream.transport import BodyFeed, model_transport

LIMITS = httpx.Limits(max_connections=10, max_keepalive_connections=10)


async def _serve(handler: object, ssl_context: ssl.SSLContext | None = None) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=ssl_context)  # type: ignore[arg-type]
    return server, server.sockets[0].getsockname()[1]


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: bytes = b"hello",
                  stall: bool = False, cut: bool = False) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (len(body) + (10 if stall or cut else 0)) + body)
    await writer.drain()
    if stall:
        await asyncio.sleep(5)
    writer.close()


def test_a_request_and_a_large_body_arrive_whole() -> None:
    body = bytes(range(256)) * 4096  # 1 MiB: past the backend's high-water mark

    async def scenario() -> bytes:
        server, port = await _serve(lambda r, w: _answer(r, w, body))
        async with server, httpx.AsyncClient(transport=model_transport(LIMITS)) as client:
            response = await client.get(f"http://127.0.0.1:{port}/x")
            return response.content

    assert asyncio.run(scenario()) == body


def test_a_stalled_body_trips_the_read_timeout() -> None:
    async def scenario() -> None:
        server, port = await _serve(lambda r, w: _answer(r, w, stall=True))
        async with server, httpx.AsyncClient(transport=model_transport(LIMITS), timeout=httpx.Timeout(0.3)) as client:
            await client.get(f"http://127.0.0.1:{port}/x")

    with pytest.raises(httpx.ReadTimeout):
        asyncio.run(scenario())


def test_a_body_cut_short_is_a_transport_error_and_a_refused_port_a_connect_error() -> None:
    async def cut() -> None:
        server, port = await _serve(lambda r, w: _answer(r, w, cut=True))
        async with server, httpx.AsyncClient(transport=model_transport(LIMITS)) as client:
            await client.get(f"http://127.0.0.1:{port}/x")

    async def refused() -> None:
        server, port = await _serve(lambda r, w: _answer(r, w))
        server.close()
        await server.wait_closed()
        async with httpx.AsyncClient(transport=model_transport(LIMITS)) as client:
            await client.get(f"http://127.0.0.1:{port}/x")

    with pytest.raises(httpx.RemoteProtocolError):
        asyncio.run(cut())
    with pytest.raises(httpx.ConnectError):
        asyncio.run(refused())


def test_tls_is_verified_and_works(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    try:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                        "/CN=localhost", "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key),
                        "-out", str(cert)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("openssl is not available to make a test certificate")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    trusted = ssl.create_default_context(cafile=str(cert))

    async def scenario(verify: ssl.SSLContext | bool) -> bytes:
        server, port = await _serve(lambda r, w: _answer(r, w, b"secret"), server_ctx)
        async with server, httpx.AsyncClient(transport=model_transport(LIMITS, verify=verify)) as client:
            return (await client.get(f"https://localhost:{port}/x")).content

    assert asyncio.run(scenario(trusted)) == b"secret"
    with pytest.raises(httpx.ConnectError):  # not trusted: refused, as by httpx's own backend
        asyncio.run(scenario(True))


# -- the model's body, decoded where it arrives --------------------------------------------------------
def _feed(pieces: list[bytes], **framing: object) -> tuple[bytes, list[BaseException | None]]:
    got: list[bytes] = []
    ends: list[BaseException | None] = []
    feed = BodyFeed(got.append, ends.append, **framing)  # type: ignore[arg-type]
    for piece in pieces:
        feed.feed(piece)
    return b"".join(got), ends


CHUNKED = b"5\r\nhello\r\n1;ext=1\r\n \r\nB\r\nworld, done\r\n0\r\nX-Trailer: 1\r\n\r\n"


@pytest.mark.parametrize("size", [1, 2, 3, 7, len(CHUNKED)])
def test_a_chunked_body_split_anywhere_decodes_whole(size: int) -> None:
    pieces = [CHUNKED[i:i + size] for i in range(0, len(CHUNKED), size)]
    body, ends = _feed(pieces, chunked=True, length=None)
    assert body == b"hello world, done" and ends == [None]


def test_a_length_body_ends_at_its_length_and_a_close_body_at_the_close() -> None:
    body, ends = _feed([b"abc", b"defXYZ"], chunked=False, length=6)
    assert body == b"abcdef" and ends == [None]
    got: list[bytes] = []
    ends = []
    feed = BodyFeed(got.append, ends.append, chunked=False, length=None)
    feed.feed(b"all of it")
    feed.lost(None)
    assert got == [b"all of it"] and ends == [None]


def test_a_bad_or_cut_chunked_body_ends_with_a_protocol_error() -> None:
    _, ends = _feed([b"zz\r\nhello\r\n"], chunked=True, length=None)
    assert len(ends) == 1 and isinstance(ends[0], httpx.RemoteProtocolError)
    feed = BodyFeed(lambda data: None, ends.append, chunked=True, length=None)
    feed.feed(b"5\r\nhel")
    feed.lost(None)
    assert isinstance(ends[-1], httpx.RemoteProtocolError) and len(ends) == 2


def test_only_a_chunked_body_that_ended_whole_with_nothing_after_it_is_reusable() -> None:
    def fed(data: bytes, **framing: object) -> BodyFeed:
        feed = BodyFeed(lambda piece: None, lambda error: None, **framing)  # type: ignore[arg-type]
        feed.feed(data)
        return feed

    assert fed(CHUNKED, chunked=True, length=None).reusable
    assert not fed(CHUNKED[:-2], chunked=True, length=None).reusable  # the trailer's blank line is missing
    assert not fed(CHUNKED + b"HTTP/1.1 200 OK\r\n", chunked=True, length=None).reusable  # bytes past the body
    assert not fed(b"abcdef", chunked=False, length=6).reusable  # whole, but h11 cannot be handed a length body
