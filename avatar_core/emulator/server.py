"""The emulator core: one loopback HTTP server that provider protocol modules plug into.

The core knows nothing about any one provider. It owns what every protocol shares:

- the HTTP server (stdlib ``ThreadingHTTPServer``, so faults can close the raw socket),
- a routing table that protocol modules fill (:class:`Protocol.routes`),
- the record of every request received (:attr:`Emulator.requests`),
- scripted faults, consumed in order (:attr:`Emulator.faults`),
- the job store and its timing (queued -> processing -> completed/failed -> expired),
  driven by an injectable clock and overridable per job with a :class:`JobPlan`,
- storage of uploaded files and of rendered result videos, served under ``/emulator/``.

A protocol module (``wavespeed.py``, ``segmind.py``, ...) only maps its URLs, field
names, status words and error bodies onto these pieces.
"""

from __future__ import annotations

import base64
import binascii
import email.message
import email.utils
import hashlib
import json
import mimetypes
import re
import secrets
import socket
import sys
import threading
import time
import traceback
import urllib.parse
from dataclasses import dataclass, field
from datetime import datetime, UTC
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from collections.abc import Callable, Iterable, Iterator, Mapping

from .video import VideoCache, VideoMaker, default_video_maker

Clock = Callable[[], float]

# Phases a job goes through; each protocol maps them onto its own status words.
QUEUED, PROCESSING, COMPLETED, FAILED, EXPIRED = "queued", "processing", "completed", "failed", "expired"
# A job cancelled (by :meth:`Emulator.cancel_job`) before it ended.
CANCELLED = "cancelled"

# How long a GET of a result video waits for its render before answering 504. The real
# renderer needs a few seconds per second of audio on 2 cores; 10 minutes covers a 300 s track.
RENDER_WAIT_S = 600.0

# A keep-alive connection idle this long is closed, so stopped servers do not leak threads.
IDLE_CONNECTION_S = 30.0

# Size of the chunks a "huge" answer streams; big enough to be fast, small enough to notice
# that the client hung up.
_STREAM_CHUNK = 64 * 1024

_FAULT_KINDS = ("status", "app_error", "slow", "drop", "malformed_json", "html", "body", "huge")


# ---------------------------------------------------------------------------- faults


@dataclass(frozen=True)
class Fault:
    """One scripted misbehaviour, applied to the next ``count`` requests that match.

    ``path`` is a regular expression searched in the request path (no query string);
    ``method`` limits it to one HTTP method. ``count=None`` applies it forever.

    Kinds:

    - ``"status"``: answer HTTP ``status`` (default 500) with the protocol's own error
      body and, when ``retry_after`` is set, a ``Retry-After`` header (seconds, or any
      string such as an HTTP date). Covers 429, 5xx bursts, Segmind's 406, 403/404.
    - ``"app_error"``: the protocol's "application error" (WaveSpeed: HTTP 200 with
      ``{"code": 500, "message": ...}``); protocols without one answer 500.
    - ``"slow"``: sleep ``delay_s`` (real seconds), then answer normally.
    - ``"drop"``: close the socket without answering. With ``process=True`` (default) the
      request is handled first, so a submit creates its job: "sent, but no answer".
      ``process=False`` drops it unhandled.
    - ``"malformed_json"``: HTTP ``status`` (default 200), JSON content type, broken body.
    - ``"html"``: HTTP ``status`` (default 200) with an HTML page (a captive portal or a
      proxy's error page).
    - ``"body"``: HTTP ``status`` (default 200) with ``body`` (dict/list -> JSON, str, bytes).

      For ``"malformed_json"``, ``"html"`` and ``"body"``, ``handle=True`` runs the request
      first, so a submit creates its (paid) job and the client gets an answer it cannot read.
    - ``"huge"``: HTTP 200, ``Content-Length: size`` (unless ``declare=False``, then
      chunked) and ``size`` bytes of zeros, until the client hangs up.
    """

    kind: str
    path: str = ".*"
    count: int | None = 1
    method: str | None = None
    status: int | None = None
    retry_after: float | str | None = None
    message: str | None = None
    delay_s: float = 0.0
    process: bool = True
    body: Any = None
    content_type: str | None = None
    size: int = 0
    declare: bool = True
    handle: bool = False

    def __post_init__(self) -> None:
        if self.kind not in _FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; use one of {', '.join(_FAULT_KINDS)}")
        re.compile(self.path)

    def matches(self, method: str, path: str) -> bool:
        if self.method and self.method.upper() != method.upper():
            return False
        return re.search(self.path, path) is not None


