"""Fetching user-given URLs: only http(s), never private addresses (also after redirects),
a byte cap and a deadline. Everything runs against a server on 127.0.0.1."""

from __future__ import annotations

import time

import httpx
import pytest

from avatar_core.errors import InputError
from avatar_core.media.fetch import (
    MAX_REDIRECTS,
    address_allowed,
    check_host,
    checked_transport,
    fetch,
    is_url,
)
from media_factory import LocalServer

PUBLIC_IP = "93.184.216.34"  # a globally routable address (never contacted in these tests)


@pytest.mark.parametrize(
    "ip",
    [
        "127.0.0.1",
        "127.8.9.10",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",  # cloud metadata
        "100.64.0.1",  # carrier-grade NAT
        "0.0.0.0",
        "::1",
        "fe80::1",
        "fc00::1",
        "::ffff:127.0.0.1",  # IPv4-mapped loopback
        "::ffff:10.0.0.1",
        "::",
        "not-an-ip",
    ],
)
def test_private_loopback_link_local_addresses_are_refused(ip):
    assert address_allowed(ip) is False


@pytest.mark.parametrize("ip", [PUBLIC_IP, "8.8.8.8", "2606:4700:4700::1111"])
def test_public_addresses_are_allowed(ip):
    assert address_allowed(ip) is True


def test_allow_private_lifts_the_address_check_but_not_multicast():
    for ip in ("127.0.0.1", "10.1.2.3", "169.254.169.254", "::1"):
        assert address_allowed(ip, allow_private=True) is True
    assert address_allowed("224.0.0.1", allow_private=True) is False


def test_one_bad_address_among_several_refuses_the_host():
    resolver = lambda host, port: [PUBLIC_IP, "10.0.0.5"]  # noqa: E731
    with pytest.raises(InputError, match=r"points to sneaky.test \(10.0.0.5\), a local or private network"):
        check_host("sneaky.test", 80, allow_private=False, resolver=resolver)


@pytest.mark.parametrize(
    "url, shown",
    [
        ("file:///etc/passwd", "'file:'"),
        ("ftp://example.com/a.jpg", "'ftp:'"),
        ("data:image/png;base64,iVBORw0KGgo=", "'data:'"),
        ("javascript:alert(1)", "'javascript:'"),
        ("gopher://example.com/", "'gopher:'"),
        ("example.com/a.jpg", "no scheme"),
    ],
)
def test_only_http_and_https(url, shown):
    with pytest.raises(InputError) as exc:
        fetch(url, max_bytes=1000)
    assert "Only web links starting with http:// or https://" in str(exc.value)
    assert shown in str(exc.value)


def test_is_url():
    assert is_url("https://x.test/a.jpg") and is_url("data:audio/mp3;base64,AA") and is_url("file:///a")
    assert not is_url("/home/me/a.jpg") and not is_url("C:\\photos\\a.jpg") and not is_url("a.jpg")


@pytest.fixture
def server():
    routes = {
        "/file.jpg": (200, {"Content-Type": "image/jpeg"}, b"x" * 5000),
        "/missing": (404, {}, b"nope"),
        "/empty": (200, {}, b""),
    }
    with LocalServer(routes) as srv:
        yield srv


def test_fetch_from_local_server_when_private_is_allowed(server):
    got = fetch(server.url("/file.jpg"), max_bytes=10_000, allow_private=True, what="image")
    assert got.data == b"x" * 5000
    assert got.content_type == "image/jpeg"
    assert got.filename == "file.jpg"
    assert got.url == got.final_url == server.url("/file.jpg")


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:{port}/file.jpg",
        "http://localhost:{port}/file.jpg",
        "http://[::1]:{port}/file.jpg",
        "http://10.0.0.1/file.jpg",
        "http://169.254.169.254/latest/meta-data/",
    ],
)
def test_private_targets_refused_by_default(server, url):
    with pytest.raises(InputError, match="a local or private network address"):
        fetch(url.format(port=server.port), max_bytes=10_000, allow_private=False)
    assert server.hits == []  # refused before any connection


def test_http_error_status_is_explained(server):
    with pytest.raises(InputError, match=r"answered HTTP 404 for the image link"):
        fetch(server.url("/missing"), max_bytes=10_000, allow_private=True, what="image")
    with pytest.raises(InputError, match="returned an empty file"):
        fetch(server.url("/empty"), max_bytes=10_000, allow_private=True)


def test_size_cap_from_content_length(server):
    with pytest.raises(InputError, match=r"too large \(0.0 MB\); the limit is 0 MB"):
        fetch(server.url("/file.jpg"), max_bytes=4000, allow_private=True)


def test_size_cap_while_streaming_without_content_length():
    def endless(h):
        h.send_response(200)
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        chunk = b"y" * 8192
        for _ in range(2000):  # 16 MB if nobody stops reading
            h.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        h.wfile.write(b"0\r\n\r\n")

    with LocalServer({"/endless": endless}) as srv:
        t0 = time.perf_counter()
        with pytest.raises(InputError, match="too large"):
            fetch(srv.url("/endless"), max_bytes=100_000, allow_private=True)
        assert time.perf_counter() - t0 < 5


