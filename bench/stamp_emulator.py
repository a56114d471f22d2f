"""The QVQ emulator for benchmarks, in its own process: every token's text is its own send time.

Each thinking/answer token is replaced by `§<unix time, µs>` + a space, written at the moment the
response body is handed to the HTTP server for the socket (an ASGI middleware) (the emulator's `stamp_chunks` puts the same clock in `x_sent_at`,
but the worker does not forward chunk fields, only text). A subscriber then finds, in every delta it
receives, the send time of every token the delta carries, so the delay of each token is measured
exactly, whether or not the worker coalesced it with others:

    python -m bench.stamp_emulator --port 8001 --tps 50 --first-token-s 1 --reasoning-tokens 400

Run in a process of its own so its CPU (and GIL) do not distort the process being measured.
"""

from __future__ import annotations

import argparse
import re
import time
from typing import Any

MARK = "\u00a7"  # §
STAMP = re.compile(MARK + r"(\d+\.\d+)")


def stamps(text: str) -> list[float]:
    """The send times carried by a piece of streamed text."""
    return [float(s) for s in STAMP.findall(text)]


_TEXT = re.compile(rb'"(reasoning_content|content)":"(?:[^"\\]|\\.)+"')


class StampSends:
    """ASGI middleware: rewrites the text of every token chunk in a response body to the time that
    body is handed to the server for the socket. Works on the SSE bytes, whatever the emulator's
    internals (several chunks sent together get the same stamp, as they leave together)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def stamped(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body" and message.get("body"):
                mark = f"{MARK}{time.time():.6f} ".encode()
                message = {**message, "body": _TEXT.sub(lambda m: b'"' + m[1] + b'":"' + mark + b'"', message["body"])}
            await send(message)

        await self.app(scope, receive, stamped)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tps", type=float, default=50.0)
    parser.add_argument("--first-token-s", type=float, default=1.0)
    parser.add_argument("--reasoning-tokens", type=int, default=400)
    parser.add_argument("--answer-tokens", type=int, default=100)
    parser.add_argument("--plain", action="store_true", help="do not stamp the text (the stock emulator)")
    args = parser.parse_args(argv)
    import uvicorn

    from emulator.server import EmulatorConfig, create_app

    config = EmulatorConfig(tps=args.tps, first_token_s=args.first_token_s,
                            reasoning_tokens=args.reasoning_tokens, answer_tokens=args.answer_tokens)
    app = create_app(config)
    uvicorn.run(app if args.plain else StampSends(app), host=args.host, port=args.port, log_level="warning",
                access_log=False, lifespan="off")


if __name__ == "__main__":
    main()
