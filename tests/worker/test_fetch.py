"""Fetching image references: local files, https with the SSRF guard, and s3:// / oss:// on a real S3 server."""

from __future__ import annotations

import datetime
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import boto3
import httpx
import pytest
from botocore.response import StreamingBody

from contracts.errors import ImageError
from contracts.object_store import ObjectClients, oss_region
from contracts.settings import Settings
from contracts.ssrf import is_public_address, resolve_host
from tests import imagegen as gen
from tests.s3server import S3Server, free_ports
from worker.intake.fetch import ImageFetcher
from worker.intake.images import prepare_images

PNG = gen.make_image("PNG", (64, 48))
MB = 1024 * 1024


def fetch_error(fetcher: ImageFetcher, ref: str) -> ImageError:
    with pytest.raises(ImageError) as caught:
        fetcher.fetch(ref)
    assert caught.value.ref == ref
    return caught.value


@pytest.fixture()
def make_fetcher() -> Iterator[Callable[..., ImageFetcher]]:
    made: list[ImageFetcher] = []

    def make(*, resolver: Any = None, trusted: Any = (), ssl_context: Any = None, **settings: Any) -> ImageFetcher:
        settings.setdefault("fetch_timeout_s", 2.0)
        fetcher = ImageFetcher(Settings(**settings), resolver=resolver, trusted=trusted, ssl_context=ssl_context)
        made.append(fetcher)
        return fetcher

    yield make
    for fetcher in made:
        fetcher.close()


