"""The one job loop for every provider: upload, submit once, poll, download, report.

``run_job`` and ``resume`` are async generators of :mod:`avatar_core.events`. They never
raise for a job that goes wrong: the last event is then a :class:`FailedEvent` whose
message says what happened, what to do, and the request id. Closing the generator (or
cancelling the task that iterates it) cancels the remote job where the provider can.

Promises kept here:
- the submit POST is sent once; it is repeated only when it provably never arrived
  (connection refused) or was refused with 429, since a duplicate is a second paid job;
- the request id goes to the store (and the log) the moment submit returns, before
  anything else can fail;
- reads are retried on 429/5xx/network errors with capped exponential backoff,
  honouring Retry-After;
- every wait is bounded by the overall deadline; at the deadline the remote job is left
  running and the user is told how to resume it;
- the finished video is streamed to the output folder (size capped, type checked), so
  it still plays after the provider's link expires.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import shutil
import time
import traceback
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from urllib.parse import unquote, urlparse

import httpx

from .config import Settings, key_values, load_settings, redact
from .errors import (
    AvatarError,
    InputError,
    JobCancelled,
    JobFailed,
    JobTimedOut,
    NotSubmitted,
    ProtocolError,
    RateLimited,
    ResultExpired,
    ResultInvalid,
    SubmitUncertain,
    TransientError,
)
from .events import (
    Done,
    Downloading,
    FailedEvent,
    JobEvent,
    ProcessingEvent,
    QueuedEvent,
    Submitted,
    Uploading,
)
from .media.pricing import estimate_cost
from .polling import BACKOFF_BASE_S, PollSchedule, backoff
from .providers import LABELS, make_provider
from .providers.base import (
    Completed,
    Failed,
    JobHandle,
    Processing,
    Provider,
    Queued,
    SubmitRequest,
    default_version,
    model_id,
    shared_ssl_context,
)
from .store import MICROUSD_PER_USD

log = logging.getLogger("avatar_core.jobs")

# Kling's documented prompt limit; the strictest of the providers.
MAX_PROMPT_CHARS = 2500
# Consecutive failed reads before we stop trying: with the 30 s backoff cap this is
# roughly ten minutes of a provider outage, after which the user is told to resume later.
MAX_READ_FAILURES = 20
# A reply we cannot parse may be a passing glitch (a proxy's error page); three in a row is not.
MAX_PROTOCOL_ERRORS = 3
# The submit is repeated only when it never arrived; a few tries cover a blip.
MAX_SUBMIT_TRIES = 3
# Download chunk size: large enough for throughput, small enough that memory stays flat.
DOWNLOAD_CHUNK = 256 * 1024
MAX_DOWNLOAD_TRIES = 4
VIDEO_CONTENT_TYPES = ("video/", "application/octet-stream", "binary/octet-stream", "application/mp4")

Sleep = Callable[[float], Awaitable[None]]
Clock = Callable[[], float]


@dataclass
class _Context:
    provider: Provider
    settings: Settings
    store: Any
    owner: str | None
    clock: Clock
    sleep: Sleep
    transport: httpx.AsyncBaseTransport | None
    start: float
    deadline_s: float
    schedule: PollSchedule
    tier: str
    out_path: Path | None
    handle: JobHandle | None = None
    last_status: str | None = None
    finished: bool = False
    extra: dict = field(default_factory=dict)
    # The keys this job runs with, so a provider that echoes one back in an error cannot
    # get it into the user's message, the log or the store.
    secrets: tuple[str, ...] = ()

    def elapsed(self) -> float:
        return self.clock() - self.start

    @property
    def label(self) -> str:
        return LABELS.get(self.provider.name, self.provider.name)

    def remaining(self) -> float:
        return self.deadline_s - self.elapsed()


# ------------------------------------------------------------------------- public API


async def run_job(
    provider: str,
    image: str | os.PathLike,
    audio: str | os.PathLike,
    *,
    tier: str = "standard",
    version: str | None = None,
    prompt: str = "",
    settings: Settings | None = None,
    api_key: str | None = None,
    store: Any = None,
    owner: str | None = None,
    audio_seconds: float | None = None,
    estimated_cost_usd: float | None = None,
    input_names: tuple[str | None, str | None] = (None, None),
    out_path: Path | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    client: Provider | None = None,
    clock: Clock = time.monotonic,
    sleep: Sleep = asyncio.sleep,
    schedule: PollSchedule | None = None,
) -> AsyncIterator[JobEvent]:
    """Run one job from checked local files to a local MP4. See the module doc.

    ``image`` and ``audio`` are files (the checked copies, :func:`inputs_to_send`); a link
    is refused, since the provider could be served different bytes than were checked.

    ``input_names`` are the names the user knows the inputs by (for the history), when
    ``image``/``audio`` are normalised copies.
    """
    settings = settings or load_settings()
    try:
        version = version or default_version(provider)
        model = model_id(provider, tier, version)
        prompt = clean_prompt(prompt)
        provider_obj = client or make_provider(provider, settings, api_key=api_key, transport=transport)
    except AvatarError as exc:
        yield _failed_event(exc, provider, None, 0.0)
        return
    ctx = _make_context(provider_obj, settings, store, owner, clock, sleep, transport, tier, out_path, schedule)
    ctx.secrets = _job_secrets(settings, provider, api_key)
    ctx.extra["names"] = (input_names[0] or _display_name(image), input_names[1] or _display_name(audio))
    ctx.extra["version"] = version
    drive = _drive(ctx, _new_job(ctx, image, audio, tier, version, model, prompt, audio_seconds, estimated_cost_usd))
    try:
        async for event in drive:
            yield event
    finally:
        await drive.aclose()  # a consumer that left early cancels the remote job in there
        if client is None:
            await provider_obj.aclose()


# A job started elsewhere and resumed here: its model version was never told to us.
UNKNOWN_VERSION = "unknown"


async def resume(
    provider: str,
    request_id: str,
    *,
    tier: str | None = None,
    settings: Settings | None = None,
    api_key: str | None = None,
    store: Any = None,
    owner: str | None = None,
    out_path: Path | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    client: Provider | None = None,
    clock: Clock = time.monotonic,
    sleep: Sleep = asyncio.sleep,
    schedule: PollSchedule | None = None,
) -> AsyncIterator[JobEvent]:
    """Continue a job submitted earlier (by this app, the CLI, or elsewhere) to its video."""
    settings = settings or load_settings()
    request_id = (request_id or "").strip()
    record = _store_call(store, "get", provider, request_id) if store is not None and request_id else None
    try:
        if not request_id or not re.fullmatch(r"[A-Za-z0-9._:\-]{1,200}", request_id):
            raise InputError("Enter the request id exactly as the provider gave it (letters, digits, - _ . :).")
        if record is not None and owner is not None and getattr(record, "owner", None) != owner:
            # Another visitor's job, or the CLI's (no owner): not theirs to poll, download or
            # write to. (Callers without an owner, the CLI, may resume any job.)
            raise InputError("That job was started by someone else using this app; only they can resume it here.")
        provider_obj = client or make_provider(provider, settings, api_key=api_key, transport=transport)
    except AvatarError as exc:
        yield _failed_event(exc, provider, request_id or None, 0.0)
        return
    tier = tier or getattr(record, "tier", None) or "standard"
    ctx = _make_context(provider_obj, settings, store, owner, clock, sleep, transport, tier, out_path, schedule)
    ctx.secrets = _job_secrets(settings, provider, api_key)
    if record is not None and getattr(record, "created_at", None):
        ctx.start -= max(0.0, time.time() - float(record.created_at))
    ctx.handle = JobHandle(provider, request_id, getattr(record, "model", None))
    ctx.extra["version"] = getattr(record, "version", None)
    if store is not None and record is None:
        _store_call(store, "record_submitted", provider=provider, request_id=request_id, model=None, tier=tier,
                    version=UNKNOWN_VERSION, prompt="", image_name=None, audio_name=None, audio_seconds=None,
                    estimated_cost_usd=None, owner=owner)
    drive = _drive(ctx, _follow(ctx))
    try:
        yield Submitted(provider, request_id, ctx.handle.model, ctx.elapsed())
        async for event in drive:
            if isinstance(event, Done) and event.cost_usd is not None:
                _correct_ledger(store, provider, request_id, event.cost_usd)
            yield event
    finally:
        await drive.aclose()
        if client is None:
            await provider_obj.aclose()


def inputs_to_send(prepared: Any, provider: str) -> tuple[str, str]:
    """What to give the provider for each checked input: always the checked (normalised)
    local file, which the job uploads or inlines.

    Never the user's link, even when the checks changed nothing: a link can serve the app
    a 3 s clip and the provider a 295 s one, and the price follows what the provider
    renders. Only the bytes that were checked and priced may reach the provider.
    """
    return str(prepared.image.path), str(prepared.audio.path)


# Invisible format characters that are part of the text, not controls: the zero-width
# joiner (emoji sequences such as a family or a profession, and Indic scripts), the
# zero-width non-joiner (Persian, Indic) and the tag characters of subdivision flags.
# Variation selectors are marks (category Mn) and pass anyway.
_KEPT_FORMAT_CHARS = frozenset({"\u200d", "\u200c"}) | frozenset(chr(c) for c in range(0xE0020, 0xE0080))


def _prompt_char(ch: str) -> str:
    """What ``ch`` becomes in the prompt sent: itself, nothing, or a space."""
    if ch in "\n\t" or ch in _KEPT_FORMAT_CHARS:
        return ch
    category = unicodedata.category(ch)
    if category[0] != "C":
        return ch
    if category == "Cf":
        # Other invisible format characters (soft hyphen, LRM/RLM, word joiner, zero-width
        # space, BOM) sit inside words: dropped, so the word stays whole.
        return ""
    return " "  # control characters (an escape, a NUL, CR), surrogates, private or unassigned


def clean_prompt(prompt: str | None) -> str:
    """The prompt as sent: control characters turned to spaces, invisible format characters
    dropped (joiners of emoji sequences and scripts kept), whitespace folded, length checked."""
    text = "".join(_prompt_char(ch) for ch in (prompt or ""))
    text = re.sub(r"[ \t]+", " ", text).strip()
    if len(text) > MAX_PROMPT_CHARS:
        raise InputError(
            f"The prompt is {len(text)} characters long; the limit is {MAX_PROMPT_CHARS}. Shorten it and try again."
        )
    return text


# ------------------------------------------------------------------------- the stages


def _job_secrets(settings: Settings, provider: str, api_key: str | None) -> tuple[str, ...]:
    try:
        return tuple(key_values(settings.with_key(provider, api_key)))
    except AvatarError:  # a malformed user key: the provider was never made with it
        return tuple(key_values(settings))


def _make_context(provider_obj, settings, store, owner, clock, sleep, transport, tier, out_path, schedule):
    typical = settings.poll_typical_s
    if typical is None and store is not None:
        typical = _store_call(store, "typical_duration", provider_obj.name, tier)
    return _Context(
        provider=provider_obj,
        settings=settings,
        store=store,
        owner=owner,
        clock=clock,
        sleep=sleep,
        transport=transport,
        start=clock(),
        deadline_s=settings.deadline_s,
        schedule=schedule or PollSchedule.for_job(provider_obj.name, tier, typical_s=typical),
        tier=tier,
        out_path=out_path,
    )


async def _drive(ctx: _Context, stages: AsyncIterator[JobEvent]) -> AsyncIterator[JobEvent]:
    """Run the stages; if our consumer goes away (closed generator, cancelled task), cancel
    the remote job where the provider allows it, and record what happened."""
    inner = _guarded(ctx, stages)
    try:
        async for event in inner:
            yield event
    except (asyncio.CancelledError, GeneratorExit):
        await _cancel_remote(ctx)
        raise
    finally:
        await inner.aclose()


async def _guarded(ctx: _Context, stages: AsyncIterator[JobEvent]) -> AsyncIterator[JobEvent]:
    """Turn errors into a final FailedEvent that says what to do."""
    try:
        async for event in stages:
            yield event
    except AvatarError as exc:
        if ctx.handle is not None and exc.request_id is None:
            exc.request_id = ctx.handle.request_id
        exc.message = redact(exc.message, ctx.secrets)
        _record_end(ctx, exc)
        yield _failed_event(exc, ctx.provider.name, ctx.handle.request_id if ctx.handle else None, ctx.elapsed())
    except Exception as exc:
        # A bug of ours, but its text may quote a provider's answer: the traceback is scrubbed too.
        log.error("unexpected error in job %s:\n%s", ctx.handle.request_id if ctx.handle else "(not submitted)",
                  redact("".join(traceback.format_exception(exc)), ctx.secrets))
        rid = ctx.handle.request_id if ctx.handle else None
        message = f"Something went wrong in this app ({type(exc).__name__})."
        if rid:
            message += f" Your job may still be running at {ctx.label}: resume it with request id {rid}."
        _update(ctx, status="failed", error=message)
        yield FailedEvent(message, ctx.provider.name, rid, "InternalError", ctx.elapsed())


async def _new_job(ctx, image, audio, tier, version, model, prompt, audio_seconds, cost) -> AsyncIterator[JobEvent]:
    urls = {}
    for what, source in (("image", image), ("audio", audio)):
        async for event in _input_url(ctx, what, source, urls):
            yield event
    request = SubmitRequest(
        image_url=urls["image"], audio_url=urls["audio"], tier=tier, version=version, prompt=prompt,
        audio_seconds=audio_seconds,
    )
    try:
        ctx.handle = await _submit_once(ctx, request)
    except SubmitUncertain as exc:
        # A paid job probably exists under an id we never learned: keep it in the history
        # (with its estimated cost), so the user can see it and find it at the provider.
        _store_call(
            ctx.store, "record_id_unknown",
            provider=ctx.provider.name, model=model, tier=tier, version=version, prompt=prompt,
            image_name=ctx.extra["names"][0], audio_name=ctx.extra["names"][1], audio_seconds=audio_seconds,
            estimated_cost_usd=cost, error=redact(exc.message, ctx.secrets), owner=ctx.owner,
        )
        log.warning("%s submit answered unreadably; request id unknown", ctx.provider.name)
        raise
    # Before anything else can fail: the request id goes to the log and the store.
    log.info("submitted %s job %s (model %s)", ctx.provider.name, ctx.handle.request_id, ctx.handle.model or model)
    _store_call(
        ctx.store, "record_submitted",
        provider=ctx.provider.name, request_id=ctx.handle.request_id, model=ctx.handle.model or model, tier=tier,
        version=version, prompt=prompt, image_name=ctx.extra["names"][0], audio_name=ctx.extra["names"][1],
        audio_seconds=audio_seconds, estimated_cost_usd=cost, owner=ctx.owner,
    )
    _update(ctx, status="submitted")
    yield Submitted(ctx.provider.name, ctx.handle.request_id, ctx.handle.model or model, ctx.elapsed())
    async for event in _follow(ctx):
        yield event


async def _input_url(ctx: _Context, what: str, source, urls: dict) -> AsyncIterator[JobEvent]:
    text = os.fspath(source) if isinstance(source, os.PathLike) else str(source or "")
    scheme = urlparse(text).scheme.lower()
    if scheme in ("http", "https"):
        # Never passed through: what a link serves the provider may differ from what it
        # served the checks (and the price). Check it first (media.prepare_inputs) and send
        # the checked file (inputs_to_send).
        raise InputError(
            f"The {what} was given as a link; this app only sends files it has checked. Check it first "
            "(the app and the command line do) and send the checked file."
        )
    path = Path(text)
    if not text or not path.is_file():
        raise InputError(f"The {what} file {text or '(none)'} was not found. Choose the file again.")
    size = path.stat().st_size
    yield Uploading(what, 0, size, ctx.elapsed())
    urls[what] = await _with_retries(ctx, lambda: ctx.provider.upload(path, _content_type(path)), f"{what} upload")
    yield Uploading(what, size, size, ctx.elapsed())


async def _submit_once(ctx: _Context, request: SubmitRequest) -> JobHandle:
    for attempt in range(1, MAX_SUBMIT_TRIES + 1):
        try:
            return await ctx.provider.submit(request)
        except (NotSubmitted, RateLimited) as exc:
            # Provably not created: the connection never opened, or the provider refused it.
            if attempt == MAX_SUBMIT_TRIES or ctx.remaining() <= 0:
                raise
            await ctx.sleep(min(_backoff(ctx, attempt, exc), max(0.0, ctx.remaining())))
    raise AssertionError("unreachable")


async def _follow(ctx: _Context) -> AsyncIterator[JobEvent]:
    """Poll until the job ends, then download the video."""
    handle = ctx.handle
    assert handle is not None
    name = ctx.provider.name
    failures = 0
    protocol_errors = 0
    while True:
        if ctx.remaining() <= 0:
            raise _timed_out(ctx)
        try:
            status = await ctx.provider.status(handle)
            failures = protocol_errors = 0
        except (TransientError, RateLimited, ProtocolError) as exc:
            failures += 1
            if isinstance(exc, ProtocolError):
                protocol_errors += 1
                if protocol_errors >= MAX_PROTOCOL_ERRORS:
                    raise ProtocolError(
                        f"{exc.message} The job may still be running: resume it later with request id "
                        f"{handle.request_id}.", provider=name, request_id=handle.request_id,
                    ) from exc
            if failures >= MAX_READ_FAILURES:
                raise TransientError(
                    f"{ctx.label} has not answered properly for a while ({exc.message}). The job may still be "
                    f"running: resume it later with request id {handle.request_id}.",
                    provider=name, request_id=handle.request_id,
                ) from exc
            log.warning("status read %d failed for %s: %s", failures, handle.request_id,
                        redact(exc.message, ctx.secrets))
            await _wait(ctx, _backoff(ctx, failures, exc))
            continue

        if isinstance(status, Failed):
            cls = JobCancelled if status.cancelled else JobFailed
            raise cls(f"{ctx.label} reports the job failed: {status.message}", provider=name,
                      request_id=handle.request_id)
        if isinstance(status, Completed):
            break
        if isinstance(status, Queued):
            event = QueuedEvent(name, handle.request_id, status.position, ctx.elapsed(), ctx.schedule.typical_s)
            _update(ctx, status="queued")
        else:
            assert isinstance(status, Processing)
            event = ProcessingEvent(name, handle.request_id, ctx.elapsed(), ctx.schedule.typical_s,
                                    status.progress, status.logs)
            _update(ctx, status="processing")
        yield event
        await _wait(ctx, ctx.schedule.interval(ctx.elapsed()))

    completed = status
    if not completed.video_url:
        completed = await _with_retries(ctx, lambda: ctx.provider.result(handle), "result read")
    _update(ctx, status="downloading", provider_timings=dict(completed.metadata))
    dest = ctx.out_path or _default_output(ctx.settings, handle)
    async for event in _download(ctx, completed.video_url, dest):
        yield event
    duration = probe_duration(dest)
    cost = _real_cost(ctx, duration)
    metadata = {**completed.metadata, "model": handle.model, "tier": ctx.tier}
    money = {"video_seconds": duration, "cost_usd": cost} if cost is not None else {}
    ctx.finished = True
    note = getattr(completed, "note", "") or ""
    _update(ctx, status="completed", output_path=str(dest), metadata=_jsonable({**metadata, **money}),
            detail=note or None)
    yield Done(name, handle.request_id, dest, duration, metadata, ctx.elapsed(), cost_usd=cost, note=note)


def _real_cost(ctx: _Context, seconds: float | None) -> float | None:
    """The price of the finished video from its real length (None when either is unknown).

    Providers bill what they rendered, which is what came back, not what was estimated."""
    version = ctx.extra.get("version")
    if seconds is None or not version or version == UNKNOWN_VERSION:
        return None
    try:
        return estimate_cost(ctx.provider.name, ctx.tier, version, seconds).usd
    except AvatarError:
        return None


async def _wait(ctx: _Context, seconds: float) -> None:
    """Sleep ``seconds``, never past the deadline.

    No events while waiting: a page that shows a ticking clock makes its own ticks
    (ui.DetachedJob.follow), so a job nobody watches costs one wake-up per status read.
    """
    await ctx.sleep(max(0.0, min(seconds, ctx.remaining())))


async def _with_retries(ctx: _Context, call: Callable[[], Awaitable[Any]], what: str) -> Any:
    """Repeat a safe request on transient trouble, with backoff, within the deadline."""
    attempt = 0
    while True:
        attempt += 1
        try:
            return await call()
        except (TransientError, RateLimited) as exc:
            if attempt >= MAX_DOWNLOAD_TRIES or ctx.remaining() <= 0:
                raise
            log.warning("%s failed (attempt %d): %s", what, attempt, redact(exc.message, ctx.secrets))
            await _wait(ctx, _backoff(ctx, attempt, exc))


def _backoff(ctx: _Context, attempt: int, exc: AvatarError) -> float:
    base = min(BACKOFF_BASE_S, ctx.schedule.fast_interval_s)
    return backoff(attempt, getattr(exc, "retry_after", None), base=base)


# ------------------------------------------------------------------------- download


async def _download(ctx: _Context, url: str, dest: Path) -> AsyncIterator[JobEvent]:
    handle = ctx.handle
    assert handle is not None
    dest.parent.mkdir(parents=True, exist_ok=True)
    parsed = urlparse(url)
    if parsed.scheme == "file":
        # Only the in-process renderer may hand over a local file.
        if ctx.provider.name != "local":
            raise ResultInvalid(
                f"{ctx.label} returned a local file path instead of a web link; refusing to read it.",
                provider=ctx.provider.name, request_id=handle.request_id,
            )
        src = Path(unquote(parsed.path))
        size = src.stat().st_size
        shutil.move(str(src), dest)
        yield Downloading(ctx.provider.name, handle.request_id, size, size, ctx.elapsed())
        return
    if parsed.scheme not in ("http", "https"):
        raise ResultInvalid(f"{ctx.label} returned an unusable video link ({parsed.scheme or 'no scheme'}).",
                            provider=ctx.provider.name, request_id=handle.request_id)
    for attempt in range(1, MAX_DOWNLOAD_TRIES + 1):
        try:
            async for event in _download_once(ctx, url, dest):
                yield event
            return
        except TransientError as exc:
            if attempt == MAX_DOWNLOAD_TRIES or ctx.remaining() <= 0:
                raise TransientError(
                    f"The finished video could not be downloaded from {ctx.label} ({exc.message}). It is kept "
                    f"there for a limited time: resume with request id {handle.request_id} to try again.",
                    provider=ctx.provider.name, request_id=handle.request_id,
                ) from exc
            await _wait(ctx, _backoff(ctx, attempt, exc))


# Said for every refused hop, whatever the address was: the reply must tell an outsider
# nothing about what lives on this server's network (or whether a name resolved).
REFUSED_VIDEO_HOST = (
    "{label}'s video link leads to an address this app does not download from (a local or private "
    "network address, or one that cannot be looked up), so nothing was downloaded. If that is wrong, "
    "report it to {label}; resuming later with request id {rid} tries the link again."
)


def provider_endpoints(settings: Settings) -> frozenset[tuple[str, int]]:
    """(host, port) of every provider address the operator configured: trusted for the
    finished-video download even on a private address (a self-hosted gateway, the emulator)."""
    from .config import _URLS
    from .media.fetch import endpoint

    out = set()
    for attr, _default in _URLS.values():
        try:
            url = httpx.URL(getattr(settings, attr))
        except (httpx.InvalidURL, ValueError):
            continue
        if url.host:
            out.add(endpoint(url))
    return frozenset(out)


async def _check_hop(ctx: _Context, url: httpx.URL, trusted: frozenset) -> None:
    """Refuse a hop to a local/private address (unless it is a configured provider endpoint)."""
    from .media.fetch import check_host, endpoint, system_resolver

    rid = ctx.handle.request_id
    refused = ResultInvalid(REFUSED_VIDEO_HOST.format(label=ctx.label, rid=rid), provider=ctx.provider.name,
                            request_id=rid)
    if url.scheme not in ("http", "https") or not url.host:
        raise ResultInvalid(f"{ctx.label} returned an unusable video link ({url.scheme or 'no scheme'}).",
                            provider=ctx.provider.name, request_id=rid)
    if endpoint(url) in trusted:
        return
    host, port = endpoint(url)
    try:
        await asyncio.to_thread(check_host, host, port, allow_private=ctx.settings.allow_private_urls,
                                resolver=system_resolver)
    except InputError:
        log.warning("refused a video link hop of job %s: not a public address", rid)
        raise refused from None


async def _open_video(ctx: _Context, client: httpx.AsyncClient, url: str, trusted: frozenset) -> httpx.Response:
    """GET the video, following redirects by hand with every hop checked; a streamed response."""
    from .media.fetch import MAX_REDIRECTS

    name, rid = ctx.provider.name, ctx.handle.request_id
    current = httpx.URL(url)
    for _hop in range(MAX_REDIRECTS + 1):
        await _check_hop(ctx, current, trusted)
        try:
            response = await client.send(client.build_request("GET", current), stream=True)
        except httpx.TransportError as exc:
            if isinstance(exc.__context__, InputError):  # the connect-time check (DNS changed since)
                log.warning("refused a video link hop of job %s at connect", rid)
                raise ResultInvalid(REFUSED_VIDEO_HOST.format(label=ctx.label, rid=rid), provider=name,
                                    request_id=rid) from None
            raise
        except InputError:
            log.warning("refused a video link hop of job %s at connect", rid)
            raise ResultInvalid(REFUSED_VIDEO_HOST.format(label=ctx.label, rid=rid), provider=name,
                                request_id=rid) from None
        if not response.is_redirect:
            return response
        location = response.headers.get("location")
        await response.aclose()
        if not location:
            raise ResultInvalid(f"{ctx.label}'s video link redirects nowhere.", provider=name, request_id=rid)
        try:
            current = current.join(location)
        except (httpx.InvalidURL, ValueError):
            raise ResultInvalid(f"{ctx.label}'s video link redirects to an invalid address.", provider=name,
                                request_id=rid) from None
    raise ResultInvalid(f"{ctx.label}'s video link redirects more than {MAX_REDIRECTS} times.", provider=name,
                        request_id=rid)


async def _download_once(ctx: _Context, url: str, dest: Path) -> AsyncIterator[JobEvent]:
    from .media.fetch import async_checked_transport

    handle = ctx.handle
    name, rid = ctx.provider.name, handle.request_id
    cap = ctx.settings.max_video_bytes
    part = dest.with_name(dest.name + ".part")
    trusted = provider_endpoints(ctx.settings)
    # The same address rules as input links, at every redirect hop, checked again at connect
    # time (DNS rebinding); the configured provider endpoints stay trusted.
    transport = ctx.transport or async_checked_transport(
        allow_private=ctx.settings.allow_private_urls, trusted=trusted, verify=shared_ssl_context())
    # A separate client with no provider headers: the video host never sees the API key.
    async with httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(60.0, connect=10.0),
                                 follow_redirects=False, trust_env=False) as client:
        try:
            response = await _open_video(ctx, client, url, trusted)
            try:
                if response.status_code in (401, 403, 404, 410):
                    raise ResultExpired(
                        f"{ctx.label} no longer serves the finished video (HTTP {response.status_code}); "
                        "providers delete results after a while. Generate it again.",
                        provider=name, request_id=rid, status_code=response.status_code,
                    )
                if response.status_code == 429 or response.status_code >= 500:
                    raise TransientError(f"the video host answered HTTP {response.status_code}",
                                         provider=name, request_id=rid, status_code=response.status_code)
                if response.status_code != 200:
                    raise ResultInvalid(f"The video link answered HTTP {response.status_code}.",
                                        provider=name, request_id=rid, status_code=response.status_code)
                ctype = response.headers.get("content-type", "").split(";")[0].strip().lower()
                if ctype and not ctype.startswith(VIDEO_CONTENT_TYPES):
                    raise ResultInvalid(
                        f"{ctx.label}'s video link served {ctype} instead of a video. Try resuming later "
                        f"with request id {rid}.", provider=name, request_id=rid,
                    )
                total = int(response.headers.get("content-length") or 0) or None
                if total and total > cap:
                    raise ResultInvalid(
                        f"The video is {total / 1e6:.0f} MB, over this app's {cap / 1e6:.0f} MB limit "
                        "(AVATAR_MAX_VIDEO_MB).", provider=name, request_id=rid,
                    )
                received = 0
                yield Downloading(name, rid, 0, total, ctx.elapsed())
                last_report = ctx.clock()
                with part.open("wb") as fh:
                    async for chunk in response.aiter_bytes(DOWNLOAD_CHUNK):
                        if received == 0 and len(chunk) >= 8 and chunk[4:8] != b"ftyp":
                            raise ResultInvalid(
                                f"{ctx.label}'s video link served something that is not an MP4 video.",
                                provider=name, request_id=rid,
                            )
                        received += len(chunk)
                        if received > cap:
                            raise ResultInvalid(
                                f"The video is over this app's {cap / 1e6:.0f} MB limit (AVATAR_MAX_VIDEO_MB).",
                                provider=name, request_id=rid,
                            )
                        fh.write(chunk)
                        if ctx.clock() - last_report >= 0.5:
                            last_report = ctx.clock()
                            yield Downloading(name, rid, received, total, ctx.elapsed())
                if total and received != total:
                    raise TransientError("the download ended early", provider=name, request_id=rid)
            finally:
                await response.aclose()
            part.replace(dest)
            yield Downloading(name, rid, received, total or received, ctx.elapsed())
        except httpx.TransportError as exc:
            raise TransientError(f"the download broke off ({type(exc).__name__})", provider=name,
                                 request_id=rid) from exc
        finally:
            part.unlink(missing_ok=True)


def probe_duration(path: Path) -> float | None:
    """The MP4's duration in seconds, from its container (None if it cannot be read)."""
    import av

    try:
        with av.open(str(path)) as container:
            if container.duration:
                return container.duration / 1_000_000
            stream = container.streams.video[0] if container.streams.video else None
            if stream is not None and stream.duration and stream.time_base:
                return float(stream.duration * stream.time_base)
    except (av.error.FFmpegError, OSError, IndexError):
        return None
    return None


