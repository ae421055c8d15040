"""The lean keep-alive path for status reads (avatar_core/providers/keepalive.py).

A scripted HTTP server on 127.0.0.1 records every connection and request head, and answers
with the exact bytes each test gives, so framing (Content-Length, chunked, close-delimited),
gzip, connection reuse, servers that close idle connections, broken replies and TLS are all
checked on the wire.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import shutil
import ssl
import subprocess

import httpx
import pytest

from avatar_core.errors import TransientError
from avatar_core.providers.base import JobHandle, Processing, shared_ssl_context
from avatar_core.providers import keepalive
from avatar_core.providers.keepalive import MAX_REPLY_BYTES, KeepAliveReads, proxy_configured
from avatar_core.providers.wavespeed import WaveSpeedProvider

TIMEOUT = httpx.Timeout(5.0, connect=2.0)


def reply(body: bytes = b'{"ok": true}', status: str = "200 OK", headers: tuple[str, ...] = ()) -> bytes:
    head = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", "Content-Type: application/json", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class ScriptedServer:
    """Answers the n-th request with ``answers[n]``: bytes to send, or a special word.

    ``"close"``: close the connection without answering; ``"hang"``: never answer;
    bytes ending in ``b"|close"``: send the bytes before it, then close.
    """

    def __init__(self, answers, tls: ssl.SSLContext | None = None) -> None:
        self.answers = list(answers)
        self.tls = tls
        self.connections = 0
        self.requests: list[tuple[int, str, dict[str, str]]] = []  # (connection no., request line, headers)
        self.server = None

    async def __aenter__(self) -> ScriptedServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()

    @property
    def url(self) -> str:
        port = self.server.sockets[0].getsockname()[1]
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                line, *fields = head.decode().split("\r\n")
                headers = {k.strip().lower(): v.strip() for k, _, v in (f.partition(":") for f in fields if f)}
                self.requests.append((number, line, headers))
                answer = self.answers.pop(0)
                if answer == "close":
                    return
                if answer == "hang":
                    await asyncio.sleep(3600)
                if answer.endswith(b"|close"):
                    writer.write(answer[: -len(b"|close")])
                    await writer.drain()
                    return
                writer.write(answer)
                await writer.drain()
        finally:
            writer.close()


def reads(server: ScriptedServer, **kw) -> KeepAliveReads:
    kw.setdefault("ssl_context", shared_ssl_context())
    kw.setdefault("timeout", TIMEOUT)
    return KeepAliveReads(server.url, [("Authorization", "Bearer k-123"), ("User-Agent", "t")], **kw)


async def test_reads_share_one_connection_and_send_the_right_head():
    async with ScriptedServer([reply(b'{"n": 1}'), reply(b'{"n": 2}'), reply(b'{"n": 3}')]) as srv:
        client = reads(srv)
        first = await client.get("/api/v3/predictions/abc/result")
        second = await client.get("/status", params={"logs": "1", "q": "a b"})
        third = await client.get(srv.url + "/other", headers={"authorization": "Bearer fresh"})
        await client.aclose()
        url = srv.url
    assert [r.json() for r in (first, second, third)] == [{"n": 1}, {"n": 2}, {"n": 3}]
    assert srv.connections == 1
    lines = [line for _, line, _ in srv.requests]
    assert lines == ["GET /api/v3/predictions/abc/result HTTP/1.1", "GET /status?logs=1&q=a+b HTTP/1.1",
                     "GET /other HTTP/1.1"]
    port = url.rsplit(":", 1)[1]
    assert [h["host"] for _, _, h in srv.requests] == [f"127.0.0.1:{port}"] * 3
    assert [h["authorization"] for _, _, h in srv.requests] == ["Bearer k-123", "Bearer k-123", "Bearer fresh"]
    assert srv.requests[0][2]["user-agent"] == "t"
    assert str(first.request.url) == url + "/api/v3/predictions/abc/result"


async def test_chunked_and_gzip_replies_are_decoded():
    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5\r\n{\"a\":\r\n3\r\n 1}\r\n0\r\n\r\n")
    packed = gzip.compress(json.dumps({"b": 2}).encode())
    async with ScriptedServer([chunked, reply(packed, headers=("Content-Encoding: gzip",))]) as srv:
        client = reads(srv)
        assert (await client.get("/x")).json() == {"a": 1}
        assert (await client.get("/y")).json() == {"b": 2}
        await client.aclose()
    assert srv.connections == 1


async def test_connection_close_and_close_delimited_replies_open_a_new_connection():
    close_delimited = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{\"c\": 3}|close"
    async with ScriptedServer([reply(headers=("Connection: close",)), close_delimited, reply()]) as srv:
        client = reads(srv)
        assert (await client.get("/1")).json() == {"ok": True}
        assert (await client.get("/2")).json() == {"c": 3}
        assert (await client.get("/3")).status_code == 200
        await client.aclose()
    assert [number for number, _, _ in srv.requests] == [1, 2, 3]


async def test_a_connection_the_server_dropped_while_idle_is_replaced_once():
    # The server takes the second request on the kept connection and closes it unanswered
    # (as a server does that times out idle connections just as the request arrives).
    async with ScriptedServer([reply(), "close", reply(b'{"again": 1}')]) as srv:
        client = reads(srv)
        await client.get("/1")
        assert (await client.get("/2")).json() == {"again": 1}
        await client.aclose()
    assert [(n, line) for n, line, _ in srv.requests] == [(1, "GET /1 HTTP/1.1"), (1, "GET /2 HTTP/1.1"),
                                                         (2, "GET /2 HTTP/1.1")]


async def test_a_fresh_connection_closed_unanswered_is_an_error_not_a_loop():
    async with ScriptedServer(["close", "close"]) as srv:
        client = reads(srv)
        with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
            await client.get("/1")
        await client.aclose()
    assert len(srv.requests) == 1


async def test_a_reply_cut_short_is_a_protocol_error():
    cut = reply(b'{"ok": true, "padding": "xxxxxxxx"}')[:-10] + b"|close"
    async with ScriptedServer([cut]) as srv:
        client = reads(srv)
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get("/1")
        await client.aclose()


@pytest.mark.parametrize("timer", ["asyncio.timeout", "wait_for (Python 3.10)"])
async def test_silence_is_a_read_timeout_and_a_closed_port_a_connect_error(timer, monkeypatch):
    if timer.startswith("wait_for"):
        monkeypatch.setattr(keepalive, "_timeout", None)
    async with ScriptedServer(["hang"]) as srv:
        client = reads(srv, timeout=httpx.Timeout(0.3, connect=1.0))
        with pytest.raises(httpx.ReadTimeout):
            await client.get("/1")
        await client.aclose()
        url = srv.url
    srv.server.close()
    await srv.server.wait_closed()
    client = KeepAliveReads(url, [], ssl_context=shared_ssl_context(), timeout=TIMEOUT)
    with pytest.raises(httpx.ConnectError):
        await client.get("/1")


async def test_an_oversized_reply_is_refused():
    big = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + (b"100000\r\n" + b"x" * 0x100000 + b"\r\n") * 9
    async with ScriptedServer([big + b"|close"]) as srv:
        client = reads(srv)
        with pytest.raises(httpx.RemoteProtocolError, match="larger than"):
            await client.get("/1")
        await client.aclose()
    assert MAX_REPLY_BYTES < 9 * 0x100000


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1, made with the openssl command."""
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is needed (Debian package openssl; .ci/run installs it)")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return cert, key


