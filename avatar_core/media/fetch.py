"""Fetch a user-given http(s) URL for checking, safely (no SSRF, size cap, time limit).

A public deployment must not let a user make the server fetch from its own network
(loopback, 10.x, 169.254.169.254 cloud metadata, ...). So:

* only ``http`` and ``https`` URLs; ``file:``, ``ftp:``, ``data:`` and the rest are refused;
* the host is resolved and EVERY address must be public (:func:`address_allowed`, a pure
  function), on the first request and again on every redirect (followed by hand, at
  most :data:`MAX_REDIRECTS`);
* the connection itself goes to the address that was checked (the default transport's
  network backend resolves, checks and connects in one step), so a DNS answer that
  changes between check and connect (DNS rebinding) cannot slip through;
* the body is streamed with a byte cap and an overall deadline, so a slow or endless
  server cannot hold the app.

``allow_private=True`` (``Settings.allow_private_urls``) lifts the address check for a
trusted local setup; the scheme check, size cap and deadline still apply.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from dataclasses import dataclass
from collections.abc import Callable
from urllib.parse import unquote

import httpcore
import httpx

from ..errors import InputError

ALLOWED_SCHEMES = ("http", "https")
# Browsers allow ~20; real file links (CDN, share links) need one or two. Five is plenty
# and bounds the number of checks an attacker can make us do.
MAX_REDIRECTS = 5
# Whole-download deadline. A 25 MB file on a slow 10 Mbit/s line takes ~20 s.
DEFAULT_TIMEOUT_S = 30.0

Resolver = Callable[[str, int], list[str]]
"""(host, port) -> IP address strings. Injectable so tests need no real DNS."""


def system_resolver(host: str, port: int) -> list[str]:
    """Resolve with the operating system (getaddrinfo); IP literals come back as they are."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: list[str] = []
    for info in infos:
        ip = info[4][0]
        if ip not in seen:
            seen.append(ip)
    return seen


def address_allowed(ip: str, *, allow_private: bool = False) -> bool:
    """True when we may connect to ``ip``.

    Without ``allow_private`` only globally routable unicast addresses pass: loopback,
    private (10/8, 172.16/12, 192.168/16, fc00::/7), link-local (169.254/16, fe80::/10),
    carrier-grade NAT, documentation, unspecified (0.0.0.0, ::) and reserved ranges are
    refused. IPv4-mapped IPv6 (``::ffff:127.0.0.1``) is judged as the IPv4 it carries.
    Multicast is refused even with ``allow_private``.
    """
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if addr.is_multicast:
        return False
    if allow_private:
        return True
    return bool(addr.is_global) and not (addr.is_unspecified or addr.is_reserved or addr.is_loopback
                                         or addr.is_link_local or addr.is_private)


def check_scheme(url: str) -> httpx.URL:
    """Parse ``url`` and refuse anything but http(s) with a host."""
    text = (url or "").strip()
    scheme = text.split(":", 1)[0].lower() if ":" in text else ""
    if scheme not in ALLOWED_SCHEMES:
        shown = f"'{scheme}:'" if scheme else "no scheme"
        raise InputError(
            f"Only web links starting with http:// or https:// can be used (this one has {shown}). "
            "For a file on this computer, upload the file instead."
        )
    try:
        parsed = httpx.URL(text)
    except (httpx.InvalidURL, ValueError) as exc:
        raise InputError(f"The link {text[:200]!r} is not a valid web address. Copy it again.") from exc
    if not parsed.host:
        raise InputError(f"The link {text[:200]!r} has no server name. Copy the full address again.")
    return parsed


def _port(url: httpx.URL) -> int:
    return url.port or (443 if url.scheme == "https" else 80)


def check_host(host: str, port: int, *, allow_private: bool, resolver: Resolver) -> list[str]:
    """Resolve ``host`` and return its addresses if ALL may be contacted; else InputError."""
    try:
        ips = resolver(host, port)
    except (OSError, UnicodeError) as exc:
        raise InputError(f"The server {host} could not be found. Check the link.") from exc
    if not ips:
        raise InputError(f"The server {host} could not be found. Check the link.")
    bad = [ip for ip in ips if not address_allowed(ip, allow_private=allow_private)]
    if bad:
        where = host if host.strip("[]") == bad[0] else f"{host} ({bad[0]})"
        raise InputError(
            f"The link points to {where}, a local or private network address, which this app does not "
            "fetch from. Use a public link, or upload the file instead."
        )
    return ips


