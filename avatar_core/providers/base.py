"""The provider protocol, the closed set of job statuses, and what providers share.

A provider module maps one HTTP protocol onto :class:`Provider`; everything two
providers have in common (HTTP client set-up, HTTP-status-to-error mapping, JSON
decoding, Retry-After) lives here, and the polling loop lives in ``jobs.py``.
"""

from __future__ import annotations

import base64
import email.utils
import functools
import json
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable
from collections.abc import AsyncIterator, Callable, Mapping

import httpx

from ..errors import (
    AuthError,
    AvatarError,
    CreditsError,
    InputError,
    NotSubmitted,
    ProtocolError,
    RateLimited,
    ResultExpired,
    SubmitUncertain,
    TransientError,
)
from .keepalive import KeepAliveReads, proxy_configured

_T = TypeVar("_T")

Tier = Literal["standard", "pro"]
ModelVersion = Literal["v1", "v2"]
TIERS: tuple[Tier, ...] = ("standard", "pro")
VERSIONS: tuple[ModelVersion, ...] = ("v1", "v2")

PROVIDER_IDS = ("local", "wavespeed", "segmind", "fal", "replicate", "kling")

# (provider, tier, version) -> the provider's model id / slug / endpoint. One table for all.
MODEL_IDS: Mapping[tuple[str, str, str], str] = {
    ("wavespeed", "standard", "v1"): "kwaivgi/kling-v1-ai-avatar-standard",
    ("wavespeed", "pro", "v1"): "kwaivgi/kling-v1-ai-avatar-pro",
    ("wavespeed", "standard", "v2"): "kwaivgi/kling-v2-ai-avatar-standard",
    ("wavespeed", "pro", "v2"): "kwaivgi/kling-v2-ai-avatar-pro",
    ("segmind", "standard", "v1"): "kling-v1-standard-ai-avatar",
    ("segmind", "pro", "v1"): "kling-v1-pro-ai-avatar",
    ("segmind", "standard", "v2"): "kling-v2-standard-avatar",
    ("segmind", "pro", "v2"): "kling-v2-pro-avatar",
    ("fal", "standard", "v1"): "fal-ai/kling-video/v1/standard/ai-avatar",
    ("fal", "pro", "v1"): "fal-ai/kling-video/v1/pro/ai-avatar",
    ("fal", "standard", "v2"): "fal-ai/kling-video/ai-avatar/v2/standard",
    ("fal", "pro", "v2"): "fal-ai/kling-video/ai-avatar/v2/pro",
    # Replicate hosts only v2; the tier travels as input "mode".
    ("replicate", "standard", "v2"): "kwaivgi/kling-avatar-v2",
    ("replicate", "pro", "v2"): "kwaivgi/kling-avatar-v2",
    # Kling's own API has one endpoint; the tier travels as "mode".
    ("kling", "standard", "v1"): "kling-avatar-std",
    ("kling", "pro", "v1"): "kling-avatar-pro",
    ("local", "standard", "v1"): "local-preview-720p",
    ("local", "pro", "v1"): "local-preview-1080p",
}


def model_id(provider: str, tier: str, version: str = "v1") -> str:
    """The provider's model id for a tier and version, or a clear error if it has none."""
    try:
        return MODEL_IDS[(provider, tier, version)]
    except KeyError:
        have = sorted({v for (p, _t, v) in MODEL_IDS if p == provider})
        if not have:
            raise InputError(f"Unknown provider {provider!r}. Choose one of: {', '.join(PROVIDER_IDS)}.") from None
        if tier not in TIERS:
            raise InputError(f"Unknown tier {tier!r}. Choose 'standard' or 'pro'.") from None
        raise InputError(
            f"{provider} does not offer model version {version}; it has {', '.join(have)}.",
            provider=provider,
        ) from None


def versions_for(provider: str) -> list[str]:
    return sorted({v for (p, _t, v) in MODEL_IDS if p == provider})


def default_version(provider: str) -> str:
    have = versions_for(provider)
    return "v1" if "v1" in have else have[0]


# ---------------------------------------------------------------- job handle + statuses


@dataclass(frozen=True)
class JobHandle:
    """Everything needed to find a job again; rebuildable from (provider, request_id)."""

    provider: str
    request_id: str
    model: str | None = None


@dataclass(frozen=True)
class Queued:
    position: int | None = None


