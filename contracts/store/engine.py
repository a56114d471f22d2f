"""Engines whose calls never hang: connect, statement and pool timeouts, and a client-side deadline on
every checked-out connection (`ConnectionDeadlines`)."""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

#: Every statement's limit, enforced by the server (PostgreSQL statement_timeout) and by the client.
DEFAULT_TIMEOUT_S = 15.0
CONNECT_TIMEOUT_S = 5


def make_engine(url: str, timeout_s: float | None = DEFAULT_TIMEOUT_S) -> Engine:
    """An engine whose calls never hang: a connect timeout, a statement timeout, a pool timeout, and,
    for a server that stopped answering (SIGSTOPped, or a frozen network path that still ACKs), a
    client-side deadline on every checkout (`ConnectionDeadlines`). `timeout_s=None`: only the connect
    timeout (schema migrations, which may rightly take longer)."""
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False},
                                  pool_size=20, max_overflow=200, pool_timeout=timeout_s or 30)
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    postgres = sa.engine.make_url(url).get_backend_name() == "postgresql"
    if timeout_s is None:
        return sa.create_engine(url, pool_pre_ping=True,
                                connect_args={"connect_timeout": CONNECT_TIMEOUT_S} if postgres else {})
    connect_args: dict[str, Any] = {}
    if postgres:
        connect_args = {
            "connect_timeout": CONNECT_TIMEOUT_S,
            "options": f"-c statement_timeout={int(timeout_s * 1000)} -c lock_timeout={int(timeout_s * 1000)}",
            # a server that vanished (host down, cable cut): the kernel gives up instead of waiting for hours
            "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 3, "keepalives_count": 3,
            "tcp_user_timeout": int((timeout_s + CONNECT_TIMEOUT_S) * 1000),
        }
    engine = sa.create_engine(url, pool_size=20, max_overflow=50, pool_timeout=timeout_s, connect_args=connect_args)
    _DEADLINES.watch(engine, timeout_s + CONNECT_TIMEOUT_S)
    return engine


class ConnectionDeadlines:
    """A checked-out connection held past its deadline has its socket shut down, so the call blocked on
    it fails (OperationalError, connection invalidated) instead of waiting for a server that stopped
    answering: libpq has no client-side query timeout, and a stopped server's kernel still ACKs.

    Also the pessimistic ping (SQLAlchemy's pool_pre_ping runs before the checkout event, unguarded):
    the ping runs here, under the deadline; a dead connection is replaced by the pool."""

    def __init__(self) -> None:
        self._armed: dict[int, tuple[float, int]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def watch(self, engine: Engine, limit_s: float) -> None:
        def on_checkout(dbapi_conn: Any, _record: Any, _proxy: Any) -> None:
            self._on_checkout(dbapi_conn, limit_s)

        sa.event.listen(engine, "checkout", on_checkout)
        sa.event.listen(engine, "checkin", self._on_checkin)
        sa.event.listen(engine, "close", self._on_checkin)
        sa.event.listen(engine, "invalidate", lambda conn, *_: self._on_checkin(conn, None))

    def _on_checkout(self, dbapi_conn: Any, limit_s: float) -> None:
        self._ensure_thread()
        try:
            fd = dbapi_conn.fileno()
        except Exception as exc:
            raise sa.exc.DisconnectionError() from exc
        with self._lock:
            self._armed[id(dbapi_conn)] = (time.monotonic() + limit_s, fd)
        try:
            cursor = dbapi_conn.cursor()
            cursor.execute("SELECT 1")
            cursor.close()
        except Exception as exc:
            self._on_checkin(dbapi_conn, None)
            raise sa.exc.DisconnectionError() from exc

    def _on_checkin(self, dbapi_conn: Any, _record: Any) -> None:
        with self._lock:
            self._armed.pop(id(dbapi_conn), None)

    def _ensure_thread(self) -> None:
        if self._thread is not None and self._pid == os.getpid():
            return
        with self._lock:
            if self._thread is None or self._pid != os.getpid():  # one per process, started after a fork
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._run, name="qvq-db-deadlines", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(0.25)
            now_ = time.monotonic()
            with self._lock:
                late = [(key, fd) for key, (deadline, fd) in self._armed.items() if deadline <= now_]
                for key, _fd in late:
                    self._armed.pop(key, None)
            for _key, fd in late:
                _shut_down(fd)


_DEADLINES = ConnectionDeadlines()


def _shut_down(fd: int) -> None:
    """Shut the socket down under whoever is blocked on it (a dup of the descriptor, so closing ours
    leaves the owner's descriptor alone)."""
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.close()


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()

