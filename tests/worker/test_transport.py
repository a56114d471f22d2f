"""The model's network backend (worker/stream/transport.py) under httpx, on loopback: plain and TLS
requests, a stalled body that trips the read timeout, a refused connection, a peer that closes mid-body."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from pathlib import Path

import httpx
import pytest

from worker.stream.transport import model_transport

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