class _CheckedBackend(httpcore.NetworkBackend):
    """Connects only to addresses that passed :func:`check_host`, the ones it just checked."""

    def __init__(self, inner: httpcore.NetworkBackend, *, allow_private: bool, resolver: Resolver) -> None:
        self._inner = inner
        self._allow_private = allow_private
        self._resolver = resolver

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        ips = check_host(host, port, allow_private=self._allow_private, resolver=self._resolver)
        last: Exception | None = None
        for ip in ips:
            try:
                return self._inner.connect_tcp(ip, port, timeout=timeout, local_address=local_address,
                                               socket_options=socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        assert last is not None
        raise last

    def connect_unix_socket(self, *a, **kw):  # pragma: no cover - never used for URLs
        raise httpcore.ConnectError("unix sockets are not allowed")

    def sleep(self, seconds: float) -> None:  # pragma: no cover
        self._inner.sleep(seconds)


def checked_transport(*, allow_private: bool, resolver: Resolver = system_resolver) -> httpx.BaseTransport:
    """An httpx transport whose connections go only to checked addresses."""
    transport = httpx.HTTPTransport(retries=0)
    pool = getattr(transport, "_pool", None)
    if pool is not None and hasattr(pool, "_network_backend"):
        pool._network_backend = _CheckedBackend(pool._network_backend, allow_private=allow_private, resolver=resolver)
    return transport


def endpoint(url: httpx.URL) -> tuple[str, int]:
    """(host lower-cased, port with the scheme's default filled in) of ``url``."""
    return (url.host or "").lower(), _port(url)


class _AsyncCheckedBackend(httpcore.AsyncNetworkBackend):
    """The async twin of :class:`_CheckedBackend`; ``trusted`` endpoints connect unchecked.

    The resolver is blocking (getaddrinfo), so it runs in a worker thread.
    """

    def __init__(self, inner: httpcore.AsyncNetworkBackend, *, allow_private: bool, resolver: Resolver,
                 trusted: frozenset) -> None:
        self._inner = inner
        self._allow_private = allow_private
        self._resolver = resolver
        self._trusted = trusted

    async def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):  # noqa: ASYNC109 - httpcore's signature
        if (str(host).lower(), port) in self._trusted:
            return await self._inner.connect_tcp(host, port, timeout=timeout, local_address=local_address,
                                                 socket_options=socket_options)
        import anyio.to_thread

        ips = await anyio.to_thread.run_sync(
            lambda: check_host(host, port, allow_private=self._allow_private, resolver=self._resolver))
        last: Exception | None = None
        for ip in ips:
            try:
                return await self._inner.connect_tcp(ip, port, timeout=timeout, local_address=local_address,
                                                     socket_options=socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        assert last is not None
        raise last

    async def connect_unix_socket(self, *a, **kw):  # pragma: no cover - never used for URLs
        raise httpcore.ConnectError("unix sockets are not allowed")

    async def sleep(self, seconds: float) -> None:  # pragma: no cover
        await self._inner.sleep(seconds)


def async_checked_transport(*, allow_private: bool, resolver: Resolver = system_resolver,
                            trusted: frozenset = frozenset(), **kwargs) -> httpx.AsyncBaseTransport:
    """An async httpx transport whose connections go only to checked addresses (or ``trusted``
    endpoints). ``kwargs`` go to ``httpx.AsyncHTTPTransport`` (``verify=...``)."""
    transport = httpx.AsyncHTTPTransport(retries=0, **kwargs)
    pool = getattr(transport, "_pool", None)
    if pool is None or not hasattr(pool, "_network_backend"):  # pragma: no cover - httpx internals moved
        raise RuntimeError("this httpx version hides its connection pool; the address check cannot be installed")
    pool._network_backend = _AsyncCheckedBackend(pool._network_backend, allow_private=allow_private,
                                                 resolver=resolver, trusted=frozenset(trusted))
    return transport


@dataclass(frozen=True)
class Fetched:
    """A downloaded body. ``url`` is what the user gave, ``final_url`` where it came from."""

    url: str
    final_url: str
    content_type: str
    data: bytes

    @property
    def filename(self) -> str:
        """The last path segment of the final URL (may be empty)."""
        return unquote(httpx.URL(self.final_url).path.rsplit("/", 1)[-1])


def fetch(
    url: str,
    *,
    max_bytes: int,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    allow_private: bool = False,
    resolver: Resolver = system_resolver,
    transport: httpx.BaseTransport | None = None,
    clock: Callable[[], float] = time.monotonic,
    what: str = "file",
) -> Fetched:
    """GET ``url`` with every safety check (see module doc); raise InputError on any problem.

    ``transport`` replaces the checked transport (tests); the per-hop address check
    still runs through ``resolver``. ``what`` names the thing in messages ("image").
    """
    start = clock()
    current = check_scheme(url)
    own_transport = transport is None
    transport = transport or checked_transport(allow_private=allow_private, resolver=resolver)
    timeout = httpx.Timeout(timeout_s)
    try:
        with httpx.Client(transport=transport, timeout=timeout, follow_redirects=False, trust_env=False) as client:
            for _hop in range(MAX_REDIRECTS + 1):
                check_host(current.host, _port(current), allow_private=allow_private, resolver=resolver)
                try:
                    with client.stream("GET", current, headers={"Accept": "*/*"}) as resp:
                        if resp.is_redirect:
                            location = resp.headers.get("location")
                            if not location:
                                raise InputError(f"The link to the {what} redirects nowhere. Check the link.")
                            current = check_scheme(str(current.join(location)))
                            continue
                        if resp.status_code != 200:
                            raise InputError(
                                f"The server answered HTTP {resp.status_code} for the {what} link "
                                f"({_short(current)}). Check that the link works in a browser."
                            )
                        declared = resp.headers.get("content-length")
                        if declared and declared.isdigit() and int(declared) > max_bytes:
                            raise _too_big(what, int(declared), max_bytes)
                        body = bytearray()
                        for chunk in resp.iter_bytes():  # as it arrives, so the deadline is seen
                            body += chunk
                            if len(body) > max_bytes:
                                raise _too_big(what, None, max_bytes)
                            if clock() - start > timeout_s:
                                raise _too_slow(what, timeout_s)
                        if not body:
                            raise InputError(f"The {what} link returned an empty file. Check the link.")
                        return Fetched(
                            url=url,
                            final_url=str(current),
                            content_type=resp.headers.get("content-type", "").split(";")[0].strip(),
                            data=bytes(body),
                        )
                except httpx.TimeoutException as exc:
                    raise _too_slow(what, timeout_s) from exc
                except httpx.TransportError as exc:
                    if isinstance(exc.__context__, InputError):  # our own check, raised in the backend
                        raise exc.__context__ from None
                    raise InputError(
                        f"Could not download the {what} from {current.host} ({type(exc).__name__}). "
                        "Check the link, or upload the file instead."
                    ) from exc
            raise InputError(
                f"The {what} link redirects more than {MAX_REDIRECTS} times. Use the final address of the file."
            )
    finally:
        if own_transport:
            transport.close()


def _short(url: httpx.URL) -> str:
    text = str(url.copy_with(query=None, fragment=None))
    return text if len(text) <= 80 else text[:77] + "..."


def _too_big(what: str, size: int | None, limit: int) -> InputError:
    got = f" ({size / 1e6:.1f} MB)" if size else ""
    return InputError(
        f"The {what} at that link is too large{got}; the limit is {limit / 1e6:.0f} MB. "
        "Use a smaller file or upload it directly."
    )


def _too_slow(what: str, timeout_s: float) -> InputError:
    return InputError(
        f"The {what} link did not finish downloading within {timeout_s:g} s. Try again later, or upload the file instead."
    )


def is_url(source: object) -> bool:
    """True when ``source`` looks like a URL (anything with a scheme) rather than a local path."""
    if not isinstance(source, str):
        return False
    head = source.strip().split(":", 1)
    return len(head) == 2 and len(head[0]) > 1 and head[0].replace("+", "").replace("-", "").replace(".", "").isalnum() \
        and head[0][0].isalpha()