# ------------------------------------------------------------------------- helpers


async def _cancel_remote(ctx: _Context) -> None:
    if ctx.handle is None or ctx.finished:
        return
    cancelled = False
    if ctx.provider.supports_cancel:
        try:
            # Shielded and bounded: the consumer is already gone, but the job costs money.
            cancelled = await asyncio.wait_for(asyncio.shield(ctx.provider.cancel(ctx.handle)), timeout=10)
        except (TimeoutError, AvatarError, asyncio.CancelledError) as exc:
            # The provider's words may echo the key or a header: scrubbed here, not only by the log filter.
            log.warning("could not cancel %s: %s", ctx.handle.request_id, redact(str(exc), ctx.secrets))
    if cancelled:
        _update(ctx, status="cancelled", detail="cancelled at the provider")
    else:
        # The provider cannot cancel: the job runs on (and is paid for), so it stays resumable.
        _update(ctx, detail="the app stopped waiting; the job may still finish at the provider")


def _timed_out(ctx: _Context) -> JobTimedOut:
    waited = f"{ctx.deadline_s:.0f} s" if ctx.deadline_s < 90 else f"{ctx.deadline_s / 60:.0f} minutes"
    rid = ctx.handle.request_id if ctx.handle else None
    return JobTimedOut(
        f"The job was not finished after {waited}, so this app stopped waiting. It keeps running at "
        f"{ctx.label} and can be resumed with request id {rid} (History tab, or "
        f"`python -m avatar_core resume --provider {ctx.provider.name} --request-id {rid}`).",
        provider=ctx.provider.name, request_id=rid,
    )