class Tripwire:
    """Stands in for the HTTP client or a boto3 client: any use fails the test."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"nothing should have been fetched (called {name})")

    def close(self) -> None:
        pass


# -- a local HTTP server ---------------------------------------------------------------------------
class Handler(BaseHTTPRequestHandler):
    server: LocalServer

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        with self.server.lock:
            self.server.hits.append((parts.path, self.headers.get("Host", "")))
            count = sum(1 for path, _ in self.server.hits if path == parts.path)
        route = ROUTES.get(parts.path)
        if route is None:
            self._send(404, b"not found", "text/plain")
        else:
            route(self, parse_qs(parts.query), count)

    def _send(self, status: int, body: bytes, content_type: str = "image/png", headers: dict[str, str] | None = None,
              ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def redirect(self, location: str) -> None:
        self._send(302, b"", "text/plain", {"Location": location})


def _big_declared(h: Handler, q: Any, n: int) -> None:
    h.send_response(200)
    h.send_header("Content-Type", "image/png")
    h.send_header("Content-Length", str(11 * MB))
    h.end_headers()
    for _ in range(11):
        h.wfile.write(b"\x00" * MB)
        h.server.bytes_sent += MB


def _big_undeclared(h: Handler, q: Any, n: int) -> None:
    h.send_response(200)
    h.send_header("Content-Type", "image/png")
    h.end_headers()  # HTTP/1.0, no length: the body runs until the connection closes
    for _ in range(11):
        h.wfile.write(b"\x00" * MB)
        h.server.bytes_sent += MB


def _slow(h: Handler, q: Any, n: int) -> None:
    time.sleep(1.0)
    h._send(200, PNG)


def _drip(h: Handler, q: Any, n: int) -> None:
    h.send_response(200)
    h.send_header("Content-Type", "image/png")
    h.send_header("Content-Length", str(len(PNG)))
    h.end_headers()
    for byte in PNG:
        h.wfile.write(bytes([byte]))
        h.wfile.flush()
        time.sleep(0.1)  # 14 s for the whole body


def _drip_head(h: Handler, q: Any, n: int) -> None:
    h.wfile.write(b"HTTP/1.1 200 OK\r\n")
    for _ in range(140):  # a header of 140 bytes, one every 0.1 s: no read ever waits a whole timeout
        try:
            h.wfile.write(b"X")
            h.wfile.flush()
        except OSError:
            return
        time.sleep(0.1)


def _chain(h: Handler, q: Any, n: int) -> None:
    left = int(q["n"][0])
    h.redirect(f"/chain?n={left - 1}" if left > 0 else "/ok.png")


ROUTES: dict[str, Callable[[Handler, Any, int], None]] = {
    "/ok.png": lambda h, q, n: h._send(200, PNG),
    "/png-named.jpg": lambda h, q, n: h._send(200, PNG, "image/jpeg"),
    "/gone": lambda h, q, n: h._send(410, b"gone", "text/plain"),
    "/forbidden": lambda h, q, n: h._send(403, b"no", "text/plain"),
    "/unauthorized": lambda h, q, n: h._send(401, b"no", "text/plain"),
    "/teapot": lambda h, q, n: h._send(418, b"no", "text/plain"),
    "/error": lambda h, q, n: h._send(500, b"oops", "text/plain"),
    "/flaky": lambda h, q, n: h._send(503, b"busy", "text/plain") if n < 3 else h._send(200, PNG),
    "/slow": _slow,
    "/drip": _drip,
    "/drip-head": _drip_head,
    "/dripping-bucket/a.png": _drip,  # an object store (path-style S3) that drips its object
    "/big-declared": _big_declared,
    "/big-undeclared": _big_undeclared,
    "/redirect": lambda h, q, n: h.redirect(q["to"][0]),
    "/chain": _chain,
}


class LocalServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.socket = tls.wrap_socket(self.socket, server_side=True)
        self.lock = threading.Lock()
        self.hits: list[tuple[str, str]] = []
        self.bytes_sent = 0
        self.port = self.server_address[1]

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # the fetcher hangs up on purpose (too large): no traceback on stderr

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[LocalServer, LocalServer]]:
    """Two servers: 'public' (trusted in the redirect tests) and 'internal' (must never be reached)."""
    started = [LocalServer(), LocalServer()]
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in started]
    for thread in threads:
        thread.start()
    yield started[0], started[1]
    for server in started:
        server.shutdown()
        server.server_close()


@pytest.fixture()
def public(servers: tuple[LocalServer, LocalServer]) -> LocalServer:
    for server in servers:
        server.hits.clear()
        server.bytes_sent = 0
    return servers[0]


@pytest.fixture()
def internal(servers: tuple[LocalServer, LocalServer], public: LocalServer) -> LocalServer:
    return servers[1]


# -- local files -------------------------------------------------------------------------------------
def test_local_files_are_refused_unless_allowed(make_fetcher: Any, tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(PNG)
    error = fetch_error(make_fetcher(), str(path))
    assert error.code == "image.access_denied" and "QVQ_ALLOW_LOCAL_FILES" in error.message
    assert fetch_error(make_fetcher(), path.as_uri()).code == "image.access_denied"


def test_local_files_by_path_and_file_url(make_fetcher: Any, tmp_path: Path) -> None:
    path = tmp_path / "a b.png"
    path.write_bytes(PNG)
    fetcher = make_fetcher(allow_local_files=True)
    assert fetcher.fetch(str(path)) == PNG
    assert fetcher.fetch(path.as_uri()) == PNG  # percent-encoded space


def test_local_file_errors(make_fetcher: Any, tmp_path: Path) -> None:
    fetcher = make_fetcher(allow_local_files=True)
    assert fetch_error(fetcher, str(tmp_path / "missing.png")).code == "image.not_found"
    assert fetch_error(fetcher, str(tmp_path)).code == "image.not_found"
    big = tmp_path / "big.png"
    with big.open("wb") as fh:
        fh.truncate(10 * MB + 1)  # sparse: refused by stat, never read
    assert fetch_error(fetcher, str(big)).code == "image.too_large"
    assert fetch_error(fetcher, "file://otherhost/etc/hosts").code == "image.access_denied"


def test_unknown_schemes_are_refused(make_fetcher: Any) -> None:
    for ref in ("ftp://example.com/a.png", "gs://bucket/a.png", "data://x"):
        assert fetch_error(make_fetcher(allow_local_files=True), ref).code == "image.access_denied"


# -- https: statuses, limits, retries -----------------------------------------------------------------
def test_http_fetch_and_format_by_content_not_name(make_fetcher: Any, public: LocalServer) -> None:
    fetcher = make_fetcher(allow_private_urls=True)
    assert fetcher.fetch(public.url("/ok.png")) == PNG
    [image] = prepare_images([public.url("/png-named.jpg")], fetcher, high_resolution=False)
    assert (image.format, image.mime) == ("PNG", "image/png")


@pytest.mark.parametrize(("path", "code", "retryable", "hits"), [
    ("/missing", "image.not_found", False, 1),
    ("/gone", "image.not_found", False, 1),
    ("/forbidden", "image.access_denied", False, 1),
    ("/unauthorized", "image.access_denied", False, 1),
    ("/teapot", "image.fetch_failed", False, 1),
    ("/error", "image.fetch_failed", True, 3),
])
def test_http_status_codes(make_fetcher: Any, public: LocalServer, path: str, code: str, retryable: bool,
                           hits: int) -> None:
    error = fetch_error(make_fetcher(allow_private_urls=True), public.url(path))
    assert (error.code, error.retryable) == (code, retryable)
    assert len(public.hits) == hits
    assert public.url(path) in error.message


def test_http_5xx_is_retried_then_succeeds(make_fetcher: Any, public: LocalServer) -> None:
    assert make_fetcher(allow_private_urls=True).fetch(public.url("/flaky")) == PNG
    assert len(public.hits) == 3


def test_http_timeout_is_retryable_fetch_failed(make_fetcher: Any, public: LocalServer) -> None:
    error = fetch_error(make_fetcher(allow_private_urls=True, fetch_timeout_s=0.2), public.url("/slow"))
    assert (error.code, error.retryable) == ("image.fetch_failed", True)
    assert "timed out" in error.message


def test_a_server_dripping_bytes_is_cut_off(make_fetcher: Any, public: LocalServer) -> None:
    started = time.perf_counter()
    error = fetch_error(make_fetcher(allow_private_urls=True, fetch_timeout_s=0.2), public.url("/drip"))
    assert (error.code, error.retryable) == ("image.fetch_failed", True)
    assert "not finished" in error.message
    assert time.perf_counter() - started < 12  # three attempts of 0.6 s, not three of 14 s


def test_a_server_dripping_its_headers_is_cut_off_at_the_total_deadline(make_fetcher: Any,
                                                                         public: LocalServer) -> None:
    started = time.perf_counter()
    error = fetch_error(make_fetcher(allow_private_urls=True, fetch_timeout_s=0.2), public.url("/drip-head"))
    assert (error.code, error.retryable) == ("image.fetch_failed", True)
    assert "not finished" in error.message
    assert time.perf_counter() - started < 12  # three attempts of 0.6 s, not three of 14 s


def test_an_object_store_dripping_bytes_is_cut_off_at_the_total_deadline(
        make_fetcher: Any, public: LocalServer, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test-secret",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    started = time.perf_counter()
    fetcher = make_fetcher(fetch_timeout_s=0.3, s3_endpoint_url=public.url(""))
    error = fetch_error(fetcher, "s3://dripping-bucket/a.png")
    assert (error.code, error.retryable) == ("image.fetch_failed", True)
    assert "not finished" in error.message
    assert time.perf_counter() - started < 12  # 0.9 s per try, not the 14 s the whole drip takes


def test_a_batch_header_read_from_a_dripping_store_is_cut_off_at_the_total_deadline(
        public: LocalServer, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test-secret",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    clients = ObjectClients(Settings(fetch_timeout_s=0.3, s3_endpoint_url=public.url("")))
    started = time.perf_counter()
    with pytest.raises(ImageError) as cut:
        clients.read_head("s3://dripping-bucket/a.png", 64 * 1024)
    assert cut.value.code == "image.fetch_failed" and "header not read" in cut.value.message
    assert time.perf_counter() - started < 12  # 0.9 s per try, not the 14 s the whole drip takes
    clients.close()


def test_http_connection_refused_is_retryable_fetch_failed(make_fetcher: Any) -> None:
    (port,) = free_ports(1)
    error = fetch_error(make_fetcher(allow_private_urls=True), f"http://127.0.0.1:{port}/a.png")
    assert (error.code, error.retryable) == ("image.fetch_failed", True)


def test_declared_oversize_is_refused_before_the_body_is_read(make_fetcher: Any, public: LocalServer) -> None:
    error = fetch_error(make_fetcher(allow_private_urls=True), public.url("/big-declared"))
    assert error.code == "image.too_large" and "Content-Length" in error.message


def test_undeclared_oversize_is_cut_while_streaming(make_fetcher: Any, public: LocalServer) -> None:
    started = time.perf_counter()
    error = fetch_error(make_fetcher(allow_private_urls=True), public.url("/big-undeclared"))
    assert error.code == "image.too_large" and "download stopped" in error.message
    assert time.perf_counter() - started < 10


def test_unknown_host_is_not_found(make_fetcher: Any) -> None:
    def resolver(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    error = fetch_error(make_fetcher(resolver=resolver), "https://no-such-host.example/a.png")
    assert error.code == "image.not_found" and "no-such-host.example" in error.message


def test_redirects_are_followed_up_to_five(make_fetcher: Any, public: LocalServer) -> None:
    fetcher = make_fetcher(allow_private_urls=True)
    assert fetcher.fetch(public.url("/chain?n=4")) == PNG  # 5 redirects
    error = fetch_error(fetcher, public.url("/chain?n=5"))
    assert error.code == "image.fetch_failed" and not error.retryable and "redirects" in error.message


# -- SSRF ---------------------------------------------------------------------------------------------
STUB_DNS = {
    "internal.example": ["10.1.2.3"],
    "metadata.example": ["169.254.169.254"],
    "mixed.example": ["93.184.216.34", "10.0.0.5"],
    "v6-internal.example": ["fd00:ec2::254"],
    "public.example": ["93.184.216.34"],
}


def stub_resolver(host: str, port: int) -> list[str]:
    if host in STUB_DNS:
        return STUB_DNS[host]
    return socket_resolver(host, port)


def socket_resolver(host: str, port: int) -> list[str]:
    return resolve_host(host, port)


@pytest.mark.parametrize("url", [
    "https://127.0.0.1/a.png",
    "https://10.0.0.1/a.png",
    "https://172.16.0.1/a.png",
    "https://192.168.1.1/a.png",
    "https://169.254.169.254/latest/meta-data/iam/security-credentials/",
    "https://[::1]/a.png",
    "https://[fd00:ec2::254]/latest/meta-data/",
    "https://[fe80::1]/a.png",
    "https://[::ffff:127.0.0.1]/a.png",
    "https://[64:ff9b::a9fe:a9fe]/a.png",
    "https://0.0.0.0/a.png",
    "https://100.64.0.1/a.png",
    "https://224.0.0.1/a.png",
    "https://240.0.0.1/a.png",
    "https://2130706433/a.png",
    "https://localhost/a.png",
    "https://internal.example/a.png",
    "https://metadata.example/latest/meta-data/",
    "https://mixed.example/a.png",
    "https://v6-internal.example/a.png",
    "http://public.example/a.png",
    "https://[fec0::1]/a.png",
    "https://[::7f00:1]/a.png",
    "https://[2002:a00:1::1]/a.png",
    "https://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/a.png",
    "https://[64:ff9b:1::a00:1]/a.png",
    "https://[3fff::1]/a.png",
    "https://198.18.0.1/a.png",
    "https://192.0.0.8/a.png",
    "https://255.255.255.255/a.png",
    "https://127.1/a.png",
])
def test_private_and_special_addresses_are_refused_and_nothing_is_fetched(make_fetcher: Any, url: str) -> None:
    fetcher = make_fetcher(resolver=stub_resolver)
    fetcher._http = Tripwire()
    error = fetch_error(fetcher, url)
    assert error.code == "image.access_denied"
    assert "refused" in error.message


@pytest.mark.parametrize(("url", "code"), [
    ("https://public.example:99999/a.png", "image.not_found"),
    ("https://public.example:0/a.png", "image.not_found"),
    ("https://exa%20mple.example/a.png", "image.not_found"),
])
def test_a_bad_port_or_host_is_refused_before_any_lookup(make_fetcher: Any, url: str, code: str) -> None:
    def resolver(host: str, port: int) -> list[str]:
        raise AssertionError("nothing should have been resolved")

    fetcher = make_fetcher(resolver=resolver)
    fetcher._http = Tripwire()
    assert fetch_error(fetcher, url).code == code


def test_a_refusal_does_not_name_the_internal_address(make_fetcher: Any) -> None:
    fetcher = make_fetcher(resolver=stub_resolver)
    fetcher._http = Tripwire()
    error = fetch_error(fetcher, "https://internal.example/a.png")
    assert "10.1.2.3" not in error.message and "internal.example" in error.message


def test_proxy_environment_variables_are_ignored(make_fetcher: Any, public: LocalServer,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    proxy = socket.create_server(("127.0.0.1", 0))  # a proxy that must stay unused: nothing accepts
    proxy.settimeout(0.2)
    try:
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
            monkeypatch.setenv(name, f"http://127.0.0.1:{proxy.getsockname()[1]}")
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        with httpx.Client(trust_env=True, timeout=0.5) as naive, pytest.raises(httpx.HTTPError):
            naive.get(public.url("/ok.png"))  # a client that reads the environment goes to the proxy
        proxy.accept()[0].close()
        assert make_fetcher(trusted=[("127.0.0.1", public.port)]).fetch(public.url("/ok.png")) == PNG
        with pytest.raises(TimeoutError):
            proxy.accept()
        assert public.hits == [("/ok.png", f"127.0.0.1:{public.port}")]
    finally:
        proxy.close()


def test_http_retries_follow_the_fetch_policy(make_fetcher: Any, public: LocalServer,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from contracts import retry

    waits: list[float] = []
    monkeypatch.setattr(retry, "sleep", waits.append)
    error = fetch_error(make_fetcher(allow_private_urls=True), public.url("/error"))
    assert error.retryable and len(public.hits) == 3 and waits == [0.2, 0.6]
    waits.clear()
    fetch_error(make_fetcher(allow_private_urls=True), public.url("/teapot"))
    assert waits == []


def test_a_real_loopback_server_is_not_reached(make_fetcher: Any, public: LocalServer) -> None:
    for url in (public.url("/ok.png"), public.url("/ok.png", "localhost"),
                public.url("/ok.png").replace("http:", "https:")):
        assert fetch_error(make_fetcher(), url).code == "image.access_denied"
    assert public.hits == []


def test_redirect_to_an_internal_address_is_refused(make_fetcher: Any, public: LocalServer,
                                                    internal: LocalServer) -> None:
    # 'public' stands in for an internet server (trusted as if public); 'internal' must stay unreached.
    fetcher = make_fetcher(trusted=[("127.0.0.1", public.port)])
    assert fetcher.fetch(public.url("/redirect?to=/ok.png")) == PNG
    for target in (internal.url("/ok.png"), internal.url("/ok.png", "localhost"),
                   "http://169.254.169.254/latest/meta-data/", f"http://[::1]:{internal.port}/ok.png"):
        error = fetch_error(fetcher, public.url(f"/redirect?to={target}"))
        assert error.code == "image.access_denied", error.message
    assert internal.hits == []
    assert [path for path, _ in public.hits].count("/redirect") == 5


def test_the_connection_goes_to_the_checked_address_with_the_original_host(make_fetcher: Any,
                                                                          public: LocalServer) -> None:
    lookups: list[str] = []

    def rebinding(host: str, port: int) -> list[str]:
        lookups.append(host)  # a rebinding server would answer differently the second time
        return ["127.0.0.1"] if len(lookups) == 1 else ["10.0.0.1"]

    fetcher = make_fetcher(resolver=rebinding, trusted=[("127.0.0.1", public.port)])
    assert fetcher.fetch(f"http://images.example:{public.port}/ok.png") == PNG
    assert lookups == ["images.example"]
    assert public.hits == [("/ok.png", f"images.example:{public.port}")]


def _tls_pair(hostname: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A private CA and a certificate for ``hostname``: (server context, client context trusting the CA)."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def build(subject: str, key: Any, issuer: str, signer: Any, ca: bool) -> Any:
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(hours=1))
                   .not_valid_after(now + datetime.timedelta(hours=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_cert = build("qvq test CA", ca_key, "qvq test CA", ca_key, True)
    leaf = build(hostname, leaf_key, "qvq test CA", ca_key, False)
    pem = serialization.Encoding.PEM
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory() as tmp:
        cert_file, key_file = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
        cert_file.write_bytes(leaf.public_bytes(pem))
        key_file.write_bytes(leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()))
        server.load_cert_chain(cert_file, key_file)
    client = ssl.create_default_context(cadata=ca_cert.public_bytes(pem).decode())
    return server, client


def test_https_goes_to_the_checked_address_and_verifies_the_certificate_of_the_hostname(
        make_fetcher: Any) -> None:
    server_tls, client_tls = _tls_pair("images.example")
    server = LocalServer(server_tls)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        fetcher = make_fetcher(resolver=lambda host, port: ["127.0.0.1"], trusted=[("127.0.0.1", server.port)],
                               ssl_context=client_tls)
        assert fetcher.fetch(f"https://images.example:{server.port}/ok.png") == PNG
        assert server.hits == [("/ok.png", f"images.example:{server.port}")]
        error = fetch_error(fetcher, f"https://other.example:{server.port}/ok.png")  # the name does not match
        assert (error.code, error.retryable) == ("image.fetch_failed", False)
        assert "CERTIFICATE_VERIFY_FAILED" in error.message
    finally:
        server.shutdown()
        server.server_close()


def test_allow_private_urls_lifts_the_check(make_fetcher: Any, public: LocalServer) -> None:
    assert make_fetcher(allow_private_urls=True).fetch(public.url("/ok.png", "localhost")) == PNG


def test_public_addresses_are_public() -> None:
    import ipaddress

    for ip in ("93.184.216.34", "8.8.8.8", "2606:4700:4700::1111"):
        assert is_public_address(ipaddress.ip_address(ip))
    for ip in ("127.0.0.1", "169.254.169.254", "fd00:ec2::254", "::ffff:10.0.0.1", "2002:7f00:1::1", "::"):
        assert not is_public_address(ipaddress.ip_address(ip))


# -- s3:// and oss:// on a real S3-protocol server -----------------------------------------------------
BUCKET = "qvq-fetch-tests"


@pytest.fixture()
def store(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    s3.create_bucket(BUCKET)
    return s3


def test_s3_fetch(make_fetcher: Any, store: S3Server) -> None:
    store.put(BUCKET, "dir/cat photo.png", PNG, content_type="image/jpeg")
    fetcher = make_fetcher(s3_endpoint_url=store.endpoint_url)
    assert fetcher.fetch(f"s3://{BUCKET}/dir/cat photo.png") == PNG


def test_a_presigned_url_serves_the_object_and_only_for_store_references(make_fetcher: Any, store: S3Server) -> None:
    store.put(BUCKET, "presigned.png", PNG)
    fetcher = make_fetcher(s3_endpoint_url=store.endpoint_url)
    url = fetcher.presigned_url(f"s3://{BUCKET}/presigned.png", 60)
    assert url is not None and "Signature" in url
    assert httpx.get(url).content == PNG
    assert fetcher.presigned_url("https://example.com/a.png", 60) is None


def test_s3_missing_key_and_bucket_are_not_found(make_fetcher: Any, store: S3Server) -> None:
    fetcher = make_fetcher(s3_endpoint_url=store.endpoint_url)
    error = fetch_error(fetcher, f"s3://{BUCKET}/nope.png")
    assert error.code == "image.not_found" and "no such object" in error.message
    error = fetch_error(fetcher, "s3://qvq-no-such-bucket/nope.png")
    assert error.code == "image.not_found" and "no such bucket" in error.message
    assert fetch_error(fetcher, f"s3://{BUCKET}").code == "image.not_found"


def test_s3_wrong_credentials_are_access_denied(make_fetcher: Any, store: S3Server,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    if not store.enforces_auth:
        pytest.skip(f"{store.kind} does not check credentials")
    store.put(BUCKET, "a.png", PNG)
    for key_id, secret in ((store.access_key, "wrong-secret"), ("UNKNOWNKEY", "wrong-secret")):
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        error = fetch_error(make_fetcher(s3_endpoint_url=store.endpoint_url), f"s3://{BUCKET}/a.png")
        assert (error.code, error.retryable) == ("image.access_denied", False)


def test_s3_object_over_the_limit_is_refused_before_download(make_fetcher: Any, store: S3Server,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    store.put(BUCKET, "huge.png", b"\x00" * (10 * MB + 1))
    assert store.client().head_object(Bucket=BUCKET, Key="huge.png")["ContentLength"] == 10 * MB + 1
    reads: list[Any] = []
    real_read = StreamingBody.read
    monkeypatch.setattr(StreamingBody, "read", lambda self, *a: reads.append(a) or real_read(self, *a))
    error = fetch_error(make_fetcher(s3_endpoint_url=store.endpoint_url), f"s3://{BUCKET}/huge.png")
    assert error.code == "image.too_large" and "not downloaded" in error.message
    assert reads == []


def test_s3_limit_follows_settings(make_fetcher: Any, store: S3Server) -> None:
    store.put(BUCKET, "a.png", PNG)
    fetcher = make_fetcher(s3_endpoint_url=store.endpoint_url, max_image_bytes=len(PNG) - 1)
    assert fetch_error(fetcher, f"s3://{BUCKET}/a.png").code == "image.too_large"


def test_allowed_buckets(make_fetcher: Any, store: S3Server) -> None:
    store.put(BUCKET, "a.png", PNG)
    fetcher = make_fetcher(s3_endpoint_url=store.endpoint_url, allowed_buckets=("other", BUCKET))
    assert fetcher.fetch(f"s3://{BUCKET}/a.png") == PNG
    strict = make_fetcher(s3_endpoint_url=store.endpoint_url, allowed_buckets=("other", f"oss://{BUCKET}"))
    strict.objects.clients._clients["s3"] = Tripwire()
    error = fetch_error(strict, f"s3://{BUCKET}/a.png")
    assert error.code == "image.access_denied" and "QVQ_ALLOWED_BUCKETS" in error.message


def test_s3_unreachable_is_retryable_fetch_failed(make_fetcher: Any, store: S3Server) -> None:
    (port,) = free_ports(1)
    error = fetch_error(make_fetcher(s3_endpoint_url=f"http://127.0.0.1:{port}"), f"s3://{BUCKET}/a.png")
    assert (error.code, error.retryable) == ("image.fetch_failed", True)


def test_s3_client_is_built_once_across_threads(make_fetcher: Any, store: S3Server,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    store.put(BUCKET, "a.png", PNG)
    built: list[str] = []
    real_client = boto3.session.Session.client
    monkeypatch.setattr(boto3.session.Session, "client",
                        lambda self, *a, **k: built.append(a[0]) or real_client(self, *a, **k))
    fetcher = make_fetcher(s3_endpoint_url=store.endpoint_url)
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(fetcher.fetch, [f"s3://{BUCKET}/a.png"] * 32))
    assert results == [PNG] * 32 and built == ["s3"]
    assert fetcher.objects.clients._clients["s3"].meta.config.max_pool_connections >= 50


def test_oss_uses_virtual_hosted_addressing(make_fetcher: Any, store: S3Server,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    if store.kind != "seaweedfs" or store.domain_name != "localhost":
        pytest.skip("needs SeaweedFS with -s3.domainName=localhost")
    store.put(BUCKET, "a.png", PNG)
    real_getaddrinfo = socket.getaddrinfo
    hosts: list[str] = []

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(host, str) and host.endswith(".localhost"):
            hosts.append(host)
            host = "127.0.0.1"
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)  # oss:// uses the OSS key pair from settings, not the AWS chain
    oss = {"oss_endpoint_url": f"http://localhost:{store.port}", "oss_region": store.region,
           "oss_access_key_id": store.access_key}
    fetcher = make_fetcher(oss_access_key_secret=store.secret_key, **oss)
    assert fetcher.fetch(f"oss://{BUCKET}/a.png") == PNG
    assert hosts and set(hosts) == {f"{BUCKET}.localhost"}
    error = fetch_error(make_fetcher(oss_access_key_secret="wrong", **oss), f"oss://{BUCKET}/a.png")
    assert error.code == "image.access_denied"


def test_oss_client_configuration(make_fetcher: Any) -> None:
    fetcher = make_fetcher(oss_endpoint_url="https://s3.oss-cn-hangzhou.aliyuncs.com",
                           oss_access_key_id="id", oss_access_key_secret="secret")
    client = fetcher.objects.clients.client("oss", "oss://b/k")
    config = client.meta.config
    assert client.meta.region_name == "cn-hangzhou"
    assert config.s3 == {"addressing_style": "virtual"}
    assert config.signature_version == "s3v4"
    assert config.request_checksum_calculation == "when_required"
    assert config.response_checksum_validation == "when_required"
    assert config.max_pool_connections >= 50
    assert config.retries == {"mode": "standard", "total_max_attempts": 3}


def test_oss_region_from_endpoint_or_settings() -> None:
    assert oss_region(Settings(oss_endpoint_url="https://s3.oss-cn-beijing.aliyuncs.com")) == "cn-beijing"
    assert oss_region(Settings(oss_endpoint_url="https://s3.oss-cn-shanghai-internal.aliyuncs.com")) == "cn-shanghai"
    assert oss_region(Settings(oss_endpoint_url="https://s3.oss-ap-southeast-1.aliyuncs.com")) == "ap-southeast-1"
    assert oss_region(Settings(oss_endpoint_url="https://x.aliyuncs.com", oss_region="cn-wuhan")) == "cn-wuhan"


def test_oss_without_configuration_is_access_denied(make_fetcher: Any) -> None:
    error = fetch_error(make_fetcher(), "oss://bucket/a.png")
    assert error.code == "image.access_denied" and "OSS_ENDPOINT_URL" in error.message


# -- a job mixing every kind of reference ----------------------------------------------------------------
def test_prepare_images_over_real_stores(make_fetcher: Any, store: S3Server, public: LocalServer,
                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store.put(BUCKET, "photo.jpg", gen.gradient_image("JPEG", (1600, 1200)))
    local = tmp_path / "scan.bmp"
    local.write_bytes(gen.make_image("BMP", (80, 60)))
    fetcher = make_fetcher(s3_endpoint_url=store.endpoint_url, allow_local_files=True, allow_private_urls=True)
    calls: list[str] = []
    real_fetch = fetcher.fetch
    monkeypatch.setattr(fetcher, "fetch", lambda ref: calls.append(ref) or real_fetch(ref))
    refs = [f"s3://{BUCKET}/photo.jpg", public.url("/ok.png"), str(local), f"s3://{BUCKET}/photo.jpg"]
    images = prepare_images(refs, fetcher, high_resolution=False)
    assert [i.format for i in images] == ["JPEG", "PNG", "BMP", "JPEG"]
    assert images[0].sent_width * images[0].sent_height <= 1_003_520
    assert sorted(calls) == sorted(set(refs))