async def test_https_reads_verify_the_certificate(certificate):
    cert, key = certificate
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    trusting = ssl.create_default_context(cafile=str(cert))
    async with ScriptedServer([reply(b'{"n": 1}'), reply(b'{"n": 2}')], tls=server_tls) as srv:
        client = reads(srv, ssl_context=trusting)
        assert (await client.get("/1")).json() == {"n": 1}
        assert (await client.get("/2")).json() == {"n": 2}
        await client.aclose()
        assert srv.connections == 1
        untrusting = reads(srv)  # the system's CAs do not know this certificate
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await untrusting.get("/3")
        await untrusting.aclose()
    assert len(srv.requests) == 2  # nothing was sent over the unverified connection


def envelope(status: str) -> bytes:
    return reply(json.dumps({"code": 200, "message": "success",
                             "data": {"id": "job-1", "status": status, "outputs": []}}).encode())


async def test_a_provider_polls_over_one_connection_and_maps_failures():
    async with ScriptedServer([envelope("processing"), envelope("processing"), "hang"]) as srv:
        provider = WaveSpeedProvider("ws-key-1", base_url=srv.url, timeout=httpx.Timeout(0.5, connect=1.0))
        handle = JobHandle("wavespeed", "job-1")
        assert isinstance(await provider.status(handle), Processing)
        assert isinstance(await provider.status(handle), Processing)
        with pytest.raises(TransientError, match="did not answer in time"):
            await provider.status(handle)
        await provider.aclose()
    assert [(n, line, h["authorization"]) for n, line, h in srv.requests] == [
        (1, "GET /api/v3/predictions/job-1/result HTTP/1.1", "Bearer ws-key-1")] * 3
    assert "ws-key-1" not in repr(provider._reads)


async def test_with_a_proxy_configured_reads_go_through_httpx(monkeypatch):
    assert not proxy_configured({})
    assert proxy_configured({"HTTPS_PROXY": "http://proxy:3128"})
    assert proxy_configured({"all_proxy": "socks5://proxy:1080"})
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    provider = WaveSpeedProvider("k", base_url="https://api.wavespeed.ai")
    assert provider._reads is None
    await provider.aclose()
    monkeypatch.delenv("HTTPS_PROXY")
    provider = WaveSpeedProvider("k", base_url="https://api.wavespeed.ai")
    assert provider._reads is not None
    await provider.aclose()