@dataclass(frozen=True)
class Processing:
    progress: float | None = None  # 0..1 when the provider says
    logs: tuple[str, ...] = ()


@dataclass(frozen=True)
class Completed:
    video_url: str
    metadata: Mapping[str, Any] = field(default_factory=dict)
    note: str = ""  # anything the user should know about the result, in words ("" when nothing)


@dataclass(frozen=True)
class Failed:
    message: str
    cancelled: bool = False


JobStatus = Queued | Processing | Completed | Failed


@dataclass(frozen=True)
class SubmitRequest:
    """What every provider takes: URLs (or data the provider accepts) for image and audio."""

    image_url: str
    audio_url: str
    tier: Tier = "standard"
    version: ModelVersion = "v1"
    prompt: str = ""
    audio_seconds: float | None = None


ProgressFn = Callable[[int, int], None]


@runtime_checkable
class Provider(Protocol):
    """One place that runs Kling AI Avatar. All methods are async and raise AvatarError."""

    name: str
    supports_cancel: bool

    async def upload(self, path: Path, content_type: str, progress: ProgressFn | None = None) -> str:
        """Make a local file reachable by the provider; return the URL (or data URI) to submit."""

    async def submit(self, request: SubmitRequest) -> JobHandle:
        """Start a paid job. Called once; never retried when the outcome is unknown."""

    async def status(self, handle: JobHandle) -> JobStatus:
        """Read the job's status (safe to repeat)."""

    async def result(self, handle: JobHandle) -> Completed:
        """Fetch the finished job's video URL and metadata (safe to repeat)."""

    async def cancel(self, handle: JobHandle) -> bool:
        """Ask the provider to cancel; True when it accepted."""

    async def aclose(self) -> None:
        """Release connections."""


# ---------------------------------------------------------------- shared HTTP plumbing

# Connect quickly or give up (the job loop retries reads); reads may be slow on busy days.
DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=10.0)


@functools.lru_cache(maxsize=1)
def shared_ssl_context() -> ssl.SSLContext:
    """One verifying TLS context for every client this process makes.

    httpx builds a fresh context per client by default, loading the whole CA bundle each
    time: about 0.8 MB and 35 ms of CPU per client. A job makes three clients, so 200
    concurrent jobs cost over 300 MB (bench/bench_many_jobs.py); shared, they cost 8 MB.
    """
    return httpx.create_ssl_context()  # exactly what each client would build (SSL_CERT_FILE honoured)


# A Retry-After beyond this is treated as this: we would rather ask again than go silent
# for hours because a proxy sent a silly value.
MAX_RETRY_AFTER_S = 600.0


def parse_retry_after(value: str | None, now: Callable[[], float] = time.time) -> float | None:
    """Retry-After as seconds (delta-seconds or an HTTP date), capped at MAX_RETRY_AFTER_S."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        seconds = None
    if seconds is not None:
        return min(MAX_RETRY_AFTER_S, seconds) if seconds >= 0 else 0.0 if seconds == seconds else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return min(MAX_RETRY_AFTER_S, max(0.0, when.timestamp() - now()))


def error_text(response: httpx.Response) -> str:
    """The provider's own words from an error body, whatever its shape, kept short."""
    try:
        body = response.json()
    except ValueError:
        text = response.text.strip()
        if text.lower().startswith(("<!doctype", "<html")):
            return f"HTTP {response.status_code} (an HTML page)"
        return text[:300] or f"HTTP {response.status_code}"
    if isinstance(body, dict):
        kind = body.get("error_type")
        suffix = f" [{kind}]" if isinstance(kind, str) and kind else ""
        for key in ("error", "detail", "message", "title"):
            val = body.get(key)
            if isinstance(val, list) and val and all(isinstance(v, dict) and "msg" in v for v in val):
                # A validation error list ({"loc", "msg", "type"} items, as fal.ai sends).
                return ("; ".join(str(v["msg"]) for v in val)[:300]) + suffix
            if isinstance(val, str) and val:
                return val[:300] + suffix
            if val:
                return json.dumps(val)[:300] + suffix
    return json.dumps(body)[:300]


