"""Status reads on a lean keep-alive connection: HTTP/1.1 GETs with h11 over asyncio streams.

Why not httpx for these: a busy server follows hundreds of jobs, each reading its status
every few seconds, and each httpx GET costs about 0.8 ms of CPU in the client, the
connection pool and anyio; h11 on an asyncio stream costs about 0.2 ms for the same bytes
(bench/bench_many_jobs.py: 200 jobs need under 0.8 ms per read to stay under 5% of a core).
So the provider's small JSON reads take this path; uploads, submits, cancels and video
downloads stay on httpx. h11 is httpx's own HTTP/1.1 parser (a dependency of httpcore), so
the wire format is not hand-written here: this module only owns the sockets.

Failures are raised as the httpx exceptions httpx itself would raise (``ConnectError``,
``ConnectTimeout``, ``ReadTimeout``, ``RemoteProtocolError``), so callers map them once.
Replies come back as ``httpx.Response`` objects, decoded (gzip) exactly as httpx decodes them.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import time
from typing import NamedTuple
from collections.abc import Iterable, Mapping
from urllib.parse import urlencode, urlsplit

import h11
import httpx

# A status reply is a small JSON object; anything this big is not one.
MAX_REPLY_BYTES = 8 * 1024 * 1024
# Reuse a connection idle at most this long. Servers close idle keep-alive connections
# after 60-75 s (nginx, AWS load balancers) and the slowest polling interval is 12 s, so
# one connection usually serves a job from start to end; a connection the server closed
# anyway is detected and replaced (one retry on a fresh connection, a GET being safe).
IDLE_REUSE_S = 50.0
# Idle connections kept per host: enough for the jobs that poll it at the same moment.
MAX_IDLE_PER_ORIGIN = 8
_READ_SIZE = 64 * 1024
# Prepared requests kept per client: a job polls one or two URLs; Kling's token changes.
_MAX_PREPARED = 32
_END = h11.EndOfMessage()

_PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy")


def proxy_configured(environ: Mapping[str, str] = os.environ) -> bool:
    """True when the environment asks for a proxy: then every request goes through httpx,
    which honours it (this module talks to hosts directly)."""
    return any(environ.get(name) or environ.get(name.upper()) for name in _PROXY_VARIABLES)


class _Prepared(NamedTuple):
    origin: tuple[str, str, int]
    request: h11.Request  # an immutable event, sent again on every poll
    echo: httpx.Request  # what the returned httpx.Response says it answered


class _Connection:
    __slots__ = ("http", "idle_since", "reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.http = h11.Connection(h11.CLIENT, max_incomplete_event_size=64 * 1024)
        self.idle_since = 0.0

    def reusable(self, now: float) -> bool:
        return now - self.idle_since < IDLE_REUSE_S and not self.reader.at_eof() and not self.writer.is_closing()

    def close(self) -> None:
        self.writer.close()


class KeepAliveReads:
    """GET requests over a few reused connections per host, for one provider client.

    ``headers`` are sent with every request (the provider's auth among them; never logged);
    ``headers`` given to :meth:`get` override them by name.
    """

    def __init__(
        self,
        base_url: str,
        headers: Iterable[tuple[str, str]],
        *,
        ssl_context: ssl.SSLContext,
        timeout: httpx.Timeout,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = {name.lower(): (name, value) for name, value in headers}
        self._ssl = ssl_context
        self._connect_timeout = timeout.connect
        self._read_timeout = timeout.read
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._prepared: dict[tuple, _Prepared] = {}

    def __repr__(self) -> str:  # never shows headers (they hold the key)
        return f"<KeepAliveReads {self.base_url}>"

    async def get(
        self, url: str, *, params: Mapping[str, str] | None = None, headers: Mapping[str, str] | None = None
    ) -> httpx.Response:
        """One GET; the whole reply is read (up to MAX_REPLY_BYTES) before it is returned."""
        key = (url, tuple((params or {}).items()), tuple((headers or {}).items()))
        prepared = self._prepared.get(key)
        if prepared is None:
            if len(self._prepared) >= _MAX_PREPARED:
                self._prepared.clear()
            prepared = self._prepared[key] = self._prepare(url, params, headers)
        conn = self._take_idle(prepared.origin)
        if conn is not None:
            try:
                return await self._exchange(conn, prepared)
            except _StaleConnection:
                pass  # the server closed it while it was idle: the GET never reached it
        conn = await self._connect(prepared.origin)
        try:
            return await self._exchange(conn, prepared)
        except _StaleConnection as exc:
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.") from exc

    def _prepare(self, url: str, params, headers) -> _Prepared:
        """Everything about a GET that does not change from one poll to the next."""
        full = url if "://" in url else self.base_url + url
        if params:
            full += ("&" if "?" in full else "?") + urlencode(params)
        parts = urlsplit(full)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise httpx.UnsupportedProtocol(f"Cannot read {parts.scheme or 'a relative'} URL.")
        default_port = 443 if parts.scheme == "https" else 80
        origin = (parts.scheme, parts.hostname, parts.port or default_port)
        send = dict(self._headers)
        for name, value in (headers or {}).items():
            send[name.lower()] = (name, value)
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname  # IPv6 literal
        if origin[2] != default_port:
            host += f":{origin[2]}"
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return _Prepared(
            origin,
            h11.Request(method="GET", target=target, headers=[("Host", host), *send.values()]),
            httpx.Request("GET", full),
        )

    async def aclose(self) -> None:
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()

    # -- connections -----------------------------------------------------------------

    def _take_idle(self, origin) -> _Connection | None:
        conns = self._idle.get(origin)
        now = time.monotonic()
        while conns:
            conn = conns.pop()
            if conn.reusable(now):
                return conn
            conn.close()
        return None

    def _put_idle(self, origin, conn: _Connection) -> None:
        conns = self._idle.setdefault(origin, [])
        if len(conns) >= MAX_IDLE_PER_ORIGIN:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        conns.append(conn)

    async def _connect(self, origin) -> _Connection:
        scheme, host, port = origin
        tls = self._ssl if scheme == "https" else None
        try:
            reader, writer = await _within(
                self._connect_timeout,
                asyncio.open_connection(host, port, ssl=tls, server_hostname=host if tls else None, limit=_READ_SIZE),
            )
        except TimeoutError as exc:
            raise httpx.ConnectTimeout("Timed out while connecting.") from exc
        except (OSError, ssl.SSLError) as exc:  # refused, unreachable, name lookup, certificate
            raise httpx.ConnectError(f"{type(exc).__name__}: {exc}") from exc
        return _Connection(reader, writer)

    # -- one request and its reply ---------------------------------------------------

    async def _exchange(self, conn: _Connection, prepared: _Prepared) -> httpx.Response:
        try:
            head, body, received_any = await _within(self._read_timeout, self._roundtrip(conn, prepared.request))
        except TimeoutError as exc:
            conn.close()
            raise httpx.ReadTimeout("Timed out while reading the reply.") from exc
        except BaseException:
            conn.close()
            raise
        if head is None:
            conn.close()
            if not received_any:
                raise _StaleConnection()
            raise httpx.RemoteProtocolError("Server disconnected in the middle of a reply.")
        if conn.http.our_state is h11.DONE and conn.http.their_state is h11.DONE:
            conn.http.start_next_cycle()
            self._put_idle(prepared.origin, conn)
        else:  # "Connection: close", or a reply h11 cannot reuse
            conn.close()
        return httpx.Response(
            head.status_code,
            headers=head.headers.raw_items(),
            content=body,
            request=prepared.echo,
        )

    async def _roundtrip(self, conn: _Connection, request: h11.Request):
        """(response head, body, whether any byte came back); head None if the reply broke off."""
        http = conn.http
        try:
            conn.writer.write(http.send(request) + http.send(_END))
            await conn.writer.drain()
        except (ConnectionError, OSError):
            return None, b"", False
        head = None
        body = bytearray()
        received_any = False
        while True:
            try:
                event = http.next_event()
            except h11.RemoteProtocolError as exc:
                if not received_any:
                    return None, b"", False
                raise httpx.RemoteProtocolError(str(exc)) from exc
            if event is h11.NEED_DATA:
                try:
                    data = await conn.reader.read(_READ_SIZE)
                except (ConnectionError, OSError):
                    data = b""
                if not data and head is None:
                    return None, b"", received_any
                received_any = received_any or bool(data)
                try:
                    http.receive_data(data)
                except h11.RemoteProtocolError as exc:
                    raise httpx.RemoteProtocolError(str(exc)) from exc
            elif isinstance(event, h11.Response):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_REPLY_BYTES:
                    raise httpx.RemoteProtocolError(f"The reply is larger than {MAX_REPLY_BYTES // 2**20} MB.")
            elif isinstance(event, h11.EndOfMessage):
                if head is None:
                    raise httpx.RemoteProtocolError("A reply ended before its status line.")
                return head, bytes(body), True
            elif isinstance(event, h11.ConnectionClosed):
                return None, b"", received_any
            # h11.InformationalResponse (1xx): wait for the real reply


async def _within(seconds: float | None, awaitable):
    """``await awaitable`` or raise asyncio.TimeoutError after ``seconds``.

    asyncio.timeout (Python 3.11+) runs the awaitable in the current task; wait_for, the
    fallback, wraps it in a new task per call, which a status read would pay every time.
    """
    if _timeout is None:
        return await asyncio.wait_for(awaitable, seconds)
    async with _timeout(seconds):
        return await awaitable


_timeout = getattr(asyncio, "timeout", None)


class _StaleConnection(Exception):
    """The connection was closed by the server before any reply byte came back."""
