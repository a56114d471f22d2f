"""Running the emulator: in a background thread (tests, demo, benchmarks) or blocking (the CLI)."""

from __future__ import annotations

import socket
import threading
import time
from types import FrameType, TracebackType

import uvicorn
from fastapi import FastAPI

from emulator.app import EmulatorState, create_app
from emulator.config import EmulatorConfig

__all__ = ["EmulatorConfig", "EmulatorServer", "create_app", "serve"]

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0


def _uvicorn_config(app: FastAPI, **kwargs: object) -> uvicorn.Config:
    return uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", http="h11", **kwargs)  # type: ignore[arg-type]


class EmulatorServer:
    """The emulator on 127.0.0.1 in a daemon thread; `url` is the openai SDK's base_url."""

    def __init__(self, config: EmulatorConfig | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self.config = config or EmulatorConfig()
        self.app = create_app(self.config)
        self.host = host
        self._requested_port = port
        self._port: int | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def state(self) -> EmulatorState:
        state: EmulatorState = self.app.state.emulator
        return state

    @property
    def stats(self) -> dict[str, int]:
        return self.state.stats.as_dict()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the emulator is not started")
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> EmulatorServer:
        if self._thread is not None:
            raise RuntimeError("the emulator is already started")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self._requested_port))
        except OSError:
            sock.close()
            raise
        self._port = sock.getsockname()[1]
        self.state.stopping = False
        # log_config=None: an embedded emulator leaves the process's logging setup alone.
        self._server = uvicorn.Server(_uvicorn_config(self.app, log_config=None))
        self._thread = threading.Thread(
            target=self._run, args=(sock,), name=f"qvq-emulator-{self._port}", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the emulator did not start on port {self._port}") from self._error
            time.sleep(0.01)
        return self

    def _run(self, sock: socket.socket) -> None:
        assert self._server is not None
        try:
            self._server.run(sockets=[sock])
        except BaseException as exc:  # reported by start(); a thread must not die noisily
            self._error = exc
        finally:
            sock.close()

    def stop(self) -> None:
        """Ends open streams (clients see a dropped connection), then shuts the server down."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self.state.stop_streams()
        server.should_exit = True
        thread.join(STOP_TIMEOUT_S)
        if thread.is_alive():
            server.force_exit = True
            thread.join(STOP_TIMEOUT_S)
        self._server = self._thread = None

    def __enter__(self) -> EmulatorServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class _StoppingServer(uvicorn.Server):
    """On Ctrl+C / SIGTERM, ends open streams first so a stalled one cannot hold the shutdown."""

    def __init__(self, config: uvicorn.Config, state: EmulatorState) -> None:
        super().__init__(config)
        self._state = state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._state.stop_streams()
        super().handle_exit(sig, frame)


def serve(host: str, port: int, config: EmulatorConfig) -> None:
    """Blocking, for `qvq emulator`: uvicorn with its own logging and signal handling."""
    app = create_app(config)
    _StoppingServer(_uvicorn_config(app, host=host, port=port), app.state.emulator).run()