def error_for_status(
    code: int,
    detail: str,
    *,
    provider: str,
    label: str,
    request_id: str | None = None,
    retry_after: float | None = None,
) -> AvatarError | None:
    """The error for an HTTP (or envelope) status code; None for success codes."""
    if code < 400:
        return None
    kw = dict(provider=provider, request_id=request_id, status_code=code)
    if code in (401, 403):
        return AuthError(
            f"{label} refused the API key (HTTP {code}: {detail}). Check that the key is right and active.", **kw
        )
    if code in (402, 406):  # 402 Payment Required (Replicate), 406 (Segmind)
        return CreditsError(f"{label} says the account has no credits left ({detail}). Top up, then try again.", **kw)
    if code == 429:
        return RateLimited(f"{label} is rate limiting requests ({detail}).", retry_after=retry_after, **kw)
    if code == 404 and request_id:
        return ResultExpired(
            f"{label} no longer knows job {request_id} (HTTP 404): it expired or never existed.", **kw
        )
    if code in (408, 409, 425) or code >= 500:
        return TransientError(
            f"{label} had a temporary problem (HTTP {code}: {detail}).", retry_after=retry_after, **kw
        )
    return InputError(f"{label} rejected the request (HTTP {code}: {detail}).", **kw)


def raise_for_status(
    response: httpx.Response,
    *,
    provider: str,
    label: str,
    request_id: str | None = None,
    detail: str | None = None,
) -> None:
    """Map an HTTP error status to our error tree. 2xx returns quietly.

    ``detail`` replaces the provider's words read from the body (:func:`error_text`)."""
    if response.status_code < 400:
        return
    error = error_for_status(
        response.status_code,
        error_text(response) if detail is None else detail,
        provider=provider,
        label=label,
        request_id=request_id,
        retry_after=parse_retry_after(response.headers.get("retry-after")),
    )
    raise error


def decode_json(response: httpx.Response, *, provider: str, label: str, request_id: str | None = None) -> Any:
    try:
        return response.json()
    except ValueError as exc:
        raise ProtocolError(
            f"{label} sent a reply that is not valid JSON (HTTP {response.status_code}).",
            provider=provider,
            request_id=request_id,
        ) from exc


# What a status read may carry; anything else (streams, files) goes through httpx.
_READ_KWARGS = {"params", "headers"}