class FaultList:
    """The scripted faults, thread-safe, consumed first-added-first."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[list[Any]] = []  # [fault, remaining or None]

    def add(self, *faults: Fault) -> Fault:
        """Queue faults; returns the last one (handy for a single ``add``)."""
        with self._lock:
            for fault in faults:
                self._items.append([fault, fault.count])
        return faults[-1]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def pending(self) -> list[Fault]:
        """Faults not yet used up, in order."""
        with self._lock:
            return [f for f, _n in self._items]

    def take(self, method: str, path: str) -> Fault | None:
        """The first fault matching this request, counting one use of it."""
        with self._lock:
            for item in self._items:
                fault, remaining = item
                if not fault.matches(method, path):
                    continue
                if remaining is not None:
                    item[1] = remaining - 1
                    if item[1] <= 0:
                        self._items.remove(item)
                return fault
        return None


# ---------------------------------------------------------------------------- job plans


@dataclass(frozen=True)
class JobPlan:
    """How one submitted job behaves (timing, outcome, and its result video).

    ``queue_s``/``processing_s`` override the server's timing for this job;
    ``complete_at`` (a value of the emulator's clock) makes it finish exactly then.
    ``fail`` makes it end FAILED with that message instead of completing.
    ``status_value`` replaces the protocol's status word (an unknown value, say).
    ``video`` is what the result URL serves: ``"ok"`` (the MP4), ``"403"``, ``"404"``,
    ``"html"`` (an HTML page with HTTP 200), ``"huge"`` (``huge_bytes`` of zeros,
    with ``Content-Length`` unless ``huge_declared=False``), or ``"redirect"`` (HTTP 302
    to ``redirect_to``). ``video_link`` replaces the result link the provider reports
    (a link to somewhere else entirely).
    """

    queue_s: float | None = None
    processing_s: float | None = None
    complete_at: float | None = None
    fail: str | None = None
    status_value: str | None = None
    video: str = "ok"
    huge_bytes: int = 2 * 1024**3
    huge_declared: bool = True
    redirect_to: str | None = None
    video_link: str | None = None

    def __post_init__(self) -> None:
        if self.video not in ("ok", "403", "404", "html", "huge", "redirect"):
            raise ValueError(f"unknown video behaviour {self.video!r}")
        if (self.video == "redirect") != (self.redirect_to is not None):
            raise ValueError('video="redirect" and redirect_to go together')


# ---------------------------------------------------------------------------- records


@dataclass(frozen=True)
class FormPart:
    """One part of a multipart/form-data body, as received."""

    name: str
    filename: str | None
    content_type: str | None
    data: bytes = field(repr=False)

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the emulator received it.

    ``headers`` has lower-cased names; ``query`` maps each name to its values;
    ``json`` is the parsed body when it was JSON (else None); ``form`` holds multipart
    parts (field names, filenames, sizes); ``at`` is the emulator's clock, ``wall`` is
    ``time.time()``.
    """

    method: str
    path: str
    query: Mapping[str, list[str]]
    headers: Mapping[str, str]
    body: bytes = field(repr=False)
    json: Any
    form: tuple[FormPart, ...]
    at: float
    wall: float

    def header(self, name: str, default: str | None = None) -> str | None:
        return self.headers.get(name.lower(), default)

    def param(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[0] if values else None

    @property
    def field_names(self) -> list[str]:
        return [p.name for p in self.form]


class RequestLog:
    """Thread-safe, append-only list of :class:`RecordedRequest` (supports len, [i], iter)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[RecordedRequest] = []

    def append(self, item: RecordedRequest) -> None:
        with self._lock:
            self._items.append(item)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def snapshot(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._items)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def __getitem__(self, index):
        with self._lock:
            return self._items[index]

    def __iter__(self) -> Iterator[RecordedRequest]:
        return iter(self.snapshot())

    def to(self, method: str | None, path_regex: str) -> list[RecordedRequest]:
        """Requests with this method (None: any) whose path matches (``re.search``)."""
        return [
            r
            for r in self.snapshot()
            if (method is None or r.method == method.upper()) and re.search(path_regex, r.path)
        ]


# ---------------------------------------------------------------------------- responses


@dataclass
class Response:
    """What a handler answers. ``body`` may be bytes or an iterable of chunks
    (then ``length`` is sent as Content-Length, or the body goes chunked)."""

    status: int = 200
    body: bytes | Iterable[bytes] = b""
    content_type: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    length: int | None = None
    drop: bool = False  # close the socket without answering


def json_response(status: int, obj: Any, headers: Mapping[str, str] | None = None) -> Response:
    return Response(status, json.dumps(obj).encode(), "application/json", dict(headers or {}))


def html_response(status: int, title: str = "Just a moment...") -> Response:
    page = (
        f"<!DOCTYPE html><html><head><title>{title}</title></head>"
        f"<body><h1>{title}</h1><p>Please enable cookies.</p></body></html>"
    )
    return Response(status, page.encode(), "text/html; charset=utf-8")


def zeros(size: int) -> Iterator[bytes]:
    chunk = b"\0" * _STREAM_CHUNK
    left = size
    while left > 0:
        n = min(left, _STREAM_CHUNK)
        yield chunk if n == _STREAM_CHUNK else chunk[:n]
        left -= n


# ---------------------------------------------------------------------------- storage


@dataclass
class StoredFile:
    """An uploaded file (``data`` is None until a presigned PUT delivers it)."""

    id: str
    filename: str
    content_type: str
    data: bytes | None = field(default=None, repr=False)
    declared_size: int | None = None
    put_token: str | None = field(default=None, repr=False)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data or b"").hexdigest()


@dataclass(frozen=True)
class ReceivedInput:
    """The bytes behind one input reference of a job, as the provider would have fetched
    them (an upload, a loopback URL or a decoded data: URI), with the MIME type they came
    labelled with: the upload's or the data URI's declared type, never checked against the
    bytes (Kling's raw base64 carries no type; its protocol module sniffs one)."""

    data: bytes = field(repr=False)
    content_type: str

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass
class Job:
    """A submitted job. Timing is in the emulator's clock; ``plan`` says how it behaves.

    ``inputs`` are the references as submitted; ``received`` holds, under the same names
    (``image``, ``audio``), what those references turned out to contain when the job was
    created: the files the model would work on. An input that could not be read is
    missing from it (and ``input_error`` says why).
    """

    id: str
    protocol: str
    model: str
    tier: str
    submitted_at: float
    created_wall: float
    queue_s: float
    processing_s: float
    plan: JobPlan
    inputs: Mapping[str, Any] = field(default_factory=dict)
    received: dict[str, ReceivedInput] = field(default_factory=dict, repr=False)
    webhook: str | None = None
    input_error: str | None = None
    complete_at: float | None = None
    cancelled_at: float | None = None
    video_key: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def starts_at(self) -> float:
        return min(self.submitted_at + self.queue_s, self.ends_at)

    @property
    def ends_at(self) -> float:
        if self.complete_at is not None:
            return self.complete_at
        if self.plan.complete_at is not None:
            return self.plan.complete_at
        return self.submitted_at + self.queue_s + self.processing_s

    @property
    def failure(self) -> str | None:
        return self.plan.fail or self.input_error

    @property
    def created_at_iso(self) -> str:
        return datetime.fromtimestamp(self.created_wall, UTC).isoformat(timespec="milliseconds").replace(
            "+00:00", "Z"
        )

    @property
    def inference_s(self) -> float:
        return max(0.0, self.ends_at - self.starts_at)

    def phase(self, now: float, retention_s: float) -> str:
        if now - self.submitted_at >= retention_s:
            return EXPIRED
        if self.cancelled_at is not None and now >= self.cancelled_at:
            return CANCELLED
        if now < self.starts_at:
            return QUEUED
        if now < self.ends_at:
            return PROCESSING
        return FAILED if self.failure else COMPLETED


# ---------------------------------------------------------------------------- protocols


Handler = Callable[["Context"], Response]


@dataclass(frozen=True)
class Route:
    method: str
    pattern: re.Pattern
    handler: Handler
    protocol: Protocol | None


class Protocol:
    """Base for one provider's protocol. Subclasses set ``name`` and ``prefixes`` and
    return their routes; they answer errors in their own body shape."""

    name = "generic"
    #: Paths starting with these belong to this protocol (404/405 bodies in its shape).
    prefixes: tuple[str, ...] = ()

    def __init__(self, emulator: Emulator) -> None:
        self.emu = emulator

    def routes(self) -> list[tuple[str, str, Handler]]:
        """(method, path regex matched in full, handler) in priority order.

        All mounted protocols share one table, tried in mount order, so patterns must be
        specific enough not to swallow another provider's paths (Segmind's ``/v1/{slug}``
        only takes ``kling-*`` slugs, leaving ``/v1/files`` etc. to others)."""
        return []

    def error(self, status: int, message: str) -> Response:
        """An HTTP error in this provider's body shape."""
        return json_response(status, {"error": message})

    def app_error(self, message: str) -> Response:
        """An application error the way this provider sends one (default: HTTP 500)."""
        return self.error(500, message)

    @staticmethod
    def missing_fields(body: Any, keys: tuple[str, ...]) -> list[str] | None:
        """None when ``body`` is not a JSON object, else the ``keys`` without a non-empty string."""
        if not isinstance(body, dict):
            return None
        return [k for k in keys if not isinstance(body.get(k), str) or not body.get(k)]

    def finalize(self, response: Response) -> Response:
        """Last touch on every answer of this protocol (headers it always sends)."""
        return response

    def env_lines(self, base_url: str) -> list[str]:
        """Settings that point a client at this emulator."""
        return []

    def reset(self) -> None:
        """Forget per-protocol state."""


DEFAULT_MESSAGES = {
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    406: "Insufficient credits",
    413: "Payload too large",
    422: "Unprocessable entity",
    429: "Too many requests",
    500: "Internal server error",
    502: "Bad gateway",
    503: "Service unavailable",
    504: "Gateway timeout",
}


@dataclass
class Context:
    """What a handler gets: the request, the route's match, and the emulator."""

    emu: Emulator
    request: RecordedRequest
    match: re.Match
    protocol: Protocol | None

    @property
    def base_url(self) -> str:
        return self.emu.url

    def error(self, status: int, message: str | None = None) -> Response:
        message = message or DEFAULT_MESSAGES.get(status, f"HTTP {status}")
        if self.protocol is None:
            return json_response(status, {"error": message})
        return self.protocol.error(status, message)


# ---------------------------------------------------------------------------- the server


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    # Many clients connecting at once (load tests, 200-job benches); the default backlog
    # of 5 drops connections.
    request_queue_size = 1024
    emulator: Emulator

    def handle_error(self, request, client_address) -> None:
        # A client that hangs up mid-answer (fault tests, Stop, a size cap) leaves bytes in
        # the handler's write buffer, and the stdlib's last flush then fails: expected, quiet.
        if isinstance(sys.exc_info()[1], (ConnectionError, socket.timeout)):
            return
        super().handle_error(request, client_address)


class _RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the real hosts
    timeout = IDLE_CONNECTION_S
    # A buffered writer, flushed after each answer (by the stdlib) and after each streamed
    # piece (by _send): a small answer leaves in one send, head and body together, as from
    # a real host, instead of two (two wake-ups of the client per status read).
    wbufsize = 64 * 1024
    # Without this, a second send waits ~40 ms for the client's delayed ACK.
    disable_nagle_algorithm = True
    server: _QuietServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _handle(self) -> None:
        self.server.emulator._dispatch(self)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _handle


def _read_body(handler: BaseHTTPRequestHandler) -> bytes:
    if "chunked" in (handler.headers.get("Transfer-Encoding") or "").lower():
        out = bytearray()
        while True:
            line = handler.rfile.readline()
            size = int(line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while handler.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return bytes(out)
            out += handler.rfile.read(size)
            handler.rfile.readline()
    length = int(handler.headers.get("Content-Length") or 0)
    return handler.rfile.read(length) if length > 0 else b""


def _header_param(value: str, header: str, name: str) -> str | None:
    msg = email.message.Message()
    msg[header] = value
    got = msg.get_param(name, header=header)
    if isinstance(got, tuple):
        got = email.utils.collapse_rfc2231_value(got)
    return got if got is None else str(got)


def parse_multipart(body: bytes, content_type: str) -> tuple[FormPart, ...]:
    """Split a multipart/form-data body into parts (byte-exact payloads)."""
    boundary = _header_param(content_type, "content-type", "boundary")
    if not boundary:
        return ()
    delimiter = b"--" + boundary.encode("latin-1")
    parts = []
    for piece in body.split(delimiter)[1:]:
        if piece.startswith(b"--"):
            break
        if piece.startswith(b"\r\n"):
            piece = piece[2:]
        head, _sep, data = piece.partition(b"\r\n\r\n")
        if data.endswith(b"\r\n"):
            data = data[:-2]
        headers: dict[str, str] = {}
        for line in head.decode("utf-8", "replace").split("\r\n"):
            key, _c, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        disposition = headers.get("content-disposition", "")
        name = _header_param(disposition, "content-disposition", "name") or ""
        filename = _header_param(disposition, "content-disposition", "filename")
        parts.append(FormPart(name, filename, headers.get("content-type"), data))
    return tuple(parts)


def decode_data_uri(uri: str) -> tuple[bytes, str]:
    """``data:<mime>;base64,...`` -> (bytes, mime). Raises ValueError when malformed."""
    if not uri.startswith("data:") or "," not in uri:
        raise ValueError("not a data: URI")
    meta, payload = uri[5:].split(",", 1)
    mime = meta.split(";")[0] or "application/octet-stream"
    if ";base64" in meta:
        try:
            return base64.b64decode(payload, validate=True), mime
        except (binascii.Error, ValueError) as exc:
            raise ValueError("bad base64 in data: URI") from exc
    return urllib.parse.unquote_to_bytes(payload), mime


def guess_type(filename: str | None, declared: str | None) -> str:
    if declared and declared not in ("application/octet-stream", ""):
        return declared.split(";")[0].strip()
    guessed = mimetypes.guess_type(filename or "")[0]
    return guessed or "application/octet-stream"


class Emulator:
    """A loopback server speaking provider protocols, for tests, benchmarks and demos.

    >>> with Emulator(queue_s=0.1, processing_s=0.2) as emu:
    ...     base = emu.url            # "http://127.0.0.1:PORT"
    ...     emu.faults.add(Fault("status", r"/result$", count=2, status=503))
    ...     emu.plan_jobs(JobPlan(fail="Content blocked by the safety filter"))

    ``clock`` drives job timing (inject a fake clock to step through states);
    ``video_maker(image_path, audio_path, out_path, tier)`` renders result videos
    (default: the local renderer; :func:`~avatar_core.emulator.video.tone_video_maker`
    is a cheap stand-in). ``api_keys`` maps a protocol name to the only key(s) it
    accepts; by default any non-empty key passes. ``sync_timeout_s`` bounds the
    providers' synchronous modes (real seconds).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        queue_s: float = 0.2,
        processing_s: float = 0.5,
        retention_s: float = 3600.0,
        clock: Clock = time.monotonic,
        sync_timeout_s: float = 10.0,
        video_maker: VideoMaker | None = None,
        api_keys: Mapping[str, str | Iterable[str]] | None = None,
        protocols: Iterable[type[Protocol]] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.queue_s = queue_s
        self.processing_s = processing_s
        self.retention_s = retention_s
        self.clock = clock
        self.sync_timeout_s = sync_timeout_s
        self.video_maker = video_maker or default_video_maker()
        self.api_keys = {
            name: ({keys} if isinstance(keys, str) else set(keys)) for name, keys in (api_keys or {}).items()
        }
        self.requests = RequestLog()
        self.faults = FaultList()
        self.jobs: dict[str, Job] = {}
        self.files: dict[str, StoredFile] = {}
        self._plans: list[JobPlan] = []
        self._lock = threading.RLock()
        self._server: _QuietServer | None = None
        self._thread: threading.Thread | None = None
        self.videos = VideoCache()
        if protocols is None:
            from .fal import FalProtocol
            from .kling import KlingProtocol
            from .replicate import ReplicateProtocol
            from .segmind import SegmindProtocol
            from .wavespeed import WaveSpeedProtocol

            protocols = (WaveSpeedProtocol, SegmindProtocol, FalProtocol, ReplicateProtocol, KlingProtocol)
        self.protocols: dict[str, Protocol] = {}
        self._routes: list[Route] = []
        self._add_core_routes()
        for cls in protocols:
            self.add_protocol(cls)

    # -- lifecycle ---------------------------------------------------------------------

    def add_protocol(self, cls: type[Protocol]) -> Protocol:
        """Mount a protocol module; its routes are tried after those already mounted."""
        proto = cls(self)
        self.protocols[proto.name] = proto
        for method, pattern, handler in proto.routes():
            self._routes.append(Route(method.upper(), re.compile(pattern), handler, proto))
        return proto

    def start(self) -> Emulator:
        """Bind and serve in a background thread (idempotent)."""
        if self._server is not None:
            return self
        server = _QuietServer((self.host, self.port), _RequestHandler)
        server.emulator = self
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name=f"emulator:{self.port}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and free the port."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def serve_forever(self) -> None:
        """Serve in the calling thread until interrupted."""
        self.start()
        try:
            while self._thread is not None and self._thread.is_alive():
                self._thread.join(timeout=0.5)
        finally:
            self.stop()

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:PORT`` (valid once started)."""
        host = self.host if self.host not in ("0.0.0.0", "") else "127.0.0.1"
        return f"http://{host}:{self.port}"

    def env_lines(self) -> list[str]:
        """``NAME=value`` settings that point clients at this emulator."""
        lines: list[str] = []
        for proto in self.protocols.values():
            lines += proto.env_lines(self.url)
        return lines

    def reset(self) -> None:
        """Forget requests, faults, plans, jobs and uploads (the render cache stays)."""
        with self._lock:
            self.requests.clear()
            self.faults.clear()
            self._plans.clear()
            self.jobs.clear()
            self.files.clear()
        for proto in self.protocols.values():
            proto.reset()

    # -- scenario API --------------------------------------------------------------------

    def requests_to(self, method: str | None, path_regex: str) -> list[RecordedRequest]:
        """Recorded requests with ``method`` (None: any) whose path matches (``re.search``)."""
        return self.requests.to(method, path_regex)

    def plan_jobs(self, *plans: JobPlan) -> None:
        """The next submitted jobs take these plans, one each, in order."""
        with self._lock:
            self._plans.extend(plans)

    def job(self, job_id: str) -> Job:
        with self._lock:
            return self.jobs[job_id]

    def complete_job_at(self, job_id: str, when: float) -> None:
        """Make a job finish at ``when`` (the emulator's clock)."""
        with self._lock:
            self.jobs[job_id].complete_at = when

    def cancel_job(self, job: Job) -> bool:
        """Cancel a job that has not ended yet (from now on its phase is CANCELLED)."""
        with self._lock:
            if job.phase(self.clock(), self.retention_s) not in (QUEUED, PROCESSING):
                return False
            job.cancelled_at = self.clock()
            return True

    def now(self) -> float:
        return self.clock()

    # -- jobs and files, for protocol modules ---------------------------------------------

    def new_id(self) -> str:
        return secrets.token_hex(12)

    def check_key(self, protocol: str, key: str | None) -> bool:
        """Whether ``key`` passes for ``protocol``: non-empty, and listed if keys are set."""
        if not key or not key.strip():
            return False
        allowed = self.api_keys.get(protocol)
        return allowed is None or key in allowed

    def store_file(self, data: bytes | None, filename: str, content_type: str, **kw: Any) -> StoredFile:
        file = StoredFile(self.new_id(), filename or "file", content_type, data, **kw)
        with self._lock:
            self.files[file.id] = file
        return file

    def file_url(self, file: StoredFile) -> str:
        return f"{self.url}/emulator/files/{file.id}/{urllib.parse.quote(file.filename)}"

    def video_url(self, job: Job) -> str:
        if job.plan.video_link is not None:
            return job.plan.video_link
        return f"{self.url}/emulator/outputs/{job.id}/output.mp4"

    def create_job(
        self,
        protocol: str,
        model: str,
        tier: str,
        inputs: Mapping[str, str],
        *,
        webhook: str | None = None,
        job_id: str | None = None,
    ) -> Job:
        """Register a job and start preparing its video in the background.

        ``inputs`` has ``image`` and ``audio`` references (URL or data: URI). Inputs that
        cannot be fetched make the job fail when it ends, as a real provider would.
        """
        now = self.clock()
        with self._lock:
            plan = self._plans.pop(0) if self._plans else JobPlan()
        job = Job(
            id=job_id or self.new_id(),
            protocol=protocol,
            model=model,
            tier=tier,
            submitted_at=now,
            created_wall=time.time(),
            queue_s=self.queue_s if plan.queue_s is None else plan.queue_s,
            processing_s=self.processing_s if plan.processing_s is None else plan.processing_s,
            plan=plan,
            inputs=dict(inputs),
            webhook=webhook,
        )
        try:
            image = self.fetch_input(inputs["image"])
            job.received["image"] = ReceivedInput(*image)
            audio = self.fetch_input(inputs["audio"])
            job.received["audio"] = ReceivedInput(*audio)
        except (ValueError, OSError, KeyError) as exc:
            job.input_error = f"Could not read the input files: {exc}"
        else:
            if plan.fail is None and plan.video == "ok":
                job.video_key = self.videos.request(self.video_maker, image, audio, tier)
        with self._lock:
            self.jobs[job.id] = job
        return job

    def fetch_input(self, ref: str) -> tuple[bytes, str]:
        """The bytes behind an input reference: one of our uploads, a loopback URL, or a
        data: URI. Anything else (the internet) is refused: tests never leave the machine."""
        if not isinstance(ref, str) or not ref:
            raise ValueError("empty input reference")
        if ref.startswith("data:"):
            return decode_data_uri(ref)
        parsed = urllib.parse.urlsplit(ref)
        if parsed.scheme not in ("http", "https") or parsed.hostname not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"the emulator only fetches loopback URLs, not {ref[:80]!r}")
        own = re.fullmatch(r"/emulator/files/([0-9a-f]+)/.*", parsed.path)
        if own and parsed.port == self.port:
            file = self.files.get(own.group(1))
            if file is None or file.data is None:
                raise ValueError(f"no uploaded file at {ref}")
            return file.data, file.content_type
        import httpx  # only needed for foreign loopback URLs

        response = httpx.get(ref, timeout=30.0, follow_redirects=True)
        if response.status_code != 200:
            raise ValueError(f"HTTP {response.status_code} fetching {ref}")
        return response.content, response.headers.get("content-type", "application/octet-stream")

    def wait_for_job(self, job: Job, timeout_s: float) -> str:
        """Wait (real time) until the job leaves queued/processing or the timeout passes;
        returns its phase."""
        deadline = time.monotonic() + timeout_s
        while True:
            phase = job.phase(self.clock(), self.retention_s)
            if phase not in (QUEUED, PROCESSING) or time.monotonic() >= deadline:
                return phase
            time.sleep(0.01)

    def video_info(self, job: Job) -> tuple[int | None, float | None]:
        """Size in bytes and duration in seconds of the job's rendered video (waits for the
        render); (None, None) when the job serves no real video or the render failed."""
        if job.video_key is None:
            return None, None
        try:
            path = self.videos.wait(job.video_key, RENDER_WAIT_S)
            import av

            with av.open(str(path)) as container:
                return path.stat().st_size, round(container.duration / 1_000_000, 3)
        except Exception:
            return None, None

    def video_response(self, job: Job, head: bool = False) -> Response:
        """The result video as the job's plan says to serve it."""
        plan = job.plan
        if plan.video == "403":
            return Response(403, b"<Error><Code>AccessDenied</Code></Error>", "application/xml")
        if plan.video == "404":
            return Response(404, b"<Error><Code>NoSuchKey</Code></Error>", "application/xml")
        if plan.video == "html":
            return html_response(200)
        if plan.video == "redirect":
            return Response(302, b"", None, {"Location": plan.redirect_to or "/"})
        if plan.video == "huge":
            length = plan.huge_bytes if plan.huge_declared else None
            return Response(200, zeros(plan.huge_bytes), "video/mp4", length=length)
        if job.video_key is None:
            return json_response(404, {"error": "This job has no video."})
        try:
            path = self.videos.wait(job.video_key, RENDER_WAIT_S)
        except TimeoutError:
            return json_response(504, {"error": "The video is still rendering."})
        except Exception as exc:  # the renderer's failure, shown to the test
            return json_response(500, {"error": f"Rendering failed: {exc}"})
        data = b"" if head else path.read_bytes()
        return Response(200, data, "video/mp4", length=path.stat().st_size)

    # -- core routes ----------------------------------------------------------------------

    def _add_core_routes(self) -> None:
        core = [
            ("GET", r"/emulator/health", lambda ctx: json_response(200, {"ok": True})),
            ("GET", r"/emulator/files/(?P<id>[0-9a-f]+)/(?P<name>[^/]*)", self._get_file),
            ("HEAD", r"/emulator/files/(?P<id>[0-9a-f]+)/(?P<name>[^/]*)", self._get_file),
            ("PUT", r"/emulator/uploads/(?P<id>[0-9a-f]+)", self._put_file),
            ("GET", r"/emulator/outputs/(?P<id>[0-9a-f]+)/output\.mp4", self._get_video),
            ("HEAD", r"/emulator/outputs/(?P<id>[0-9a-f]+)/output\.mp4", self._get_video),
        ]
        for method, pattern, handler in core:
            self._routes.append(Route(method, re.compile(pattern), handler, None))

    def _get_file(self, ctx: Context) -> Response:
        file = self.files.get(ctx.match["id"])
        if file is None or file.data is None:
            return ctx.error(404, "No such file.")
        body = b"" if ctx.request.method == "HEAD" else file.data
        return Response(200, body, file.content_type, length=len(file.data))

    def _put_file(self, ctx: Context) -> Response:
        file = self.files.get(ctx.match["id"])
        if file is None or not file.put_token:
            return ctx.error(404, "No such upload.")
        if ctx.request.param("token") != file.put_token:
            return ctx.error(403, "Bad upload signature.")
        limit = upload_limit(file.content_type)
        if len(ctx.request.body) > limit:
            return ctx.error(413, f"File too large: {len(ctx.request.body)} bytes, limit {limit}.")
        file.data = ctx.request.body
        return Response(200)

    def _get_video(self, ctx: Context) -> Response:
        job = self.jobs.get(ctx.match["id"])
        if job is None:
            return ctx.error(404, "No such video.")
        phase = job.phase(self.clock(), self.retention_s)
        if phase != COMPLETED:
            return ctx.error(404, "No such video.")
        return self.video_response(job, head=ctx.request.method == "HEAD")

    # -- dispatch -------------------------------------------------------------------------

    def _dispatch(self, h: _RequestHandler) -> None:
        try:
            body = _read_body(h)
        except (OSError, ValueError):
            h.close_connection = True
            return
        split = urllib.parse.urlsplit(h.path)
        path = split.path
        headers = {k.lower(): v for k, v in h.headers.items()}
        ctype = headers.get("content-type", "")
        parsed: Any = None
        if body and ("json" in ctype or body[:1] in (b"{", b"[")):
            try:
                parsed = json.loads(body)
            except ValueError:
                parsed = None
        form = parse_multipart(body, ctype) if ctype.startswith("multipart/form-data") else ()
        record = RecordedRequest(
            method=h.command,
            path=path,
            query=urllib.parse.parse_qs(split.query, keep_blank_values=True),
            headers=headers,
            body=body,
            json=parsed,
            form=form,
            at=self.clock(),
            wall=time.time(),
        )
        self.requests.append(record)

        route, match, protocol, allowed = self._route(h.command, path)
        fault = self.faults.take(h.command, path)
        try:
            response = self._answer(route, match, protocol, allowed, record, fault)
        except Exception as exc:  # an emulator bug: say so loudly, answer 500
            traceback.print_exc(file=sys.stderr)
            response = json_response(500, {"error": f"emulator error: {exc!r}"})
        if protocol is not None and not response.drop:
            response = protocol.finalize(response)
        self._send(h, response)

    def _route(self, method: str, path: str):
        allowed: list[str] = []
        for route in self._routes:
            m = route.pattern.fullmatch(path)
            if m is None:
                continue
            if route.method == method:
                return route, m, route.protocol, allowed
            allowed.append(route.method)
        # Unrouted paths answer in the shape of the protocol with the longest matching prefix.
        best, owner = 0, None
        for proto in self.protocols.values():
            for prefix in proto.prefixes:
                if path.startswith(prefix) and len(prefix) > best:
                    best, owner = len(prefix), proto
        return None, None, owner, allowed

    def _answer(self, route, match, protocol, allowed, record, fault) -> Response:
        ctx = Context(self, record, match, protocol)
        if fault is not None:
            if fault.kind == "slow":
                time.sleep(fault.delay_s)
            elif fault.kind == "drop":
                if fault.process and route is not None:
                    route.handler(ctx)
                return Response(drop=True)
            else:
                if fault.handle and route is not None and fault.kind in ("malformed_json", "html", "body"):
                    route.handler(ctx)  # the job exists; only the answer is spoilt
                return self._fault_response(fault, ctx)
        if route is None:
            if allowed:
                return ctx.error(405, f"Method {record.method} not allowed here.")
            return ctx.error(404, f"No route for {record.method} {record.path}.")
        return route.handler(ctx)

    def _fault_response(self, fault: Fault, ctx: Context) -> Response:
        if fault.kind == "status":
            status = fault.status or 500
            response = ctx.error(status, fault.message)
            if fault.retry_after is not None:
                ra = fault.retry_after
                response.headers["Retry-After"] = ra if isinstance(ra, str) else f"{ra:g}"
            return response
        if fault.kind == "app_error":
            message = fault.message or "Internal server error"
            if ctx.protocol is None:
                return json_response(500, {"error": message})
            return ctx.protocol.app_error(message)
        if fault.kind == "malformed_json":
            return Response(fault.status or 200, b'{"code": 200, "data": {"id": "abc", "status": ', "application/json")
        if fault.kind == "html":
            return html_response(fault.status or 200)
        if fault.kind == "body":
            body = fault.body
            if isinstance(body, (dict, list)):
                return Response(fault.status or 200, json.dumps(body).encode(), fault.content_type or "application/json")
            data = body.encode() if isinstance(body, str) else bytes(body or b"")
            return Response(fault.status or 200, data, fault.content_type or "text/plain")
        if fault.kind == "huge":
            return Response(
                fault.status or 200,
                zeros(fault.size),
                fault.content_type or "video/mp4",
                length=fault.size if fault.declare else None,
            )
        raise AssertionError(fault.kind)

    def _send(self, h: _RequestHandler, response: Response) -> None:
        if response.drop:
            h.close_connection = True
            try:
                h.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        try:
            h.send_response(response.status)
            if response.content_type:
                h.send_header("Content-Type", response.content_type)
            for key, value in response.headers.items():
                h.send_header(key, value)
            body = response.body
            head = h.command == "HEAD"
            if isinstance(body, (bytes, bytearray)):
                h.send_header("Content-Length", str(response.length if response.length is not None else len(body)))
                h.end_headers()
                if not head and body:
                    h.wfile.write(body)
                h.wfile.flush()  # here, where a client that hung up is expected
                return
            chunked = response.length is None
            if chunked:
                h.send_header("Transfer-Encoding", "chunked")
            else:
                h.send_header("Content-Length", str(response.length))
            h.end_headers()
            if head:
                h.wfile.flush()
                return
            for chunk in body:
                if chunked:
                    h.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                else:
                    h.wfile.write(chunk)
                h.wfile.flush()  # each piece leaves now (slow and endless answers rely on it)
            if chunked:
                h.wfile.write(b"0\r\n\r\n")
            h.wfile.flush()
        except (TimeoutError, BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            h.close_connection = True


# ---------------------------------------------------------------------------- limits

# WaveSpeed's published upload limits (PROVIDERS.md); applied to every upload path.
IMAGE_UPLOAD_LIMIT = 20 * 1024 * 1024
AUDIO_UPLOAD_LIMIT = 50 * 1024 * 1024


def upload_limit(content_type: str) -> int:
    """Largest upload accepted for this content type (images 20 MB, everything else 50 MB)."""
    return IMAGE_UPLOAD_LIMIT if content_type.startswith("image/") else AUDIO_UPLOAD_LIMIT


# ---------------------------------------------------------------------------- serving


def serve(host: str = "127.0.0.1", port: int = 8765, **opts: Any) -> None:
    """Run an emulator in the foreground until Ctrl-C."""
    emu = Emulator(host, port, **opts)
    try:
        emu.serve_forever()
    except KeyboardInterrupt:
        pass


def main_serve(
    port: int,
    host: str = "127.0.0.1",
    queue_s: float = 5.0,
    processing_s: float = 20.0,
    **opts: Any,
) -> None:
    """``python -m avatar_core emulator --port N``: print the URL and the settings to use,
    then serve until Ctrl-C. The default timing is slow enough to watch a job progress."""
    emu = Emulator(host, port, queue_s=queue_s, processing_s=processing_s, **opts)
    emu.start()
    print(f"Provider emulator listening on {emu.url}  (queue {queue_s:g} s, processing {processing_s:g} s)")
    print("Point the app at it with these settings (any non-empty API key is accepted):")
    for line in emu.env_lines():
        print(f"  {line}")
    print("Press Ctrl-C to stop.", flush=True)
    try:
        emu.serve_forever()
    except KeyboardInterrupt:
        print("Emulator stopped.")