_END_STATUS = {
    "JobCancelled": "cancelled",
    "JobTimedOut": "timed_out",
    "ResultExpired": "expired",
}


# Errors after which the remote job may still be running: the row stays resumable.
_STILL_RUNNING = ("TransientError", "ProtocolError", "RateLimited")


def _record_end(ctx: _Context, exc: AvatarError) -> None:
    if ctx.handle is None:
        return
    name = type(exc).__name__
    if name in _STILL_RUNNING:
        _update(ctx, error=str(exc), detail="the app stopped polling; resume to continue")
        return
    _update(ctx, status=_END_STATUS.get(name, "failed"), error=str(exc))


def _failed_event(exc: AvatarError, provider: str, request_id: str | None, elapsed: float) -> FailedEvent:
    rid = exc.request_id or request_id
    message = exc.message
    if rid and rid not in message:
        message = f"{message} (request id: {rid})"
    return FailedEvent(message, provider, rid, type(exc).__name__, elapsed)


def _update(ctx: _Context, **fields) -> None:
    if ctx.store is None or ctx.handle is None:
        return
    status = fields.get("status")
    if status is not None and status == ctx.last_status and len(fields) == 1:
        return
    ctx.last_status = status or ctx.last_status
    _store_call(ctx.store, "update", ctx.handle.provider, ctx.handle.request_id, **fields)


