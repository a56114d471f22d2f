"""A lean network backend for the model's HTTP connections: httpcore over plain asyncio transports.

httpx (through httpcore) reads an async stream with anyio: each read enters a cancel scope and a
`fail_after` block, and wakes the reading task through an anyio event. With thousands of chunks a
second in one process that machinery was the largest Python cost of a chunk after the event loop itself
(py-spy, bench/RESULTS.md). Here a read takes what the protocol already buffered, or waits on one
future with one timer for the read timeout; everything above it (HTTP/1.1 by h11, the pool, TLS
settings, httpx's requests and errors, the SDK) is unchanged: `model_transport()` is httpx's own
AsyncHTTPTransport whose connection pool is given this backend.

Errors are httpcore's (ConnectError, ConnectTimeout, ReadError, ReadTimeout, WriteError), which httpx
maps to its own as with any backend.

The model's stream goes further (worker/stream/chunks.py): h11 reads only the response's head, and the
body is decoded by `BodyFeed` right where the bytes arrive (`data_received`), so a chunk costs no await,
no async generator and no timer of its own. When such a chunked body ended whole, `LoopStream.release_body`
hands h11 the body's last chunk, so h11 sees the response end and the pool keeps the connection for the
next model call (no new TCP connection and TLS handshake per call). A body that did not end whole (a
cancel, a stop, an error) closes its connection, as httpcore does.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable, Iterable
from typing import Any

import httpcore
import httpx

HIGH_WATER = 256 * 1024  # bytes buffered before the socket is paused (the reader is behind)


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.buffer = bytearray()
        self.eof = False
        self.error: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.transport: asyncio.Transport | None = None
        self.paused = False
        self.drain_waiter: asyncio.Future[None] | None = None
        self.writing_paused = False
        self.sink: BodyFeed | None = None  # the body goes straight here (LoopStream.feed_body)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.sink is not None:
            self.sink.feed(data)
            return
        self.buffer += data
        if len(self.buffer) > HIGH_WATER and self.transport is not None and not self.paused:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.error = exc
        self._wake()
        if self.sink is not None:
            self.sink.lost(exc)
        if self.drain_waiter is not None and not self.drain_waiter.done():
            self.drain_waiter.set_result(None)

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.drain_waiter is not None and not self.drain_waiter.done():
            self.drain_waiter.set_result(None)

    def take(self, max_bytes: int) -> bytes:
        data = bytes(self.buffer[:max_bytes])
        del self.buffer[:max_bytes]
        if self.paused and len(self.buffer) < HIGH_WATER // 2 and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return data

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


class BodyFeed:
    """A response body decoded as its bytes arrive, with no await per piece: chunked transfer coding,
    a Content-Length, or up to the connection's close. `on_data` gets the body's bytes; `on_end` once,
    with None (the body ended) or the httpx error that ended it."""

    MAX_SIZE_LINE = 1024

    def __init__(self, on_data: Callable[[bytes], None], on_end: Callable[[BaseException | None], None], *,
                 chunked: bool, length: int | None) -> None:
        self._on_data = on_data
        self._on_end = on_end
        self._chunked = chunked
        self._left = length  # bytes of the body (or of the current chunk, when chunked)
        self._state = "size" if chunked else "data"
        self._buffer = bytearray()
        self.ended = False
        self.complete = False  # the body's framing ended (its last chunk, or its length): not cut short
        self._steps = {"size": self._size_line, "data": self._data, "crlf": self._crlf, "trailer": self._trailer}

    def feed(self, data: bytes) -> None:
        if self.ended:
            return
        if not self._chunked:
            self._feed_plain(data)
            return
        self._buffer += data
        try:
            self._decode_chunked()
        except ValueError as exc:
            self.end(httpx.RemoteProtocolError(f"bad chunked body: {exc}"))

    def lost(self, exc: BaseException | None) -> None:
        if self._chunked or self._left is not None:
            self.end(httpx.RemoteProtocolError("the connection closed before the body ended"))
        else:
            self.end(httpx.ReadError(str(exc)) if exc else None)

    def end(self, error: BaseException | None) -> None:
        if not self.ended:
            self.ended = True
            self._on_end(error)

    def _feed_plain(self, data: bytes) -> None:
        if self._left is not None:
            data = data[:self._left]
            self._left -= len(data)
        if data:
            self._on_data(data)
        if self._left == 0:
            self.complete = True
            self.end(None)

    @property
    def reusable(self) -> bool:
        """A chunked body that ended whole, with no byte after it: its connection can serve again."""
        return self.complete and self._chunked and not self._buffer

    def _decode_chunked(self) -> None:
        while not self.ended and self._steps[self._state]():
            pass

    def _size_line(self) -> bool:
        end = self._buffer.find(b"\r\n")
        if end < 0:
            if len(self._buffer) > self.MAX_SIZE_LINE:
                raise ValueError("chunk size line too long")
            return False
        size = int(bytes(self._buffer[:end]).split(b";", 1)[0].strip(), 16)
        del self._buffer[:end + 2]
        self._left, self._state = size, ("data" if size else "trailer")
        return True

    def _data(self) -> bool:
        if not self._buffer:
            return False
        left = self._left or 0
        piece = bytes(self._buffer[:left])
        del self._buffer[:left]
        self._left = left - len(piece)
        if self._left == 0:
            self._state = "crlf"
        self._on_data(piece)
        return True

    def _crlf(self) -> bool:
        if len(self._buffer) < 2:
            return False
        if self._buffer[:2] != b"\r\n":
            raise ValueError("no CRLF after a chunk")
        del self._buffer[:2]
        self._state = "size"
        return True

    def _trailer(self) -> bool:
        end = self._buffer.find(b"\r\n")
        if end < 0:
            return False
        line = bytes(self._buffer[:end])
        del self._buffer[:end + 2]
        if not line:
            self.complete = True
            self.end(None)
        return True


def _timed_out(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(httpcore.ReadTimeout("no data within the read timeout"))


class LoopStream(httpcore.AsyncNetworkStream):
    """One connection. While a response's head is awaited (from a request's write on), a read returns
    no byte past the blank line that ends the head: the body stays here, so `feed_body` can take it
    over from h11 (the model's stream), or h11 reads it as usual (everything else)."""

    def __init__(self, transport: asyncio.Transport, protocol: _Protocol) -> None:
        self._transport = transport
        self._protocol = protocol
        self._head = False

    def feed_body(self, sink: BodyFeed) -> None:
        """From now on the connection's bytes go to `sink` as they arrive (what was buffered first);
        the connection is not reused afterwards (h11 never saw the body)."""
        protocol = self._protocol
        protocol.sink = sink
        if protocol.paused and protocol.transport is not None:
            protocol.paused = False
            protocol.transport.resume_reading()
        if protocol.buffer:
            data = bytes(protocol.buffer)
            protocol.buffer.clear()
            sink.feed(data)
        if protocol.eof:
            sink.lost(protocol.error)

    def release_body(self, sink: BodyFeed) -> bool:
        """After `sink` decoded a chunked body whole: the bytes go to h11 again, starting with a last
        chunk (`0 CRLF CRLF`) for h11 to read, so it sees the response end and the pool keeps the
        connection. False (nothing changed) for a body that did not end whole."""
        protocol = self._protocol
        if protocol.sink is not sink or not sink.reusable or protocol.eof or protocol.buffer:
            return False
        protocol.sink = None
        protocol.buffer += b"0\r\n\r\n"
        return True

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        protocol = self._protocol
        if not protocol.buffer and not protocol.eof:
            loop = asyncio.get_running_loop()
            waiter = protocol.waiter = loop.create_future()
            timer = loop.call_later(timeout, _timed_out, waiter) if timeout is not None else None
            try:
                await waiter
            finally:
                protocol.waiter = None
                if timer is not None:
                    timer.cancel()
        if protocol.buffer:
            if self._head:
                end = protocol.buffer.find(b"\r\n\r\n")
                if end >= 0 and end + 4 <= max_bytes:
                    self._head = False
                    return protocol.take(end + 4)
            return protocol.take(max_bytes)
        if protocol.error is not None:
            raise httpcore.ReadError(str(protocol.error)) from protocol.error
        return b""

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        if self._transport.is_closing():
            raise httpcore.WriteError("the connection is closed")
        self._head = True  # a request: its response's head comes next
        self._transport.write(buffer)
        protocol = self._protocol
        if protocol.writing_paused:
            protocol.drain_waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(timeout):
                    await protocol.drain_waiter
            except TimeoutError as exc:
                raise httpcore.WriteTimeout("the connection did not take the request in time") from exc

    async def aclose(self) -> None:
        self._transport.close()

    async def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                        timeout: float | None = None) -> LoopStream:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                transport = await loop.start_tls(self._transport, self._protocol, ssl_context,
                                                 server_hostname=server_hostname)
        except TimeoutError as exc:
            self._transport.close()
            raise httpcore.ConnectTimeout("the TLS handshake did not finish in time") from exc
        except (OSError, ssl.SSLError) as exc:
            self._transport.close()
            raise httpcore.ConnectError(str(exc)) from exc
        if transport is None:
            raise httpcore.ConnectError("the TLS handshake failed")
        self._protocol.transport = transport
        return LoopStream(transport, self._protocol)

    def get_extra_info(self, info: str) -> Any:
        if info == "ssl_object":
            return self._transport.get_extra_info("ssl_object")
        if info == "client_addr":
            return self._transport.get_extra_info("sockname")
        if info == "server_addr":
            return self._transport.get_extra_info("peername")
        if info == "socket":
            return self._transport.get_extra_info("socket")
        if info == "is_readable":
            return self._protocol.eof or bool(self._protocol.buffer)
        return None


class LoopBackend(httpcore.AsyncNetworkBackend):
    async def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                          socket_options: Iterable[Any] | None = None) -> LoopStream:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                transport, protocol = await loop.create_connection(
                    _Protocol, host, port, local_addr=(local_address, 0) if local_address else None)
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(f"no connection to {host}:{port} in time") from exc
        except OSError as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for option in socket_options or ():
                sock.setsockopt(*option)
        return LoopStream(transport, protocol)

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Iterable[Any] | None = None) -> LoopStream:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                transport, protocol = await loop.create_unix_connection(_Protocol, path)
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(f"no connection to {path} in time") from exc
        except OSError as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        return LoopStream(transport, protocol)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def model_transport(limits: httpx.Limits, verify: ssl.SSLContext | bool = True) -> httpx.AsyncHTTPTransport:
    """httpx's transport (TLS verification, HTTP/1.1, pool limits as given) on LoopBackend."""
    transport = httpx.AsyncHTTPTransport(limits=limits, verify=verify)
    old = transport._pool
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=old._ssl_context, max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections, keepalive_expiry=limits.keepalive_expiry,
        http1=True, http2=False, network_backend=LoopBackend())
    return transport
