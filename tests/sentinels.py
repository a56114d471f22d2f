"""A Redis primary, a replica and three sentinels on loopback, real server processes, for failover tests.

The sentinels judge the primary down after DOWN_AFTER_MS, so a killed primary is replaced in a few
seconds (what a managed Redis does in tens). Everything lives in a temporary directory.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
from pathlib import Path

import redis

from producer.local.embedded import free_port, redis_reachable, server_binary
from tests.waiting import wait_until

MASTER = "qvqmaster"
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 4000


class SentinelSet:
    def __init__(self) -> None:
        self.binary = server_binary()
        self._dir = tempfile.TemporaryDirectory(prefix="qvq-sentinel-")
        self.primary_port, self.replica_port = free_port(), free_port()
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.processes: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        """REDIS_URL for the set: redis+sentinel://<the three sentinels>/<master>/0."""
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{MASTER}/0"

    def start(self) -> SentinelSet:
        self._server(self.primary_port)
        self._server(self.replica_port, "--replicaof", "127.0.0.1", str(self.primary_port))
        for port in self.sentinel_ports:
            self._sentinel(port)
        wait_until(self._replica_in_sync, 20, "the replica did not sync with the primary")
        wait_until(lambda: all(self._sentinel_knows_replica(port) for port in self.sentinel_ports), 20,
                   "the sentinels did not see the replica and each other")
        return self

    def master_port(self) -> int | None:
        """The master's port as the sentinels say (None while they disagree or do not know)."""
        answers = set()
        for port in self.sentinel_ports:
            client = redis.Redis(port=port, socket_timeout=1)
            try:
                address = client.sentinel_get_master_addr_by_name(MASTER)
                answers.add(int(address[1]) if address else None)
            except (redis.RedisError, OSError):
                answers.add(None)
            finally:
                client.close()
        return answers.pop() if len(answers) == 1 else None

    def kill_primary(self) -> None:
        process = self.processes.pop(self.primary_port)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    def wait_failover(self, timeout: float = 30) -> None:
        wait_until(lambda: self.master_port() == self.replica_port, timeout, "the sentinels did not promote the replica")

    def close(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.processes.clear()
        self._dir.cleanup()

    def __enter__(self) -> SentinelSet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- processes -----------------------------------------------------------------------------
    def _server(self, port: int, *extra: str) -> None:
        workdir = Path(self._dir.name) / str(port)
        workdir.mkdir()
        self._spawn(port, [self.binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                           "--appendonly", "no", "--dir", str(workdir), "--daemonize", "no",
                           "--loglevel", "warning", *extra])

    def _sentinel(self, port: int) -> None:
        conf = Path(self._dir.name) / f"sentinel-{port}.conf"
        conf.write_text("\n".join([
            f"port {port}", "bind 127.0.0.1", f"dir {self._dir.name}", "loglevel warning",
            f"sentinel monitor {MASTER} 127.0.0.1 {self.primary_port} 2",
            f"sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}",
            f"sentinel failover-timeout {MASTER} {FAILOVER_TIMEOUT_MS}",
            f"sentinel parallel-syncs {MASTER} 1", ""]))
        self._spawn(port, [self.binary, str(conf), "--sentinel"])

    def _spawn(self, port: int, args: list[str]) -> None:
        self.processes[port] = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                                start_new_session=True)
        wait_until(lambda: redis_reachable(f"redis://127.0.0.1:{port}/0", timeout=0.2), 10,
                   f"{Path(self.binary).name} on port {port} did not answer")

    def _replica_in_sync(self) -> bool:
        client = redis.Redis(port=self.replica_port, socket_timeout=1)
        try:
            return client.info("replication").get("master_link_status") == "up"
        finally:
            client.close()

    def _sentinel_knows_replica(self, port: int) -> bool:
        """The sentinel has seen the replica and both other sentinels (a failover needs their votes)."""
        client = redis.Redis(port=port, socket_timeout=1)
        try:
            return bool(client.sentinel_slaves(MASTER)) and len(client.sentinel_sentinels(MASTER)) == 2
        except (redis.RedisError, OSError):
            return False
        finally:
            client.close()