def _correct_ledger(store: Any, provider: str, request_id: str, cost_usd: float) -> None:
    """A resumed job's usage row gets the real price of the video that came back.

    A job started in Generate is settled by its ticket (guard.Ticket.watch); one finished
    by ``resume`` (after a restart, a deadline, a dropped page) has no ticket any more, so
    its row would keep the estimate.
    """
    if store is None or not hasattr(store, "correct_job_usage") or not (cost_usd >= 0 and math.isfinite(cost_usd)):
        return
    usage = _store_call(store, "correct_job_usage", provider, request_id,
                        cost_microusd=round(cost_usd * MICROUSD_PER_USD), now=time.time())
    if usage is not None:
        log.info("usage ledger: resumed job %s cost corrected to %.4f USD", request_id, cost_usd)


def _store_call(store: Any, method: str, *args, **kwargs):
    """A store problem must never cost the user the job: log it and carry on."""
    if store is None:
        return None
    try:
        return getattr(store, method)(*args, **kwargs)
    except Exception:
        log.exception("job store %s failed", method)
        return None


def _default_output(settings: Settings, handle: JobHandle) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", handle.request_id)[:120]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(settings.output_dir) / "videos" / f"{stamp}-{handle.provider}-{safe}.mp4"


def _display_name(source) -> str | None:
    text = os.fspath(source) if isinstance(source, os.PathLike) else str(source or "")
    if not text:
        return None
    if urlparse(text).scheme in ("http", "https"):
        return text.split("?")[0][-200:]
    return Path(text).name


_CONTENT_TYPES = {
    ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp",
    ".mp3": "audio/mpeg", ".wav": "audio/wav", ".m4a": "audio/mp4", ".aac": "audio/aac",
    ".ogg": "audio/ogg", ".flac": "audio/flac", ".mp4": "video/mp4",
}


def _content_type(path: Path) -> str:
    return _CONTENT_TYPES.get(path.suffix.lower(), "application/octet-stream")


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