class HttpProvider:
    """Base for hosted providers: one AsyncClient, error mapping, and request helpers.

    ``transport`` is injectable so tests and benchmarks can swap the network layer.
    """

    name = "http"
    label = "Provider"
    supports_cancel = False
    # Where the user finds a job whose request id this app never learned (a submit reply
    # it could not read): named in the SubmitUncertain message. Each provider names its own.
    dashboard = "the provider's dashboard"

    def __init__(
        self,
        base_url: str,
        headers: Mapping[str, str],
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        verify = shared_ssl_context()
        self._client = httpx.AsyncClient(
            base_url=self.base_url, headers=dict(headers), transport=transport, timeout=timeout, verify=verify
        )
        # For URLs handed to us by the provider (presigned uploads): never send our key there.
        self._plain = httpx.AsyncClient(transport=transport, timeout=timeout, verify=verify)
        # Status reads (the hot path of a busy server) on a leaner keep-alive connection;
        # with an injected transport or a proxy, everything goes through httpx.
        self._reads = None
        if transport is None and not proxy_configured():
            self._reads = KeepAliveReads(
                self.base_url, self._client.headers.multi_items(), ssl_context=verify, timeout=timeout
            )

    def __repr__(self) -> str:  # never shows headers (they hold the key)
        return f"<{type(self).__name__} {self.base_url}>"

    async def aclose(self) -> None:
        await self._client.aclose()
        await self._plain.aclose()
        if self._reads is not None:
            await self._reads.aclose()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def request(
        self, method: str, url: str, *, request_id: str | None = None, passthrough: tuple[int, ...] = (), **kw
    ) -> httpx.Response:
        """A read (or upload) request. Network trouble becomes TransientError.

        Statuses in ``passthrough`` are returned for the caller to interpret (Segmind's 422).
        """
        client = self._plain if kw.pop("without_auth", False) else self._client
        try:
            if method == "GET" and client is self._client and self._reads is not None and kw.keys() <= _READ_KWARGS:
                response = await self._reads.get(url, **kw)
            else:
                response = await client.request(method, url, **kw)
        except httpx.TimeoutException as exc:
            raise TransientError(
                f"{self.label} did not answer in time.", provider=self.name, request_id=request_id
            ) from exc
        except httpx.TransportError as exc:
            raise TransientError(
                f"Could not reach {self.label} ({type(exc).__name__}).", provider=self.name, request_id=request_id
            ) from exc
        if response.status_code >= 400 and response.status_code not in passthrough:
            raise_for_status(
                response, provider=self.name, label=self.label, request_id=request_id,
                detail=self.error_detail(response),
            )
        return response

    def error_detail(self, response: httpx.Response) -> str:
        """The provider's words for an error answer; override to add what it sends in headers."""
        return error_text(response)

    async def submit_request(self, method: str, url: str, *, passthrough: tuple[int, ...] = (), **kw) -> httpx.Response:
        """The one paid POST. Only a failure to connect (nothing sent) is safe to report as
        'not submitted'; anything after the bytes left is SubmitUncertain.

        4xx statuses in ``passthrough`` are returned for the caller to interpret (Kling's
        401/429 carry codes that decide between auth, credits and rate limits)."""
        try:
            response = await self._client.request(method, url, **kw)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise NotSubmitted(
                f"Could not connect to {self.label}; nothing was submitted, so no job was started.",
                provider=self.name,
            ) from exc
        except httpx.TransportError as exc:
            raise SubmitUncertain(
                f"The connection to {self.label} broke after the job was sent, so a paid job may have "
                f"been created. Check your {self.label} dashboard before submitting again.",
                provider=self.name,
            ) from exc
        if response.status_code >= 500 or response.status_code == 408:
            # The server may have created the job before failing; do not resubmit blindly.
            raise SubmitUncertain(
                f"{self.label} answered HTTP {response.status_code} to the submit ({self.error_detail(response)}). "
                f"A job may or may not have been created: check your {self.label} dashboard before "
                "submitting again.",
                provider=self.name,
                status_code=response.status_code,
            )
        if response.status_code not in passthrough:
            raise_for_status(response, provider=self.name, label=self.label, detail=self.error_detail(response))
        return response

    def submit_reply(self, response: httpx.Response, read: Callable[[httpx.Response], _T]) -> _T:
        """``read(response)``: the handle from a submit's 2xx answer. An answer that cannot be
        read (not JSON, no request id, cut short) is no refusal: the provider said yes, so a
        paid job probably exists. That is SubmitUncertain, never a ProtocolError (which would
        read as "nothing happened" and give the money back)."""
        try:
            return read(response)
        except ProtocolError as exc:
            raise self.submit_id_unknown(exc.message, response.status_code) from exc

    def submit_id_unknown(self, why: str, status_code: int) -> SubmitUncertain:
        """The error for a submit the provider accepted whose request id we could not read."""
        return SubmitUncertain(
            f"{self.label} answered the submit with HTTP {status_code}, but the answer could not be read "
            f"({why.rstrip('.')}), so this app does not know the job's request id and cannot follow it. "
            f"A paid job has probably been created: look for it in {self.dashboard} (its video can be "
            "downloaded there) before submitting again.",
            provider=self.name,
            status_code=status_code,
        )

    def json(self, response: httpx.Response, request_id: str | None = None) -> Any:
        return decode_json(response, provider=self.name, label=self.label, request_id=request_id)

    def protocol_error(self, what: str, request_id: str | None = None) -> ProtocolError:
        return ProtocolError(f"{self.label} sent {what}.", provider=self.name, request_id=request_id)

    # -- defaults for providers whose status reply already carries the result

    async def result(self, handle: JobHandle) -> Completed:
        """The finished job's video, read from its status (override where a provider has a
        separate result endpoint)."""
        status = await self.status(handle)  # type: ignore[attr-defined]
        if isinstance(status, Completed):
            return status
        raise self.protocol_error(f"no result yet (status {type(status).__name__})", handle.request_id)

    async def cancel(self, handle: JobHandle) -> bool:
        """Providers without a cancel endpoint: nothing is sent, the job runs on."""
        return False


def read_inline(path: Path, max_bytes: int, *, what: str, provider: HttpProvider, hint: str) -> bytes:
    """A local file's bytes, for providers that take files inside the request body.

    Over ``max_bytes`` is an InputError that names the limit and ``hint`` (what to do)."""
    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise InputError(
            f"The {what} file is {size / 1e6:.1f} MB; {provider.label} takes at most "
            f"{max_bytes / 1e6:.0f} MB inline. {hint}",
            provider=provider.name,
        )
    return path.read_bytes()


def data_uri(content_type: str, data: bytes) -> str:
    """``data:<type>;base64,...``: how fal.ai and Replicate take a file inside JSON."""
    return f"data:{content_type};base64,{base64.b64encode(data).decode('ascii')}"


# Streamed uploads read the file in pieces of this size: big enough for throughput, small
# enough that memory stays flat. A multiple of 3, so base64 pieces join without padding.
STREAM_CHUNK = 3 * 64 * 1024


@dataclass(frozen=True)
class StreamedBody:
    """A request body produced piece by piece: pass ``content=body`` and ``headers=body.headers``.

    ``length`` is known up front, so it goes out with ``Content-Length`` (presigned PUT targets
    refuse chunked bodies). Iterable once per ``async for``; each iteration reopens the file.
    """

    pieces: Callable[[], AsyncIterator[bytes]]
    length: int
    content_type: str

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self.pieces()

    @property
    def headers(self) -> dict[str, str]:
        return {"Content-Type": self.content_type, "Content-Length": str(self.length)}


async def _file_pieces(path: Path, progress: ProgressFn | None, size: int) -> AsyncIterator[bytes]:
    sent = 0
    with Path(path).open("rb") as fh:
        while sent < size:  # never more than the Content-Length announced
            piece = fh.read(min(STREAM_CHUNK, size - sent))
            if not piece:
                break
            sent += len(piece)
            yield piece
            if progress:
                progress(sent, size)


def file_body(path: Path, content_type: str, progress: ProgressFn | None = None) -> StreamedBody:
    """A local file as a raw request body, read in :data:`STREAM_CHUNK` pieces."""
    size = Path(path).stat().st_size
    return StreamedBody(lambda: _file_pieces(path, progress, size), size, content_type)


def data_uri_json_body(
    path: Path, content_type: str, wrap: Callable[[str], Any], progress: ProgressFn | None = None
) -> StreamedBody:
    """``json.dumps(wrap(data_uri))`` for a local file, byte for byte, without the file in memory.

    ``wrap`` builds the JSON around the file's ``data:<type>;base64,...`` URI, e.g.
    ``lambda uri: {"data_urls": [uri]}`` (Segmind's upload). The base64 is encoded piece by
    piece as the body is sent; base64 needs no JSON escaping, so the bytes are the same.
    """
    marker = "@@avatar-core-file-data@@"
    outer = json.dumps(wrap(marker))
    quoted = json.dumps(marker)
    if outer.count(quoted) != 1:
        raise ValueError("wrap() must place the data URI exactly once, as a JSON string")
    before, after = outer.split(quoted)
    # The opening quote and the URI's head (its type JSON-escaped), then base64, then the close.
    head = (before + json.dumps(f"data:{content_type};base64,")[:-1]).encode("utf-8")
    tail = ('"' + after).encode("utf-8")
    size = Path(path).stat().st_size
    length = len(head) + 4 * ((size + 2) // 3) + len(tail)

    async def pieces() -> AsyncIterator[bytes]:
        yield head
        carry = b""
        async for piece in _file_pieces(path, progress, size):
            piece = carry + piece if carry else piece
            cut = len(piece) - len(piece) % 3  # whole 3-byte groups only: no padding mid-stream
            carry = piece[cut:]
            yield base64.b64encode(piece[:cut])
        yield base64.b64encode(carry) + tail

    return StreamedBody(pieces, length, "application/json")


def require(mapping: Any, key: str, provider: HttpProvider, request_id: str | None = None) -> Any:
    """A field the protocol promises; its absence is a ProtocolError, not a KeyError."""
    if not isinstance(mapping, dict) or key not in mapping or mapping[key] in (None, ""):
        raise provider.protocol_error(f"a reply without '{key}'", request_id)
    return mapping[key]


__all__ = [
    "MODEL_IDS",
    "PROVIDER_IDS",
    "TIERS",
    "VERSIONS",
    "AvatarError",
    "Completed",
    "Failed",
    "HttpProvider",
    "JobHandle",
    "JobStatus",
    "Processing",
    "Provider",
    "Queued",
    "SubmitRequest",
    "model_id",
    "raise_for_status",
]
