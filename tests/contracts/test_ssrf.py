"""The SSRF guard without any connection: address classes, URL parsing, resolving once and pinning."""

from __future__ import annotations

import ipaddress
import socket

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from contracts.ssrf import UnsafeURL, UrlGuard, guarded_client, is_public_address, parse_url

PUBLIC_V4 = "93.184.216.34"


@pytest.mark.parametrize("ip", [
    PUBLIC_V4, "8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "2a00:1450:4001:80b::200e",
    "64:ff9b::5db8:d822",  # NAT64 of a public IPv4 (DNS64 on an IPv6-only network)
    "::ffff:93.184.216.34", "2002:5db8:d822::1",  # IPv4-mapped and 6to4 of a public IPv4
])
def test_public_addresses_are_public(ip: str) -> None:
    assert is_public_address(ipaddress.ip_address(ip))


@pytest.mark.parametrize("ip", [
    "0.0.0.0", "0.1.2.3", "10.0.0.1", "100.64.0.1", "100.127.255.254", "127.0.0.1", "127.8.9.10",
    "169.254.169.254", "172.16.0.1", "172.31.255.255", "192.0.0.8", "192.0.2.1", "192.88.99.1",
    "192.168.1.1", "198.18.0.1", "198.51.100.7", "203.0.113.9", "224.0.0.1", "239.255.255.250",
    "240.0.0.1", "255.255.255.255",
    "::", "::1", "::7f00:1",  # IPv4-compatible 127.0.0.1
    "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254",  # IPv4-mapped
    "64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe", "64:ff9b:1::1",  # NAT64, and its local-use prefix
    "2002:7f00:1::1", "2002:a00:1::1",  # 6to4 around loopback and 10/8
    "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo
    "100::1", "2001:db8::1", "3fff::1", "5f00::1",
    "fc00::1", "fd00:ec2::254",  # unique local (AWS metadata over IPv6)
    "fe80::1", "fec0::1", "feff::1",  # link-local, deprecated site-local
    "ff02::1", "ff05::2",
])
def test_special_addresses_are_not_public(ip: str) -> None:
    assert not is_public_address(ipaddress.ip_address(ip))


@pytest.mark.parametrize(("url", "reason", "says"), [
    ("https://example.com:99999/h", "invalid", "port 99999"),
    ("https://example.com:0/h", "invalid", "port 0"),
    ("https://example.com:abc/h", "invalid", "not a valid URL"),
    ("https:///h", "invalid", "no host"),
    ("https://exa%20mple.com/h", "invalid", "host name"),
    ("https://a..b/h", "invalid", "host name"),
    ("https://example.com/\x00", "invalid", "control characters"),
    ("https://example.com/" + "a" * 9000, "invalid", "8192"),
    ("ftp://example.com/h", "refused", "http(s)"),
    ("file:///etc/passwd", "refused", "http(s)"),
    ("example.com/h", "refused", "http(s)"),
    ("", "invalid", "non-empty"),
])
def test_bad_urls_are_refused_before_any_lookup(url: str, reason: str, says: str) -> None:
    guard = UrlGuard(resolver=_no_lookup)
    with pytest.raises(UnsafeURL) as caught:
        guard.pin(url)
    assert caught.value.reason == reason and says in caught.value.message


def test_credentials_are_refused_only_when_asked() -> None:
    assert parse_url("https://user:pw@example.com/a").host == "example.com"
    with pytest.raises(UnsafeURL, match="credentials"):
        parse_url("https://user:pw@example.com/a", credentials=False)


def check_parse(text: str) -> None:
    try:
        url = parse_url(text)
    except UnsafeURL as exc:
        assert exc.reason in {"invalid", "refused"}
    else:
        assert url.scheme in {"http", "https"} and url.host
        assert url.port is None or 1 <= url.port <= 65535


@given(st.text(max_size=300))
def test_parsing_any_text_returns_a_url_or_refuses_it(text: str) -> None:
    check_parse(text)


@given(st.from_regex(r"\Ahttps?://[a-z0-9.:\[\]@%é-]{0,40}(/[ -~]{0,20})?\Z"))
def test_parsing_url_like_text_returns_a_url_or_refuses_it(text: str) -> None:
    check_parse(text)


