"""The SSRF guard for every URL the service requests on a user's behalf (image fetches, callbacks).

    parse_url(url)         static checks, no I/O (job validation uses it too): http(s), a host name or
                           IP literal, a port in 1..65535, no credentials when asked, bounded length
    is_public_address(ip)  False for any address a request must not reach (private, loopback,
                           link-local and cloud metadata, multicast, reserved, shared, site-local,
                           documentation; IPv4 embedded in IPv4-mapped, NAT64, 6to4 is checked too)
    UrlGuard.pin(url)      resolve the host ONCE, check EVERY address, and aim the request at the
                           checked address; the Host header and the TLS server name (SNI, certificate
                           check) keep the host name, so a second DNS answer cannot swap in another
                           address (DNS rebinding)
    guarded_client()       an httpx.Client that reads no proxy from the environment (a proxy would
                           connect on our behalf, past the check) and follows no redirect (a caller
                           that follows them pins each hop again)

Every refusal raises UnsafeURL, whose `reason` the caller translates: an ImageError for a fetch, a
"refused" outcome for a callback. Messages name the URL given, never the internal address it reached.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import ssl
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import httpx

from contracts.errors import UnsafeURL

MAX_URL_CHARS = 8192
SCHEMES = {"https": 443, "http": 80}

Resolver = Callable[[str, int], list[str]]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_HOST_NAME = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_.])?$")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
#: Spelled out rather than left to ipaddress's is_global, whose lists change between Python versions.
_NOT_PUBLIC = tuple(ipaddress.ip_network(net) for net in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15",
    "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
    "::/8", "64:ff9b:1::/48", "100::/64", "2001::/23", "2001:db8::/32", "3fff::/20", "5f00::/16",
    "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8",
))


def parse_url(url: str, *, credentials: bool = True, max_chars: int = MAX_URL_CHARS) -> httpx.URL:
    """The URL as httpx will request it, or UnsafeURL(reason="invalid") saying what is wrong."""
    if not isinstance(url, str) or not url:
        raise UnsafeURL("must be a non-empty http(s) URL", reason="invalid")
    if len(url) > max_chars:
        raise UnsafeURL(f"at most {max_chars} characters", reason="invalid")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in url):
        raise UnsafeURL("control characters are not allowed in a URL", reason="invalid")
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        raise UnsafeURL(f"not a valid URL ({exc})", reason="invalid") from None
    if parsed.scheme not in SCHEMES:
        given = f", not {parsed.scheme}://" if parsed.scheme else ""
        raise UnsafeURL(f"must be an http(s) URL{given}", reason="refused")
    _check_host(parsed.raw_host.decode("ascii", "replace"))
    if parsed.port is not None and not 1 <= parsed.port <= 65535:
        raise UnsafeURL(f"port {parsed.port} is out of range (1..65535)", reason="invalid")
    if parsed.userinfo and not credentials:
        raise UnsafeURL("credentials (user:password@) are not allowed in this URL", reason="invalid")
    return parsed


def _check_host(host: str) -> None:
    """host: the ASCII form (IDNA already applied by httpx)."""
    if not host:
        raise UnsafeURL("the URL has no host", reason="invalid")
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    if len(host) > 253 or not _HOST_NAME.match(host) or ".." in host:
        raise UnsafeURL(f"not a valid host name: {host!r}", reason="invalid")


def resolve_host(host: str, port: int) -> list[str]:
    """Every address the host resolves to (getaddrinfo, both families), in the resolver's order."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def is_public_address(ip: IPAddress) -> bool:
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (
            ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in _NAT64 else None)
        if embedded is not None:
            return is_public_address(embedded)
    if any(ip in net for net in _NOT_PUBLIC if net.version == ip.version):
        return False
    return ip.is_global and not (
        ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
        or ip.is_reserved or ip.is_unspecified or (isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local)
    )


