"""A loopback TCP proxy for tests, on its own thread and event loop: every connection it accepts is piped
to `target` (http://127.0.0.1:port/...); it counts the connections and keeps every byte sent upstream (the
request heads), so a test can tell connection reuse and read the headers a client sent.

    proxy = LoopbackProxy(emulator.url)     # proxy.url: the same path on the proxy's port
    ... proxy.accepted, proxy.sent, proxy.header_values("traceparent", "/chat/completions")
"""

from __future__ import annotations

import asyncio
import re
import threading

import httpx


class LoopbackProxy:
    def __init__(self, target: str) -> None:
        self.target = httpx.URL(target)
        self.sent = bytearray()
        self.accepted = 0
        self.loop = asyncio.new_event_loop()
        self.port = 0
        ready = threading.Event()
        threading.Thread(target=self._serve, args=(ready,), daemon=True).start()
        if not ready.wait(10):
            raise RuntimeError("the loopback proxy did not start")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.target.path}"

    def header_values(self, name: str, path: str) -> list[str]:
        """The value of header `name` in every request head sent to a URL ending in `path`, in order."""
        heads = re.split(rb"(?m)^(?=(?:GET|POST) /)", bytes(self.sent))
        pattern = re.compile(rb"(?im)^" + re.escape(name.encode()) + rb": *([^\r\n]+)")
        return [found.group(1).decode() for head in heads if head.split(b"\r\n", 1)[0].split(b" ")[1:2] and
                head.split(b" ", 2)[1].endswith(path.encode())
                for found in [pattern.search(head)] if found]

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        up_reader, up_writer = await asyncio.open_connection(self.target.host, self.target.port)
        await asyncio.gather(self._pipe(reader, up_writer, keep=True), self._pipe(up_reader, writer, keep=False))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, keep: bool) -> None:
        try:
            while data := await reader.read(65536):
                if keep:
                    self.sent += data
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