def test_the_host_is_resolved_once_and_the_request_pinned_to_the_checked_address() -> None:
    answers = [[PUBLIC_V4], ["127.0.0.1"]]  # a rebinding server: public first, loopback next

    def rebinding(host: str, port: int) -> list[str]:
        lookups.append((host, port))
        return answers[min(len(lookups), 2) - 1]

    lookups: list[tuple[str, int]] = []
    pinned = UrlGuard(resolver=rebinding).pin("https://hook.example:8443/path?q=1")
    assert lookups == [("hook.example", 8443)]
    assert (pinned.address, pinned.port) == (PUBLIC_V4, 8443)
    assert str(pinned.url) == f"https://{PUBLIC_V4}:8443/path?q=1"
    assert pinned.headers == {"Host": "hook.example:8443"}
    assert pinned.extensions == {"sni_hostname": "hook.example"}
    with pytest.raises(UnsafeURL) as caught:  # the second answer is checked in its turn
        UrlGuard(resolver=rebinding).pin("https://hook.example:8443/path")
    assert caught.value.reason == "refused" and "127.0.0.1" not in caught.value.message


def test_every_address_is_checked_not_only_the_first() -> None:
    guard = UrlGuard(resolver=lambda host, port: [PUBLIC_V4, "10.0.0.5"])
    with pytest.raises(UnsafeURL, match="refused"):
        guard.pin("https://mixed.example/")


def test_idn_and_ipv6_hosts_keep_their_name_in_the_host_header() -> None:
    pinned = UrlGuard(resolver=lambda host, port: [PUBLIC_V4]).pin("https://münchen.example/a")
    assert pinned.headers == {"Host": "xn--mnchen-3ya.example"}
    assert pinned.extensions == {"sni_hostname": "xn--mnchen-3ya.example"}
    v6 = "2606:4700:4700::1111"
    pinned = UrlGuard(resolver=lambda host, port: [host], https_only=False).pin(f"http://[{v6}]:8080/a")
    assert pinned.headers == {"Host": f"[{v6}]:8080"} and pinned.extensions == {}


def test_plain_http_needs_https_only_off_or_a_trusted_endpoint() -> None:
    resolver = lambda host, port: [PUBLIC_V4]  # noqa: E731
    with pytest.raises(UnsafeURL, match="plain http"):
        UrlGuard(resolver=resolver).pin("http://public.example/a")
    assert UrlGuard(resolver=resolver, https_only=False).pin("http://public.example/a").address == PUBLIC_V4


def test_trusted_endpoints_and_allow_private_lift_the_address_check() -> None:
    loopback = lambda host, port: ["127.0.0.1"]  # noqa: E731
    with pytest.raises(UnsafeURL, match="refused"):
        UrlGuard(resolver=loopback, trusted=[("127.0.0.1", 9000)]).pin("http://h.example:9001/")
    assert UrlGuard(resolver=loopback, trusted=[("127.0.0.1", 9000)]).pin("http://h.example:9000/").port == 9000
    assert UrlGuard(resolver=loopback, allow_private=True).pin("http://h.example/").address == "127.0.0.1"


@pytest.mark.parametrize(("error", "reason"), [
    (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), "not_found"),
    (socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"), "unresolved"),
    (UnicodeError("label too long"), "unresolved"),
])
def test_resolver_failures_are_told_apart(error: Exception, reason: str) -> None:
    def failing(host: str, port: int) -> list[str]:
        raise error

    with pytest.raises(UnsafeURL) as caught:
        UrlGuard(resolver=failing).pin("https://h.example/")
    assert caught.value.reason == reason
    with pytest.raises(UnsafeURL) as caught:
        UrlGuard(resolver=lambda host, port: []).pin("https://h.example/")
    assert caught.value.reason == "not_found"


def test_the_guarded_client_reads_no_proxy_and_follows_no_redirect() -> None:
    with guarded_client(timeout=httpx.Timeout(1.0)) as client:
        assert client.trust_env is False and client.follow_redirects is False


def _no_lookup(host: str, port: int) -> list[str]:
    raise AssertionError(f"{host} should not have been resolved")