@dataclass(frozen=True)
class Pinned:
    """A request aimed at a checked address: pass url, headers and extensions to httpx."""

    url: httpx.URL
    address: str
    port: int
    headers: dict[str, str] = field(default_factory=dict)
    extensions: dict[str, Any] = field(default_factory=dict)


class UrlGuard:
    """Resolves and checks a URL's host, then pins the request to the checked address.

    ``allow_private`` (QVQ_ALLOW_PRIVATE_URLS) lifts the address check and allows plain http; the host
    is still resolved once and pinned. ``resolver`` and ``trusted`` exist for tests: ``trusted`` is a
    set of (ip, port) endpoints exempt from the check (and allowed over plain http), standing in for
    a public server. ``https_only`` refuses plain http to an untrusted endpoint.
    """

    def __init__(self, *, allow_private: bool = False, resolver: Resolver | None = None,
                 trusted: Collection[tuple[str, int]] = (), https_only: bool = True) -> None:
        self.allow_private = allow_private
        self.https_only = https_only
        self._resolve = resolver or resolve_host
        self._trusted = {(str(ipaddress.ip_address(ip)), port) for ip, port in trusted}

    def pin(self, url: str, *, credentials: bool = True) -> Pinned:
        parsed = parse_url(url, credentials=credentials)
        host, port = parsed.raw_host.decode("ascii"), parsed.port or SCHEMES[parsed.scheme]
        address = self._checked_address(host, port, url)
        trusted = self.allow_private or (address, port) in self._trusted
        if parsed.scheme == "http" and self.https_only and not trusted:
            raise UnsafeURL(f"plain http is refused ({url}); use https://", reason="refused")
        shown = f"[{host}]" if ":" in host else host
        host_header = shown if parsed.port is None else f"{shown}:{parsed.port}"
        extensions = {"sni_hostname": host} if parsed.scheme == "https" else {}
        return Pinned(parsed.copy_with(host=address), address, port, {"Host": host_header}, extensions)

    def _checked_address(self, host: str, port: int, url: str) -> str:
        try:
            addresses = [ipaddress.ip_address(a.split("%", 1)[0]) for a in self._resolve(host, port)]
        except socket.gaierror as exc:
            gone = exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", -5))
            raise UnsafeURL(f"cannot resolve host {host!r} ({exc.strerror})",
                            reason="not_found" if gone else "unresolved") from exc
        except (OSError, UnicodeError, ValueError) as exc:
            raise UnsafeURL(f"cannot resolve host {host!r}", reason="unresolved") from exc
        if not addresses:
            raise UnsafeURL(f"host {host!r} has no address", reason="not_found")
        if not self.allow_private:
            for address in addresses:
                if not is_public_address(address) and (str(address), port) not in self._trusted:
                    raise UnsafeURL(
                        f"refused: {url} resolves to a private, loopback, link-local or reserved address "
                        "(set QVQ_ALLOW_PRIVATE_URLS=1 only for local testing)", reason="refused")
        return str(addresses[0])


def guarded_async_client(*, timeout: httpx.Timeout, limits: httpx.Limits | None = None,
                         transport: httpx.AsyncBaseTransport | None = None) -> httpx.AsyncClient:
    """`guarded_client` for an event loop: no proxy from the environment, no redirect followed."""
    options: dict[str, Any] = {"limits": limits} if limits is not None else {}
    return httpx.AsyncClient(timeout=timeout, follow_redirects=False, trust_env=False, transport=transport,
                             **options)


def guarded_client(*, timeout: httpx.Timeout, verify: ssl.SSLContext | bool = True,
                   limits: httpx.Limits | None = None, headers: dict[str, str] | None = None,
                   transport: httpx.BaseTransport | None = None) -> httpx.Client:
    """The HTTP client for pinned requests: no proxy from the environment, no redirect followed."""
    options: dict[str, Any] = {"limits": limits} if limits is not None else {}
    return httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False, verify=verify,
                        headers=headers, transport=transport, **options)