def test_timeout_when_server_does_not_answer():
    def stall(h):
        time.sleep(3)

    with LocalServer({"/stall": stall}) as srv:
        t0 = time.perf_counter()
        with pytest.raises(InputError, match=r"did not finish downloading within 0.5 s"):
            fetch(srv.url("/stall"), max_bytes=1000, timeout_s=0.5, allow_private=True, what="audio")
        assert time.perf_counter() - t0 < 2.5


def test_overall_deadline_against_a_trickling_server():
    def trickle(h):
        h.send_response(200)
        h.send_header("Content-Length", "1000")
        h.end_headers()
        for _ in range(1000):
            h.wfile.write(b"z")
            h.wfile.flush()
            time.sleep(0.05)  # each byte arrives well within the read timeout

    with LocalServer({"/trickle": trickle}) as srv:
        t0 = time.perf_counter()
        with pytest.raises(InputError, match="did not finish downloading within 1 s"):
            fetch(srv.url("/trickle"), max_bytes=10_000, timeout_s=1.0, allow_private=True)
        assert time.perf_counter() - t0 < 3


# ---------------------------------------------------------------- redirects


class _ToLoopback(httpx.BaseTransport):
    """Sends every request to the local server, whatever host the URL names (Host header kept).

    Stands in for "public.test really is a public server", so the redirect logic can be
    tested with a resolver that says public.test is public.
    """

    def __init__(self, port: int):
        self._port = port
        self._inner = httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.url = request.url.copy_with(host="127.0.0.1", port=self._port)
        return self._inner.handle_request(request)

    def close(self) -> None:
        self._inner.close()


def _fake_dns(host: str, port: int) -> list[str]:
    table = {"public.test": [PUBLIC_IP], "cdn.test": ["8.8.8.8"], "rebound.test": ["10.9.8.7"]}
    if host in table:
        return table[host]
    import ipaddress

    ipaddress.ip_address(host.strip("[]"))  # IP literals resolve to themselves
    return [host.strip("[]")]


@pytest.fixture
def redirector():
    body = b"the real file"
    routes = {
        "/ok": (200, {}, body),
        "/to-relative": (302, {"Location": "/ok"}, b""),
        "/to-cdn": (301, {"Location": "http://cdn.test/ok"}, b""),
        "/to-private": (302, {"Location": "http://10.0.0.7/secret"}, b""),
        "/to-metadata": (307, {"Location": "http://169.254.169.254/latest/meta-data/"}, b""),
        "/to-loopback": (302, {"Location": "http://127.0.0.1:1/admin"}, b""),
        "/to-rebound": (302, {"Location": "http://rebound.test/x"}, b""),
        "/to-ipv6-loopback": (302, {"Location": "http://[::1]/x"}, b""),
        "/to-file": (302, {"Location": "file:///etc/passwd"}, b""),
        "/loop": (302, {"Location": "/loop"}, b""),
    }
    with LocalServer(routes) as srv:
        yield srv


def _get(srv, path):
    return fetch(
        f"http://public.test{path}",
        max_bytes=10_000,
        allow_private=False,
        resolver=_fake_dns,
        transport=_ToLoopback(srv.port),
    )


def test_redirects_to_public_hosts_are_followed(redirector):
    got = _get(redirector, "/to-relative")
    assert got.data == b"the real file"
    assert got.final_url == "http://public.test/ok"
    assert got.url == "http://public.test/to-relative"
    assert _get(redirector, "/to-cdn").final_url == "http://cdn.test/ok"


@pytest.mark.parametrize("path", ["/to-private", "/to-metadata", "/to-loopback", "/to-rebound", "/to-ipv6-loopback"])
def test_redirect_to_a_private_address_is_refused(redirector, path):
    with pytest.raises(InputError, match="a local or private network address"):
        _get(redirector, path)
    assert redirector.hits == [path]  # the private target was never requested


def test_redirect_to_another_scheme_is_refused(redirector):
    with pytest.raises(InputError, match="'file:'"):
        _get(redirector, "/to-file")


def test_redirect_loop_stops(redirector):
    with pytest.raises(InputError, match=f"redirects more than {MAX_REDIRECTS} times"):
        _get(redirector, "/loop")
    assert len(redirector.hits) == MAX_REDIRECTS + 1


# ---------------------------------------------------------------- the connection itself


def test_checked_transport_connects_to_the_checked_address(server):
    # "anything.test" exists only in our resolver: the request can only succeed if the
    # transport connects to the address the resolver gave (and that was checked).
    resolver = lambda host, port: ["127.0.0.1"]  # noqa: E731
    with httpx.Client(transport=checked_transport(allow_private=True, resolver=resolver)) as client:
        assert client.get(f"http://anything.test:{server.port}/file.jpg").content == b"x" * 5000


def test_checked_transport_refuses_a_rebinding_answer(server):
    # The pre-check saw a public address; at connect time DNS says loopback (rebinding).
    answers = iter([[PUBLIC_IP], ["127.0.0.1"]])
    resolver = lambda host, port: next(answers)  # noqa: E731
    with pytest.raises(InputError, match="local or private network address"):
        fetch(f"http://rebind.test:{server.port}/file.jpg", max_bytes=10_000, resolver=resolver)
    assert server.hits == []
