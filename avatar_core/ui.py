"""What the Gradio app shows and does; ``app.py`` only lays it out and wires events.

Two halves:

* pure presentation helpers (no Gradio): provider labels, the cost line, a
  :class:`StatusBoard` that turns job events into the status panel's Markdown, the
  in-session history, durations, redaction of keys from any text a user or log sees;
* :class:`Handlers`: the event functions app.py binds, holding the settings. The main
  one, :meth:`Handlers.generate`, is also the public API endpoint ``/generate``.

A user's own API key only ever lives in the local variables of one ``generate`` call:
it is handed to :func:`avatar_core.jobs.run_job` and nowhere else (no ``gr.State``, no
log line, no message). Gradio's browser-side run history, which would otherwise save
every input of a public endpoint in ``localStorage``, is switched off by
:func:`launch_options` (``run_history=False``).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import os
import re
import secrets as _secrets
import threading
import time
import traceback
import weakref
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence

import gradio as gr

from .config import Settings, key_problem, key_values, load_settings, redact
from .errors import AvatarError, InputError
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
from .media.pricing import CostEstimate, estimate_cost
from .providers import KEY_NAMES, LABELS, ProviderInfo, default_provider, provider_choices
from .providers.base import TIERS, default_version

log = logging.getLogger("avatar_core.ui")

# ----------------------------------------------------------------------------- tuning

# A job spends minutes asleep between status polls, so the generate event is I/O-bound:
# dozens can wait at once on one event loop. The bound only stops a flood from opening
# hundreds of provider connections; people beyond it wait in Gradio's queue.
GENERATE_CONCURRENCY = 32
# Everything else (input checks, cost updates) is short CPU work on a 2-core machine.
DEFAULT_CONCURRENCY = 2
# Input checks (decoding a portrait and a voice clip, up to about 300 MB each) running at
# once inside /generate, all visitors together; the rest wait their turn. The checks the
# page runs as files arrive share their own DEFAULT_CONCURRENCY slots (app.py).
INPUT_CHECK_CONCURRENCY = 2
# Requests waiting beyond the running ones. Past this Gradio answers "queue full" at once
# instead of keeping someone waiting behind half an hour of jobs.
QUEUE_MAX_SIZE = 64
# Local previews are CPU-bound and are NOT limited here: the local provider keeps one
# process-wide render queue (providers/local.py, MAX_CONCURRENT_RENDERS = one per core)
# and reports each waiting job's place in it, which the status panel shows.
# How many finished videos the in-session list keeps (the full history is the store's).
SESSION_HISTORY_MAX = 12
# The status panel's progress bar never claims "done" from a time estimate alone.
ESTIMATE_CAP = 0.95

MAX_UPLOAD = "100mb"
DEFAULT_HOST = "127.0.0.1"
SPACE_HOST = "0.0.0.0"  # a Hugging Face Space routes traffic to the container's port
DEFAULT_PORT = 7860

TIER_LABELS = {"standard": "Standard (about 720p)", "pro": "Pro (about 1080p, slower)"}


# ----------------------------------------------------------------------------- launch


def launch_options(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Keyword arguments for ``Blocks.launch`` that must hold wherever the app runs.

    Host and port come from ``GRADIO_SERVER_NAME``/``GRADIO_SERVER_PORT``; without them
    it binds 127.0.0.1 locally and 0.0.0.0 on a Hugging Face Space (``SPACE_ID`` set).
    ``run_history=False`` stops Gradio recording endpoint inputs (the API key among
    them) in the browser's localStorage or a Hub bucket.
    """
    env = os.environ if env is None else env
    host = (env.get("GRADIO_SERVER_NAME") or "").strip() or (SPACE_HOST if env.get("SPACE_ID") else DEFAULT_HOST)
    port_text = (env.get("GRADIO_SERVER_PORT") or "").strip()
    try:
        port = int(port_text) if port_text else DEFAULT_PORT
    except ValueError:
        raise ValueError(f"GRADIO_SERVER_PORT must be a port number, not {port_text!r}.") from None
    return {
        "server_name": host,
        "server_port": port,
        "run_history": False,
        "footer_links": ["api", "gradio", "settings"],
        # Server-side rendering needs Node.js; the client-rendered app is what we test.
        "ssr_mode": False,
        "show_error": False,
        # The largest input the checks accept (a long uncompressed WAV, see
        # media/inputs.FETCH_MAX_AUDIO_BYTES); bigger uploads are refused before they fill the disk.
        "max_file_size": MAX_UPLOAD,
    }


def private_files(settings: Settings) -> list[str]:
    """Files under the served output folder that must never be served (history, secrets)."""
    store = Path(settings.store_path).resolve()
    files = [store, *(store.with_name(store.name + suffix) for suffix in ("-wal", "-shm", "-journal"))]
    files.append((Path(settings.output_dir) / VISITOR_SECRET_FILE).resolve())
    return [str(f) for f in files]


# ----------------------------------------------------------------------------- text helpers


def format_duration(seconds: float | None) -> str:
    """'8 s', '1 min 05 s', '1 h 02 min'; '-' when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "-"
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


def format_usd(usd: float | None) -> str:
    if usd is None:
        return "unknown"
    if usd == 0:
        return "free"
    return f"${usd:.2f}" if usd >= 0.1 else f"${usd:.3f}"


# Only the characters that can start emphasis, code, links or HTML; escaping more would
# litter the text API users read with backslashes.
_MD_SPECIAL = re.compile(r"([\\`*\[\]<>])")


def md_escape(text: str) -> str:
    """Text shown literally inside Markdown (no links, emphasis or HTML from it)."""
    return _MD_SPECIAL.sub(r"\\\1", str(text))


def configured_secrets(settings: Settings) -> list[str]:
    """The server's own keys (and the halves of two-part keys), for redaction."""
    return key_values(settings)


# The user key(s) of the request being served, so log records can be scrubbed of them.
_ACTIVE_SECRETS: ContextVar[tuple[str, ...]] = ContextVar("avatar_active_secrets", default=())


class RedactSecrets(logging.Filter):
    """A handler filter that replaces API keys in log records with ****.

    Covers the server's own keys and the key of the request being served (set by
    :meth:`Handlers.generate`), in the message and in any traceback, so a provider that
    echoes a key back in an error cannot put it in the log.
    """

    def __init__(self, settings: Settings | None = None) -> None:
        super().__init__()
        self._static = configured_secrets(settings) if settings is not None else []

    def filter(self, record: logging.LogRecord) -> bool:
        secrets = [*_ACTIVE_SECRETS.get(), *self._static]  # and derived credentials, by shape (redact)
        message = record.getMessage()
        cleaned = redact(message, secrets)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, secrets)
        return True


def install_log_redaction(settings: Settings, logger: logging.Logger | None = None) -> None:
    """Add :class:`RedactSecrets` to every handler of ``logger`` (default: the root logger)."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, RedactSecrets) for f in handler.filters):
            handler.addFilter(RedactSecrets(settings))


# ----------------------------------------------------------------------------- choices


def short_label(provider: str) -> str:
    """The provider's name in running text ("WaveSpeed", "Local preview")."""
    return "Local preview" if provider == "local" else LABELS.get(provider, provider)


def provider_label(info: ProviderInfo, server_keys: bool = True) -> str:
    """The dropdown label: what the provider is and whether it can run right now.

    ``server_keys``: whether this visitor may use the server's keys (see guard.py).
    """
    if info.offline:
        return "Local preview (offline, not Kling output)"
    ready = info.has_key and server_keys
    return f"{info.label} — {'key ready' if ready else 'needs your API key'}"


def provider_dropdown(settings: Settings, server_keys: bool = True) -> tuple[list[tuple[str, str]], str]:
    """(label, id) choices for the providers this install can run, and the default."""
    infos = [i for i in provider_choices(settings) if i.available]
    ids = [i.id for i in infos]
    default = default_provider(settings) if server_keys else "local"
    return [(provider_label(i, server_keys), i.id) for i in infos], default if default in ids else ids[0]


def hosted_provider_ids(settings: Settings) -> list[str]:
    """The providers that run jobs remotely (everything but the offline preview)."""
    return [i.id for i in provider_choices(settings) if i.available and not i.offline]


def provider_note(provider: str, settings: Settings, server_keys: bool = True) -> str:
    """One or two sentences under the provider choice, in plain words."""
    if provider == "local":
        return (
            "**Offline preview.** Made on this computer in seconds, free: a simple animation of your "
            "portrait with your voice, to check inputs and timing. It is *not* Kling output."
        )
    label = LABELS.get(provider, provider)
    if settings.has_key(provider) and not server_keys:
        return (f"**{label}**: this server's key is not open to visitors here. Paste your own {label} API key "
                "below to use it.")
    if settings.has_key(provider):
        return f"**{label}** runs Kling AI Avatar with this server's key. You can use your own key instead."
    need = KEY_NAMES.get(provider, "an API key")
    return (
        f"**{label}** has no key on this server: paste your own {label} API key below "
        f"(or set {need} where the app runs)."
    )


def version_dropdown(provider: str) -> tuple[list[tuple[str, str]], str]:
    """(label, value) model-version choices for a provider; '' means its default."""
    infos = {i.id: i for i in provider_choices(Settings())}
    versions = list(infos[provider].versions) if provider in infos else ["v1"]
    default = default_version(provider) if provider in infos else "v1"
    choices = [(f"Provider default (Kling {default})", "")]
    choices += [(f"Kling {v}", v) for v in versions]
    return choices, ""


def cost_markdown(provider: str, tier: str, version: str | None, seconds: float | None) -> str:
    """The estimated-cost line shown under the choices."""
    version = version or default_version(provider)
    try:
        if seconds is None:
            unit = estimate_cost(provider, tier, version, 5.0)
            if unit.usd == 0:
                return "**Estimated cost: free** — rendered on this computer."
            return "**Estimated cost:** add a voice clip to see it (the price follows the audio length)."
        est: CostEstimate = estimate_cost(provider, tier, version, seconds)
    except InputError as exc:
        return f"**Estimated cost:** {md_escape(exc.message)}"
    if est.usd == 0:
        return "**Estimated cost: free** — rendered on this computer."
    if est.usd is None:
        return f"**Estimated cost: unknown** — {md_escape(est.basis)}."
    return (
        f"**Estimated cost: {format_usd(est.usd)}** for {seconds:.1f} s of video — {md_escape(est.basis)}."
        f"<br><small>Price source: {md_escape(est.source)}. Your provider's bill is what counts.</small>"
    )


# ----------------------------------------------------------------------------- status panel
# Words, not emoji: emoji fonts are missing on many servers' headless browsers and some
# desktops, where they show as empty boxes.


@dataclass
class StatusBoard:
    """Turns the events of one job into the status panel's Markdown.

    Keeps what earlier events said (request id, estimate) so every frame shows the whole
    picture: stage, elapsed time, typical duration, queue position, progress.
    """

    provider: str
    tier: str = "standard"
    version: str = "v1"
    cost: CostEstimate | None = None
    request_id: str | None = None
    estimate_s: float | None = None
    elapsed_s: float = 0.0
    progress: float | None = None  # 0..1 shown on the bar; None = unknown (animated bar)
    progress_is_estimate: bool = False
    finished: bool = False
    headline: str = "Starting…"
    details: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return short_label(self.provider)

    # -- events

    def update(self, event: JobEvent) -> str:
        """Take one job event; return the panel's Markdown."""
        self.elapsed_s = getattr(event, "elapsed", self.elapsed_s) or self.elapsed_s
        rid = getattr(event, "request_id", None)
        if rid:
            self.request_id = rid
        self.details = []
        if isinstance(event, Uploading):
            share = (event.sent / event.total) if event.total else 0.0
            base = 0.0 if event.what == "image" else 0.04
            self.headline = f"Sending the {event.what} to {self.label}…"
            self._set_progress(base + 0.04 * share)
        elif isinstance(event, Submitted):
            self.headline = f"Submitted to {self.label}"
            self._set_progress(0.08)
        elif isinstance(event, QueuedEvent):
            self.estimate_s = event.estimate_s or self.estimate_s
            pos = f" — position {event.position}" if event.position is not None else ""
            where = "for the local renderer" if self.provider == "local" else f"in {self.label}'s queue"
            self.headline = f"Waiting {where}{pos}"
            self._set_progress(0.10)
        elif isinstance(event, ProcessingEvent):
            self.estimate_s = event.estimate_s or self.estimate_s
            self.headline = "Rendering the preview" if self.provider == "local" else "Generating the video"
            if event.progress is not None:
                self._set_progress(0.10 + 0.85 * max(0.0, min(1.0, event.progress)))
            elif self.estimate_s:
                share = min(ESTIMATE_CAP, event.elapsed / self.estimate_s)
                self._set_progress(0.10 + 0.85 * share, estimate=True)
            else:
                self.progress = None
            if event.logs:
                self.details.append(f"Provider says: {md_escape(event.logs[-1][:200])}")
        elif isinstance(event, Downloading):
            share = (event.received / event.total) if event.total else 0.0
            self.headline = "Downloading the finished video…"
            self._set_progress(0.95 + 0.05 * share)
        elif isinstance(event, Done):
            self.finished = True
            self.headline = f"Done in {format_duration(event.elapsed)}"
            note = getattr(event, "note", "")
            if note and not getattr(event, "metadata", {}).get("face_found", True):
                self.headline += ", but no face was found in the portrait"
            self._set_progress(1.0)
            if note:
                self.details.append(f"**{md_escape(note)}**")
            if event.duration_s:
                self.details.append(f"Video length {event.duration_s:.1f} s.")
            if event.cost_usd is not None and self.cost is not None and self.cost.usd is not None \
                    and abs(event.cost_usd - self.cost.usd) >= 0.005:
                self.details.append(f"At that length it costs about {format_usd(event.cost_usd)} "
                                    f"(estimated {format_usd(self.cost.usd)} before it started).")
            if event.notice:
                self.details.append(f"**{md_escape(event.notice)}**")
        elif isinstance(event, FailedEvent):
            return self.failed(event.message, kind=event.kind)
        return self.render()

    def _set_progress(self, value: float, *, estimate: bool = False) -> None:
        # Never moves backwards: a late heartbeat must not undo a reported step.
        self.progress = max(self.progress or 0.0, value)
        self.progress_is_estimate = estimate

    # -- other frames

    def message(self, headline: str, detail: str = "") -> str:
        """A frame that is not a job event (checking files, waiting for the renderer)."""
        self.headline = headline
        self.details = [detail] if detail else []
        return self.render()

    def failed(self, message: str, *, kind: str = "error") -> str:
        self.finished = True
        cancelled = kind == "JobCancelled"
        self.headline = "Cancelled" if cancelled else "The video could not be made"
        parts = [f"### {self.headline}", md_escape(message)]
        parts.append(self._facts())
        return "\n\n".join(p for p in parts if p)

    # -- rendering

    def render(self) -> str:
        lines = [f"### {md_escape(self.headline)}", self._bar(), self._facts()]
        lines += self.details
        return "\n\n".join(line for line in lines if line)

    def _bar(self) -> str:
        if self.progress is None:
            return '<progress class="job-progress" max="100"></progress>'
        pct = round(100 * self.progress)
        approx = " (estimated from typical times)" if self.progress_is_estimate else ""
        return f'<progress class="job-progress" value="{pct}" max="100"></progress> **{pct}%**{approx}'

    def _facts(self) -> str:
        facts = [f"Elapsed **{format_duration(self.elapsed_s)}**"]
        if self.estimate_s and not self.finished:
            facts.append(f"usually about **{format_duration(self.estimate_s)}**")
        what = f"{self.label}, {self.tier}" + ("" if self.provider == "local" else f", Kling {self.version}")
        facts.append(what)
        if self.cost is not None and self.cost.usd is not None and self.cost.usd > 0:
            facts.append(f"estimated **{format_usd(self.cost.usd)}**")
        if self.request_id:
            facts.append(f"request id `{self.request_id}`")
        return " · ".join(facts)


# ----------------------------------------------------------------------------- session history


def history_entry(done: Done, *, tier: str, version: str, cost_usd: float | None, now: float | None = None) -> dict:
    """What the in-session list keeps about a finished video (no key, no provider URLs)."""
    return {
        "provider": done.provider,
        "request_id": done.request_id,
        "path": str(done.path),
        "duration_s": done.duration_s,
        "elapsed_s": done.elapsed,
        "tier": tier,
        "version": version,
        "cost_usd": cost_usd,
        "finished_at": time.strftime("%H:%M", time.localtime(now if now is not None else time.time())),
    }


def history_caption(entry: Mapping[str, Any]) -> str:
    label = short_label(entry["provider"])
    length = f"{entry['duration_s']:.1f} s" if entry.get("duration_s") else "?"
    return f"{entry['finished_at']} · {label} · {entry['tier']} · {length}"


def add_to_history(history: list[dict] | None, entry: Mapping[str, Any] | None) -> list[dict]:
    """Newest first, no duplicates, at most SESSION_HISTORY_MAX."""
    history = list(history or [])
    if not entry:
        return history
    key = (entry["provider"], entry["request_id"])
    history = [h for h in history if (h["provider"], h["request_id"]) != key]
    return [dict(entry), *history][:SESSION_HISTORY_MAX]


SESSION_EMPTY = "None yet: finished videos appear here."
SESSION_PICK = "Pick one to play it in the player above."


def history_key(entry: Mapping[str, Any]) -> str:
    return f"{entry['provider']}:{entry['request_id']}"


def history_choices(history: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(caption, key) choices of the session list; files that vanished are left out."""
    return [(history_caption(h), history_key(h)) for h in history if Path(h["path"]).is_file()]


def history_radio(history: Sequence[Mapping[str, Any]], selected: str | None = None) -> Any:
    choices = history_choices(history)
    return gr.update(choices=choices, value=selected, info=SESSION_PICK if choices else SESSION_EMPTY)


def play_from_history(key: str | None, history: list[dict] | None) -> tuple[Any, Any]:
    """Load a video from the session list into the player and the download button."""
    for entry in history or []:
        if history_key(entry) == key and Path(entry["path"]).is_file():
            return entry["path"], gr.update(value=entry["path"], visible=True)
    return gr.update(), gr.update()


# ----------------------------------------------------------------------------- visitors

# A per-browser identity for visitors who are not logged in: a random token kept in the
# browser's (encrypted) localStorage. Whoever holds it sees that browser's history, so
# it is as long as a session key and is never shown.
VISITOR_ID = re.compile(r"[A-Za-z0-9_-]{24,64}")
VISITOR_STORAGE_KEY = "talking-avatar-visitor"
VISITOR_SECRET_FILE = ".visitor-secret"


def new_visitor_id() -> str:
    return _secrets.token_urlsafe(24)


def ensure_visitor(stored: Any) -> tuple[str, str]:
    """On page load: the browser's visitor id, made on its first visit.

    Returns it twice: for the browser's storage and for the session's state.
    """
    vid = stored if isinstance(stored, str) and VISITOR_ID.fullmatch(stored) else new_visitor_id()
    return vid, vid


# Whose limits a job counts against when code calls the handlers without a web request.
DIRECT_CALLER = "direct-call"


def owner_for(request: Any, visitor: Any = None) -> str | None:
    """Whose job this is: the logged-in user, else this browser, else this API session.

    ``None`` only without a request (direct calls from code), which is how the CLI's own
    jobs are stored; a web visitor always gets an owner of their own.
    """
    if request is None:
        return None
    user = getattr(request, "username", None)
    if user:
        return f"user:{user}"
    if isinstance(visitor, str) and VISITOR_ID.fullmatch(visitor):
        return f"browser:{visitor}"
    session = getattr(request, "session_hash", None)
    return f"session:{session}" if session else f"nobody:{new_visitor_id()}"


def visitor_secret(settings: Settings) -> str:
    """The key that encrypts visitor ids in browsers, kept beside the history.

    It must outlive restarts, or every visitor would lose their history when the app
    restarts (Gradio's default is a new random key per start).
    """
    path = Path(settings.output_dir) / VISITOR_SECRET_FILE
    try:
        text = path.read_text(encoding="ascii").strip()
        if len(text) >= 32:
            return text
    except (OSError, UnicodeDecodeError):
        pass
    secret = _secrets.token_urlsafe(32)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(secret)
    except OSError:
        log.warning("could not save the visitor secret; visitors get a new identity after a restart")
    return secret


# ----------------------------------------------------------------------------- the History tab

STATUS_WORDS = {
    "submitted": "submitted",
    "queued": "queued",
    "processing": "processing",
    "downloading": "downloading",
    "completed": "done",
    "failed": "failed",
    "cancelled": "cancelled",
    "timed_out": "stopped waiting (may still finish)",
    "expired": "result expired",
    "id_unknown": "sent, request id unknown (see the provider's dashboard)",
}
HISTORY_HEADERS = ["Started", "Provider", "Tier", "Length", "Cost", "Status", "Request id"]
HISTORY_LIMIT = 200
HISTORY_EMPTY = "No jobs yet. Videos you make appear here, and stay after you close the page."


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if ts else "-"


def job_status_words(rec: Any) -> str:
    if rec.status == "id_unknown":
        return f"sent, request id unknown: look for it in your {short_label(rec.provider)} dashboard"
    return STATUS_WORDS.get(rec.status, rec.status)


def job_length(rec: Any) -> str:
    return f"{rec.audio_seconds:.1f} s" if rec.audio_seconds else "-"


def job_request_id(rec: Any) -> str:
    """The request id as shown; a job whose id never reached us says so (store.ID_UNKNOWN)."""
    return rec.request_id if getattr(rec, "request_id_known", True) else "not known"


def job_cost(rec: Any) -> float | None:
    """What the job cost: from the finished video's length when known, else the estimate."""
    actual = (rec.metadata or {}).get("cost_usd") if isinstance(getattr(rec, "metadata", None), dict) else None
    return actual if isinstance(actual, (int, float)) else rec.estimated_cost_usd


def job_caption(rec: Any) -> str:
    """One line about a stored job: when, where, tier, length, cost, status, request id."""
    cost = format_usd(job_cost(rec)) if job_cost(rec) is not None else "cost unknown"
    return (f"{_when(rec.created_at)} · {short_label(rec.provider)} · {rec.tier} · {job_length(rec)} · "
            f"{cost} · {job_status_words(rec)} · {job_request_id(rec)}")


def has_video(rec: Any) -> bool:
    return bool(rec.output_path) and Path(rec.output_path).is_file()


def history_table(records: Sequence[Any]) -> list[list[str]]:
    return [
        [_when(r.created_at), short_label(r.provider), r.tier, job_length(r),
         format_usd(job_cost(r)) if job_cost(r) is not None else "-",
         job_status_words(r) + (f": {r.error[:160]}" if r.error and r.status != "completed" else ""),
         job_request_id(r)]
        for r in records
    ]


def history_gallery(records: Sequence[Any]) -> list[tuple[str, str]]:
    """(video, caption) for every finished job whose video is still on disk."""
    return [(r.output_path, job_caption(r)) for r in records if r.status == "completed" and has_video(r)]


def job_key(provider: str, request_id: str) -> str:
    return f"{provider}:{request_id}"


def resumable_choices(records: Sequence[Any]) -> list[tuple[str, str]]:
    """Jobs the provider may still be working on, or whose video never arrived here."""
    return [(job_caption(r), job_key(r.provider, r.request_id)) for r in records
            if not r.finished and r.provider != "local"]


def job_summary(rec: Any) -> dict:
    """What the ``/history`` API returns about one job (no key, no provider URL)."""
    return {
        "provider": rec.provider, "request_id": rec.request_id if getattr(rec, "request_id_known", True) else None,
        "tier": rec.tier, "version": rec.version,
        "status": rec.status, "created_at": rec.created_at, "finished_at": rec.finished_at,
        "audio_seconds": rec.audio_seconds, "estimated_cost_usd": rec.estimated_cost_usd,
        "video": rec.output_path if has_video(rec) else None, "error": rec.error,
        "resumable": not rec.finished and rec.provider != "local",
    }


def unfinished_notice(count: int) -> str:
    if not count:
        return ""
    jobs_word = "job has" if count == 1 else "jobs have"
    return (f"**{count} earlier {jobs_word} not finished here.** Open the **History** tab to resume "
            f"{'it' if count == 1 else 'them'}: nothing you paid for is lost.")


# ----------------------------------------------------------------------------- input checks


def image_check_markdown(check) -> str:
    """The words under the portrait preview."""
    faces = len(check.faces)
    if faces == 1:
        head = f"**Face found** · {check.width}×{check.height} px"
    elif faces == 0:
        head = f"**No face found** · {check.width}×{check.height} px"
    else:
        head = f"**{faces} faces found** · {check.width}×{check.height} px"
    notes = [f"- {md_escape(w)}" for w in check.warnings]
    return "\n".join([head, *notes])


def audio_check_markdown(check) -> str:
    length = f"{check.duration_s:.1f} s" if check.duration_s < 60 else format_duration(check.duration_s)
    head = f"**{length}** of audio, sent as {check.format.upper()}"
    notes = [f"- {md_escape(w)}" for w in check.warnings]
    if check.trimmed_s:
        saved = f", saving {format_usd(check.money_saved_usd)}" if check.money_saved_usd else ""
        notes.append(f"- Trimmed {check.trimmed_s:.1f} s of silence{saved}.")
    return "\n".join([head, *notes])


def problem_markdown(message: str) -> str:
    return f"**Problem:** {md_escape(message)}"


def friendly_unexpected(exc: BaseException, secrets: Sequence[str | None] = ()) -> str:
    """Log an unexpected error server-side (keys redacted) and return words for the user."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    log.error("unexpected error in the app:\n%s", redact(text, secrets))
    return (
        f"Something went wrong inside this app ({type(exc).__name__}). Nothing was charged unless a "
        "request id is shown above. Try again; if it keeps happening, report it with the time it happened."
    )


def pick_source(upload: str | None, url: str | None):
    """The uploaded file as a ``Path``, otherwise the link text as a ``Link``, otherwise None.

    The types carry where each came from: ``upload`` is a file Gradio saved in its upload
    cache (it refuses API payloads naming any other file), ``url`` is whatever a visitor
    typed, which the checks only ever fetch over http(s) (see media/inputs.py).
    """
    from .media.inputs import Link

    if upload:
        return Path(upload)
    url = (url or "").strip()
    return Link(url) if url else None


# ----------------------------------------------------------------------------- small UI pieces


def hand_refused_uploads_to_checks(image: gr.Image) -> gr.Image:
    """Make a ``gr.Image(type="filepath")`` pass on uploads Pillow refuses.

    Gradio opens an uploaded image with Pillow before any handler runs; a file Pillow
    refuses (a decompression bomb, say) would end in Gradio's bare "Error" instead of our
    message that says what is wrong and what to do. This hands such a file on as it is,
    for :func:`avatar_core.media.inputs.check_image` to judge. (An instance attribute, not
    a subclass: Gradio writes a ``.pyi`` file beside any module that subclasses a component.)
    """
    stock = image.preprocess

    def preprocess(payload):
        try:
            return stock(payload)
        except Exception:
            path = getattr(payload, "path", None)
            if image.type == "filepath" and path:
                return str(path)
            raise

    image.preprocess = preprocess
    return image


UPLOAD_ONLY = "Upload the file itself, or paste its link in the link field."


def _in_upload_folder(path: str, folder: str) -> bool:
    """Whether ``path`` names a file inside ``folder`` (symlinks and ``..`` resolved)."""
    if "\0" in path:
        return False
    try:
        folder = Path(os.path.realpath(folder))
        target = Path(os.path.realpath(os.path.abspath(path)))
        return target != folder and target.is_relative_to(folder) and target.is_file()
    except (OSError, ValueError):
        return False


def is_own_upload(value: Any, upload_folder: str) -> bool:
    """Whether an upload parameter's raw payload is a file Gradio received as an upload.

    ``None`` (nothing uploaded) passes. Anything else must be a ``gradio.FileData``
    (the ``meta`` tag present, as the page and ``gradio_client`` send it) whose ``path``
    is a file in ``upload_folder`` (where Gradio saves uploads), and whose ``url`` is no ``data:`` URL. Gradio
    itself would download an http(s) ``path`` (no size cap, no deadline, its own address
    rules), skip every path check for a payload without ``meta``, and decode a ``data:``
    ``url`` of an image into a file: all ways round the upload limit and the link rules.
    """
    from gradio_client.utils import is_file_obj_with_meta

    if value is None:
        return True
    if not is_file_obj_with_meta(value) or value.get("meta") != {"_type": "gradio.FileData"}:
        return False
    url = value.get("url")
    if url is not None and (not isinstance(url, str) or url.strip().lower().startswith("data:")):
        return False
    path = value["path"]
    if re.match(r"^\s*[A-Za-z][A-Za-z0-9+.-]*:", path):
        return False  # http:, https:, data:, file:, ...: Gradio's upload route gives absolute paths
    return _in_upload_folder(path, upload_folder)


def accept_only_uploads(demo: gr.Blocks, *components: gr.components.Component) -> None:
    """Make ``components`` (the upload fields) take only files Gradio received as uploads.

    Checked on the raw payload, before Gradio moves, downloads or decodes anything (see
    :func:`is_own_upload`), for every event that has one of them as an input: ``/generate``
    and the page's input checks alike. Anything else ends the event with
    :data:`UPLOAD_ONLY`; a link belongs in the link field, whose fetcher applies the app's
    rules (media/fetch.py). Installed on the Blocks, not on the components: Gradio gives a
    session a fresh component (without any instance attribute) whenever an event updates
    it, as clicking an example does. That copy is given the original's own ``preprocess``
    too (see :func:`hand_refused_uploads_to_checks`), so the words for a file Gradio
    cannot open survive an example click.
    """
    originals = {c._id: c for c in components}
    stock = demo.preprocess_data

    async def preprocess_data(block_fn, inputs, state, explicit_call=False, *args, **kwargs):
        prop_inputs = getattr(block_fn, "component_prop_inputs", ()) or ()
        for i, block in enumerate(block_fn.inputs):
            original = originals.get(getattr(block, "_id", None))
            if original is None or i >= len(inputs):
                continue
            if state is not None and block._id in state:
                copy = state[block._id]
                if copy is not original and "preprocess" in vars(original) and "preprocess" not in vars(copy):
                    copy.preprocess = vars(original)["preprocess"]
            value = inputs[i]
            if i in prop_inputs and isinstance(value, dict):
                value = value.get("value")
            # Where this app's upload route saves files (fixed when the server was made).
            folder = getattr(getattr(demo, "app", None), "uploaded_file_dir", None) or demo.GRADIO_CACHE
            if not is_own_upload(value, folder):
                log.info("refused a payload for %s that is not an upload", getattr(block, "label", None) or "a file")
                raise gr.Error(UPLOAD_ONLY, print_exception=False)
        return await stock(block_fn, inputs, state, explicit_call, *args, **kwargs)

    demo.preprocess_data = preprocess_data


IDLE_STATUS = "Add a portrait and a voice clip, then press **Generate video**. Progress shows here."


def lock_controls() -> tuple[Any, Any, Any]:
    """While a job runs: Generate off, Stop on, the previous download hidden."""
    return gr.update(interactive=False), gr.update(interactive=True), gr.update(visible=False)


def unlock_controls() -> tuple[Any, Any]:
    return gr.update(interactive=True), gr.update(interactive=False)


def open_job_store(settings: Settings):
    """The job history, or None (with a log line) if its file cannot be opened.

    Losing the history must not stop the app from making videos.
    """
    try:
        from .store import open_store

        return open_store(settings)
    except Exception:
        log.exception("job history unavailable; continuing without it")
        return None


# ----------------------------------------------------------------------------- running jobs

_END = object()
# How often a watched job's elapsed time moves on the page while nothing else happens.
TICK_S = 1.0


class DetachedJob:
    """One job's events, produced by a task of its own so it outlives whoever watches it.

    A page that closes (or an API call that is dropped) only stops *following* the job:
    once submitted, it runs on to its video, which lands in the store and the History
    tab, because the user has paid for it. Before submit nothing is owed, so a watcher
    leaving cancels it. Only :meth:`RunningJobs.cancel` (the Stop button, ``/cancel``)
    stops a submitted job, cancelling it at the provider where the provider can.
    """

    def __init__(self, events: AsyncIterator[JobEvent], owner: str | None, registry: RunningJobs,
                 inputs: Sequence[str | Path] = ()) -> None:
        self.owner = owner
        self.inputs = tuple(str(p) for p in inputs if p and "://" not in str(p))  # files it reads
        self.provider: str | None = None
        self.request_id: str | None = None
        self._registry = registry
        self._queue: asyncio.Queue = asyncio.Queue()
        self._watched = True
        self._ended = False
        self.task = asyncio.create_task(self._pump(events))

    async def _pump(self, events: AsyncIterator[JobEvent]) -> None:
        try:
            async for event in events:
                if isinstance(event, Submitted):
                    self.provider, self.request_id = event.provider, event.request_id
                    self._registry._add(self)
                if self._watched:
                    self._queue.put_nowait(event)
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("background job %s ended with an error", self.request_id or "(not submitted)")
        finally:
            await events.aclose()
            self._ended = True
            self._registry._remove(self)
            self._registry._live.discard(self)
            self._queue.put_nowait(_END)

    async def follow(self) -> AsyncIterator[JobEvent]:
        """The job's events as they come; leaving early detaches (see the class doc).

        While the job waits between status reads, the last queued/processing event is
        repeated every TICK_S with a fresh ``elapsed``, so the page's clock keeps moving.
        The ticks are made here, for a watcher, not by the job: a job nobody watches
        wakes only to read its status.
        """
        loop = asyncio.get_running_loop()
        getter = None
        last, seen_at = None, 0.0
        try:
            while True:
                getter = getter or asyncio.ensure_future(self._queue.get())
                done, _ = await asyncio.wait((getter,), timeout=TICK_S)
                if not done:  # nothing new: tick
                    if isinstance(last, (QueuedEvent, ProcessingEvent)):
                        yield replace(last, elapsed=last.elapsed + loop.time() - seen_at)
                    continue
                event, getter = getter.result(), None
                if event is _END:
                    return
                last, seen_at = event, loop.time()
                yield event
        finally:
            if getter is not None:
                getter.cancel()
            self._watched = False
            if not self._ended and self.request_id is None:
                self.task.cancel()
            elif not self._ended:
                log.info("job %s continues without a watcher; it will be in its owner's history",
                         self.request_id)


class RunningJobs:
    """The submitted jobs this process is driving, by (provider, request id)."""

    def __init__(self) -> None:
        self._jobs: dict[tuple[str, str], DetachedJob] = {}
        self._live: set[DetachedJob] = set()  # submitted or not, until they end

    def start(self, events: AsyncIterator[JobEvent], *, owner: str | None,
              inputs: Sequence[str | Path] = ()) -> DetachedJob:
        """Drive ``events`` in a task of its own; ``inputs`` are the files it reads (kept from the sweep)."""
        job = DetachedJob(events, owner, self, inputs)
        if not job._ended:
            self._live.add(job)
        return job

    def inputs_in_use(self) -> set[str]:
        """The input files of every job still running here (the size sweep leaves them)."""
        return {p for job in list(self._live) for p in job.inputs}

    def find(self, provider: str, request_id: str) -> DetachedJob | None:
        return self._jobs.get((provider, request_id))

    def __len__(self) -> int:
        return len(self._jobs)

    async def cancel(self, provider: str, request_id: str, *, owner: str | None) -> bool:
        """Stop a running job of ``owner``'s (and cancel it remotely where possible)."""
        job = self._jobs.get((provider, request_id))
        if job is None or job.owner != owner:
            return False
        job.task.cancel()
        try:
            await asyncio.wait_for(asyncio.shield(job.task), timeout=15)
        except (TimeoutError, asyncio.CancelledError):
            pass
        return True

    def _add(self, job: DetachedJob) -> None:
        self._jobs[(job.provider, job.request_id)] = job

    def _remove(self, job: DetachedJob) -> None:
        if job.provider and self._jobs.get((job.provider, job.request_id)) is job:
            del self._jobs[(job.provider, job.request_id)]


# ----------------------------------------------------------------------------- upkeep


# The folders under the output folder the app writes besides the history's videos:
# normalised inputs and link downloads (up to 100 MB each, refused jobs' too), local
# renders that never became a video, and the videos folder's leftovers (.part files of
# broken downloads, files no history row names).
SWEPT_FOLDERS = ("inputs", "work", "videos")
# How often Gradio looks for old files in its upload cache (at most): hourly.
CACHE_SWEEP_EVERY_S = 3600
# The folders capped in size (AVATAR_INPUTS_MAX_MB, together), besides Gradio's upload cache.
SIZE_CAPPED_FOLDERS = ("inputs", "work")
# A file changed this recently is never removed for size: a check writing it, a render
# growing it, an upload a check is about to read (a reused input is touched when reused).
IN_USE_GRACE_S = 600


def apply_retention(store: Any, settings: Settings, *, now: float | None = None, blocks: Any = None,
                    in_use: Iterable[str | Path] = ()) -> int:
    """Delete what the retention settings say is old; returns how many files went.

    Videos of the history: per ``JobStore.cleanup`` (older than AVATAR_RETENTION_DAYS
    after the job finished, then oldest first past AVATAR_RETENTION_MAX_MB); rows stay
    and a running job's files are never touched. Every other file the app writes under
    the output folder (:data:`SWEPT_FOLDERS`) goes once it is older than
    AVATAR_RETENTION_DAYS (by modification time), except a file the history still names.
    Gradio's upload cache is swept by Gradio itself on the same age (:func:`cache_retention`).
    Then the size caps (:func:`sweep_to_size`; ``blocks`` and ``in_use`` are for it).
    """
    removed = 0
    if store is not None and not (settings.retention_days is None and settings.retention_max_mb is None):
        try:
            cleaned = store.cleanup(
                max_age_s=None if settings.retention_days is None else settings.retention_days * 86400.0,
                max_total_bytes=None if settings.retention_max_mb is None else settings.retention_max_mb * 1024 * 1024,
            )
        except Exception:
            log.exception("retention cleanup failed")
            cleaned = []
        if cleaned:
            log.info("retention: deleted %d old video(s) from %s", len(cleaned), settings.output_dir)
        removed += len(cleaned)
    removed += sweep_old_files(store, settings, now=now)
    return removed + sweep_to_size(settings, blocks=blocks, in_use=in_use, now=now)


def _oldest_first_until(files: list[tuple[Path, float, int]], max_bytes: int, protected: set[str],
                        cutoff: float) -> list[Path]:
    """Delete (path, mtime, size) oldest first until the total is at most ``max_bytes``.

    Files in ``protected`` (resolved paths) or changed at or after ``cutoff`` stay, and
    still count. Returns what went.
    """
    total = sum(size for _, _, size in files)
    gone: list[Path] = []
    for path, mtime, size in sorted(files, key=lambda f: f[1]):
        if total <= max_bytes:
            break
        if mtime >= cutoff or str(path.resolve()) in protected:
            continue
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("retention: could not delete %s: %s", path.name, exc)
            continue
        total -= size
        gone.append(path)
    return gone


def _listed(paths: Iterable[Path]) -> list[tuple[Path, float, int]]:
    out = []
    for path in paths:
        try:
            if path.is_symlink() or not path.is_file():
                continue
            st = path.stat()
        except OSError:
            continue
        out.append((path, st.st_mtime, st.st_size))
    return out


def upload_cache_files(blocks: Any) -> set[str]:
    """The files Gradio's upload cache holds for ``blocks`` (this app), minus the ones it keeps.

    Only this app's own files (uploads, and files Gradio copied there for its
    components): the default folder (``<temp>/gradio``, or GRADIO_TEMP_DIR) may be shared
    with other Gradio apps on the machine, whose files are not ours to judge. Examples and
    default values (``keep_in_cache``) stay, as Gradio's own sweep leaves them.
    """
    keep: set[str] = set()
    for component in list(getattr(blocks, "blocks", {}).values()):
        keep.update(getattr(component, "keep_in_cache", set()))
    files: set[str] = set()
    for temp_set in list(getattr(blocks, "temp_file_sets", [])):
        files.update(str(f) for f in list(temp_set))
    return files - keep


def sweep_to_size(settings: Settings, *, blocks: Any = None, in_use: Iterable[str | Path] = (),
                  now: float | None = None) -> int:
    """Hold outputs/inputs + outputs/work, and Gradio's upload cache, each to AVATAR_INPUTS_MAX_MB.

    Oldest first (by modification time) until the folder's total is at most the cap. Never
    a file in ``in_use`` (the inputs of the jobs this app is running), nor one changed in the
    last :data:`IN_USE_GRACE_S` (a check or render still writing it, an upload a check is
    reading, an input a job just reused): those still count, so a burst can leave a folder
    over its cap until they age. The upload cache is swept only when ``blocks`` (this app's
    ``gr.Blocks``) is given, and only of the app's own files (:func:`upload_cache_files`).
    Returns how many files went.
    """
    if settings.inputs_max_mb is None:
        return 0
    cap = settings.inputs_max_mb * 1024 * 1024
    cutoff = (time.time() if now is None else now) - IN_USE_GRACE_S
    protected: set[str] = set()
    for p in in_use:
        try:
            protected.add(str(Path(p).resolve()))
        except (OSError, RuntimeError, ValueError):
            continue
    root = Path(settings.output_dir)
    ours: list[Path] = []
    for folder in SIZE_CAPPED_FOLDERS:
        base = root / folder
        if base.is_dir() and not base.is_symlink():
            ours.extend(base.rglob("*"))
    removed = len(_oldest_first_until(_listed(ours), cap, protected, cutoff))
    if removed:
        log.info("retention: deleted %d old input file(s): %s over %d MB", removed,
                 " + ".join(f"{root / f}" for f in SIZE_CAPPED_FOLDERS), settings.inputs_max_mb)
    if blocks is not None:
        try:
            cached = upload_cache_files(blocks)
        except Exception:  # upkeep must never stop the app
            log.exception("retention: could not list Gradio's upload cache")
            cached = set()
        gone = _oldest_first_until(_listed(Path(f) for f in cached), cap, protected, cutoff)
        for temp_set in list(getattr(blocks, "temp_file_sets", [])):
            temp_set.difference_update(str(p) for p in gone)
        if gone:
            log.info("retention: deleted %d old upload(s) from Gradio's upload cache: over %d MB", len(gone),
                     settings.inputs_max_mb)
        removed += len(gone)
    return removed


def sweep_old_files(store: Any, settings: Settings, *, now: float | None = None) -> int:
    """Remove files older than AVATAR_RETENTION_DAYS from :data:`SWEPT_FOLDERS`; returns how many.

    A file the job history names (a finished video, a running job's) is left to the
    history's own rules. Without a history (store None), nothing names a video, so the
    videos folder is swept by age like the rest. Nothing outside these folders is
    touched (the history file and the visitor secret live beside them).
    """
    if settings.retention_days is None:
        return 0
    cutoff = (time.time() if now is None else now) - settings.retention_days * 86400.0
    keep: set[str] = set()
    if store is not None:
        try:
            keep = {str(Path(p).resolve()) for p in store.output_paths()}
        except Exception:
            log.exception("retention: could not read the history; the videos folder is left alone")
            keep = None  # type: ignore[assignment]
    root = Path(settings.output_dir)
    removed = 0
    for folder in SWEPT_FOLDERS:
        if folder == "videos" and keep is None:
            continue
        base = root / folder
        if not base.is_dir() or base.is_symlink():
            continue
        for path in base.rglob("*"):
            try:
                if path.is_symlink() or not path.is_file():
                    continue
                if folder == "videos" and str(path.resolve()) in keep:
                    continue
                if path.stat().st_mtime >= cutoff:
                    continue
                path.unlink()
                removed += 1
            except OSError as exc:
                log.warning("retention: could not delete %s: %s", path.name, exc)
    if removed:
        log.info("retention: deleted %d file(s) older than %d days under %s", removed, settings.retention_days,
                 root)
    return removed


def cache_retention(settings: Settings) -> tuple[int, int] | None:
    """``gr.Blocks(delete_cache=...)``: (how often, age) in seconds for Gradio's upload cache.

    The same age as everything else (AVATAR_RETENTION_DAYS); None (never) when unlimited.
    """
    if settings.retention_days is None:
        return None
    age = int(settings.retention_days * 86400)
    return min(CACHE_SWEEP_EVERY_S, age), age


def startup_upkeep(store: Any, settings: Settings) -> str:
    """At start-up: apply retention and say which jobs are still unfinished (for the log)."""
    apply_retention(store, settings)
    if store is None:
        return "job history unavailable: jobs will run but not be kept"
    try:
        from .store import ALL_OWNERS

        waiting = [r for r in store.unfinished(owner=ALL_OWNERS) if r.provider != "local"]
    except Exception:
        log.exception("could not read the job history")
        return "job history unreadable"
    if not waiting:
        return "no unfinished jobs in the history"
    listed = ", ".join(f"{r.provider}:{r.request_id}" for r in waiting[:10])
    more = f" and {len(waiting) - 10} more" if len(waiting) > 10 else ""
    text = f"{len(waiting)} unfinished job(s) in the history ({listed}{more}); their owners can resume them in the History tab"
    log.info(text)
    return text


# ----------------------------------------------------------------------------- handlers


def _remote_cancel_supported(provider: str) -> bool:
    """Whether the provider's client can cancel a job (read from its class, no key needed)."""
    import importlib
    import inspect

    try:
        module = importlib.import_module(f"avatar_core.providers.{provider}")
    except ImportError:
        return False
    for _name, obj in inspect.getmembers(module, inspect.isclass):
        if obj.__module__ == module.__name__ and getattr(obj, "name", None) == provider:
            return bool(getattr(obj, "supports_cancel", False))
    return False


async def _closeable_in_thread(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` in a worker thread; if the caller is cancelled meanwhile (the
    visitor left), the place or ticket it returns is closed, not left holding a slot."""
    task = asyncio.ensure_future(asyncio.to_thread(fn, *args, **kwargs))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        def close_result(done: asyncio.Future) -> None:
            if not done.cancelled() and done.exception() is None:
                done.result().close()

        task.add_done_callback(close_result)
        raise


SOMEONE_ELSES_JOB = "That job was started by someone else using this app; only they can resume it here."
NOT_YOUR_JOB_ON_SERVER_KEY = (
    "This server's key only collects jobs this app started for you, and your history has no job with that "
    "request id. For a job started elsewhere, enter the {label} API key of the account that made it."
)


class Handlers:
    """The app's event functions, bound to one :class:`Settings`.

    ``store`` is the job history (``avatar_core.store.JobStore``) or None.
    """

    def __init__(self, settings: Settings | None = None, *, store: Any = None, guard: Any = None,
                 host: str | None = None) -> None:
        from .guard import Guard

        self.settings = settings or load_settings()
        self.store = store
        self.running = RunningJobs()
        # Where the app listens decides whether anonymous visitors may spend the server's keys.
        self.guard = guard or Guard(self.settings, store, host=host or launch_options()["server_name"])
        # The checks inside /generate run on threads of their own: a call waiting for one of
        # them waits in this pool's queue, not in a thread of the event loop's default pool
        # (which Guard.enter, check_resume and the download address check need meanwhile).
        self._input_checks = ThreadPoolExecutor(INPUT_CHECK_CONCURRENCY, thread_name_prefix="avatar-input-check")
        weakref.finalize(self, self._input_checks.shutdown, wait=False, cancel_futures=True)
        # The app's gr.Blocks (set by app.build_demo): its upload cache is held to the size cap.
        self.blocks: Any = None
        # Files an input check is reading right now (uploads, local paths), by how many checks.
        self._being_checked: dict[str, int] = {}
        self._being_checked_lock = threading.Lock()

    def sweep_to_size(self) -> int:
        """The size caps (:func:`sweep_to_size`), sparing the running jobs' inputs and the
        files being checked; never raises."""
        try:
            with self._being_checked_lock:
                checking = set(self._being_checked)
            return sweep_to_size(self.settings, blocks=self.blocks,
                                 in_use=self.running.inputs_in_use() | checking)
        except Exception:  # upkeep must never stop a check or a job
            log.exception("retention: the size sweep failed")
            return 0

    @contextmanager
    def _checking(self, *sources: str | None):
        """While a check reads ``sources`` (the local ones), the size sweep leaves them."""
        # Files only: a Link (a visitor's typed text) names nothing on this machine.
        paths = [os.fspath(src) for src in sources if isinstance(src, (str, os.PathLike)) and src
                 and "://" not in os.fspath(src)]
        with self._being_checked_lock:
            for p in paths:
                self._being_checked[p] = self._being_checked.get(p, 0) + 1
        try:
            yield
        finally:
            with self._being_checked_lock:
                for p in paths:
                    left = self._being_checked.get(p, 1) - 1
                    if left > 0:
                        self._being_checked[p] = left
                    else:
                        self._being_checked.pop(p, None)
            self.sweep_to_size()  # the check may have written files

    @property
    def server_keys_open(self) -> bool:
        """Whether every visitor may use the server's keys (anonymous use allowed, or all must log in)."""
        from .guard import auth_credentials

        return self.guard.anonymous_may_use_server_keys or auth_credentials(self.settings) is not None

    # -- choices

    def provider_changed(self, provider: str) -> tuple[Any, str]:
        """New version choices and the note under the provider."""
        choices, value = version_dropdown(provider)
        return gr.update(choices=choices, value=value), provider_note(provider, self.settings, self.server_keys_open)

    def cost(self, provider: str, tier: str, version: str, seconds: float | None) -> str:
        return cost_markdown(provider, tier, version or None, seconds)

    # -- input checks (run as soon as an input arrives)

    def check_image(self, upload: str | None, url: str | None) -> tuple[Any, str]:
        """(preview with the face boxed, words) for the portrait."""
        from .media.inputs import check_image

        source = pick_source(upload, url)
        if source is None:
            return None, ""
        try:
            with self._checking(source):
                check = check_image(source, settings=self.settings)
        except AvatarError as exc:
            return None, problem_markdown(exc.message)
        except Exception as exc:
            return None, problem_markdown(friendly_unexpected(exc))
        return check.preview, image_check_markdown(check)

    def check_audio(
        self, upload: str | None, url: str | None, provider: str, tier: str, version: str, trim: bool
    ) -> tuple[Any, str, float | None]:
        """(waveform picture, words, duration in seconds) for the voice track."""
        from .media.inputs import check_audio

        source = pick_source(upload, url)
        if source is None:
            return None, "", None
        try:
            with self._checking(source):
                check = check_audio(
                    source, provider=provider, settings=self.settings, trim_silence=bool(trim), tier=tier,
                    version=version or None,
                )
        except AvatarError as exc:
            return None, problem_markdown(exc.message), None
        except Exception as exc:
            return None, problem_markdown(friendly_unexpected(exc)), None
        return str(check.waveform_png), audio_check_markdown(check), check.duration_s

    # -- the job

    async def generate(
        self,
        image: str | None = None,
        audio: str | None = None,
        provider: str = "local",
        tier: str = "standard",
        prompt: str = "",
        api_key: str = "",
        version: str = "",
        image_url: str = "",
        audio_url: str = "",
        trim_silence: bool = False,
        visitor: str | None = None,
        request: gr.Request | None = None,
    ) -> AsyncIterator[tuple[str, str, str | None, dict | None]]:
        """Make one talking-avatar video; yields (status Markdown, request id, video path, job).

        ``image``/``audio`` are files; ``image_url``/``audio_url`` public links used when no
        file is given. ``api_key`` is the caller's own key for ``provider``, used for this
        request only. The last frame carries the MP4 (on success) or says what went wrong.
        ``visitor`` is the browser's id (session state, not an API parameter).
        """
        board = StatusBoard(provider=provider or "local", tier=tier or "standard")
        inner = self._generate(board, image, audio, provider, tier, prompt, (api_key or "").strip() or None,
                               version, image_url, audio_url, trim_silence, owner_for(request, visitor),
                               bool(getattr(request, "username", None)))
        async for status, rid, video, job in self._keep_keys_out(api_key, board, inner, 4):
            yield status, rid, video, job

    async def _keep_keys_out(self, api_key: str | None, board: StatusBoard, frames: AsyncIterator[tuple],
                             width: int):
        """Pass ``frames`` on with every key redacted from the status; a bug becomes words.

        The user's key is registered for log redaction while the frames run. A frame is
        ``width`` values: (status, request id, *outputs that are None on failure).
        """
        key = (api_key or "").strip() or None
        # Kling keys come as ACCESS:SECRET; either half alone must not show either.
        user_secrets = (key, *(p.strip() for p in key.split(":"))) if key else ()
        secrets = [*user_secrets, *configured_secrets(self.settings)]
        token = _ACTIVE_SECRETS.set(tuple(s for s in user_secrets if s))
        try:
            async for frame in frames:
                yield (redact(frame[0], secrets), *frame[1:])
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            failed = board.failed(friendly_unexpected(exc, secrets), kind="InternalError")
            yield (failed, board.request_id or "", *([None] * (width - 2)))
        finally:
            await frames.aclose()
            try:
                _ACTIVE_SECRETS.reset(token)
            except ValueError:  # closed from another context (a cancelled task): nothing to undo there
                pass

    async def _generate(self, board, image, audio, provider, tier, prompt, key, version, image_url, audio_url,
                        trim_silence, owner, logged_in):
        from .jobs import run_job

        def frame(status: str, video: str | None = None, job: dict | None = None):
            return status, board.request_id or "", video, job

        problem = key_problem(key) if key else None
        if problem:  # before any input check, upload or submit
            yield frame(board.failed(problem))
            return
        image_src = pick_source(image, image_url)
        audio_src = pick_source(audio, audio_url)
        if image_src is None or audio_src is None:
            missing = " and ".join(w for w, s in (("a portrait", image_src), ("a voice clip", audio_src)) if s is None)
            yield frame(board.failed(f"Add {missing} first (upload a file or paste a link)."))
            return
        if tier not in TIERS:
            yield frame(board.failed(f"Unknown tier {tier!r}: choose standard or pro."))
            return
        provider_ids = {i.id for i in provider_choices(self.settings) if i.available}
        if provider not in provider_ids:
            yield frame(board.failed(f"Unknown provider {provider!r}. Choose one of: {', '.join(sorted(provider_ids))}."))
            return
        version = version or default_version(provider)
        board.version = version

        from .guard import LimitReached

        try:
            # Before any file is decoded: may this visitor start a job now, on whose key? The
            # place holds their in-progress slot while the files are checked.
            place = await _closeable_in_thread(
                self.guard.enter, owner or DIRECT_CALLER, provider=provider, uses_server_key=key is None,
                logged_in=logged_in,
            )
        except LimitReached as exc:
            yield frame(board.failed(exc.message))
            return
        try:
            yield frame(board.message("Checking your files…"))
            try:
                prepared = await self._checked_inputs(
                    image_src, audio_src, provider=provider, tier=tier, version=version,
                    trim_silence=bool(trim_silence),
                )
            except AvatarError as exc:
                yield frame(board.failed(exc.message))
                return
            board.cost = prepared.cost
            from .jobs import inputs_to_send

            # The checked files, never the links: the provider must get the bytes that were priced.
            image_in, audio_in = inputs_to_send(prepared, provider)
            try:
                # Before anything is uploaded: within the day's limits and budget at this price?
                ticket = await _closeable_in_thread(place.admit, prepared.cost.usd)
            except LimitReached as exc:
                yield frame(board.failed(exc.message))
                return
        finally:
            place.close()  # frees the slot unless the ticket took it over
        try:
            # The ticket lives as long as the job is driven (watched or not), so closing
            # the page does not free a visitor's slot while their job still runs.
            jobs = ticket.watch(run_job(
                provider, image_in, audio_in, tier=tier, version=version, prompt=prompt or "",
                settings=self.settings, api_key=key, store=self.store, owner=owner,
                audio_seconds=prepared.audio.duration_s, estimated_cost_usd=prepared.cost.usd,
            ))
            job = self.running.start(jobs, owner=owner, inputs=(image_in, audio_in))
        except BaseException:
            ticket.close()
            raise
        events = job.follow()
        try:
            async for event in events:
                if isinstance(event, Done):
                    cost = event.cost_usd if event.cost_usd is not None else (board.cost.usd if board.cost else None)
                    entry = history_entry(event, tier=tier, version=version, cost_usd=cost)
                    yield frame(board.update(event), str(event.path), entry)
                    return
                yield frame(board.update(event))
        finally:
            await events.aclose()

    async def _checked_inputs(self, image_src, audio_src, **kw):
        """prepare_inputs on the app's own input-check threads: at most INPUT_CHECK_CONCURRENCY
        at once, all visitors together; the rest wait in that pool's queue (holding no thread).
        A caller that leaves while still queued takes its check out of the queue."""
        from .media.inputs import prepare_inputs

        def check():
            with self._checking(image_src, audio_src):
                return prepare_inputs(image_src, audio_src, settings=self.settings, **kw)

        # The caller's context goes along (the keys to redact from any log line, as to_thread does).
        context = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(self._input_checks, context.run, check)

    # -- after a job, and the Stop button

    def finished(self, job: dict | None, history: list[dict] | None) -> tuple[Any, Any, list[dict]]:
        """Add a finished job to the session list; show its download button."""
        if job:
            apply_retention(self.store, self.settings, blocks=self.blocks, in_use=self.running.inputs_in_use())
        history = add_to_history(history, job)
        download = gr.update(value=job["path"], visible=True) if job else gr.update()
        return download, history_radio(history, history_key(job) if job else None), history

    async def stopped(self, provider: str = "", request_id: str = "", visitor: str | None = None,
                      request: gr.Request | None = None) -> str:
        """Stop a running job of the caller's (the Stop button and the ``/cancel`` endpoint).

        Says honestly what happens at the provider.
        """
        provider, request_id = (provider or "").strip(), (request_id or "").strip()
        label = short_label(provider)
        found = bool(request_id) and await self.running.cancel(provider, request_id,
                                                               owner=owner_for(request, visitor))
        if not request_id:
            text = "Stopped before anything was submitted: nothing was charged."
        elif not found:
            text = (f"Job `{md_escape(request_id)}` is not running in this app for you (it may have finished: "
                    "see the History tab).")
        elif provider == "local":
            text = "Stopped the local preview."
        elif _remote_cancel_supported(provider):
            text = f"Stopped. {label} was asked to cancel job `{request_id}`."
        else:
            text = (
                f"Stopped waiting. {label} cannot cancel a job once it has started, so job `{request_id}` "
                "may still finish and be billed. Keep the request id to collect the video later."
            )
        return "\n\n".join(["### Stopped", text])

    # -- the History tab and the /history and /resume endpoints

    def _records(self, owner: str | None) -> list[Any]:
        if self.store is None or owner is None:
            return []
        try:
            return self.store.list_jobs(owner=owner, limit=HISTORY_LIMIT)
        except Exception:
            log.exception("could not read the job history")
            return []

    def show_history(self, visitor: str | None = None, request: gr.Request | None = None) -> tuple[Any, ...]:
        """(gallery, table, resumable-jobs choice, History tab notice, main tab notice, Resume button)."""
        records = self._records(owner_for(request, visitor))
        resumable = resumable_choices(records)
        if self.store is None:
            note = "The job history is not available on this server (see its log); new jobs still work."
        elif not records:
            note = HISTORY_EMPTY
        else:
            note = f"{len(records)} job{'s' if len(records) != 1 else ''}, newest first. Only you can see them."
        pick = gr.update(choices=resumable, value=resumable[0][1] if resumable else None,
                         info=None if resumable else "Nothing to resume: every job has finished.")
        return (history_gallery(records), history_table(records), pick, note, unfinished_notice(len(resumable)),
                gr.update(interactive=bool(resumable)))

    def history_api(self, visitor: str | None = None, request: gr.Request | None = None) -> list[dict]:
        """The caller's own jobs, newest first, as plain data (the ``/history`` endpoint)."""
        return [job_summary(r) for r in self._records(owner_for(request, visitor))]

    async def resume(
        self,
        provider: str = "wavespeed",
        request_id: str = "",
        api_key: str = "",
        visitor: str | None = None,
        request: gr.Request | None = None,
    ) -> AsyncIterator[tuple[str, str, str | None]]:
        """Continue a job from its provider and request id; yields (status, request id, video).

        For jobs of this app (listed in History) and jobs started elsewhere with the same
        account. Nothing is submitted, so nothing new is charged.
        """
        provider = (provider or "").strip()
        request_id = (request_id or "").strip()
        record = None
        if self.store is not None and provider and request_id:
            try:
                record = self.store.get(provider, request_id)
            except Exception:
                log.exception("could not read the job history")
        board = StatusBoard(provider=provider or "wavespeed", tier=getattr(record, "tier", None) or "standard",
                            version=getattr(record, "version", None) or default_version(provider or "wavespeed"))
        owner = owner_for(request, visitor)
        inner = self._resume(board, provider, request_id, (api_key or "").strip() or None, owner, record,
                             bool(getattr(request, "username", None)))
        async for frame in self._keep_keys_out(api_key, board, inner, 3):
            yield frame

    async def _resume(self, board, provider, request_id, key, owner, record, logged_in=False):
        from .guard import LimitReached
        from .jobs import resume as resume_job

        board.request_id = request_id or None
        problem = key_problem(key) if key else None
        if problem:
            yield board.failed(problem), request_id, None
            return
        hosted = hosted_provider_ids(self.settings)
        if provider not in hosted:
            yield board.failed(f"Pick the provider the job was sent to ({', '.join(hosted)})."), request_id, None
            return
        # A job in the history is resumed only by its owner: another visitor's, and the CLI's
        # (no owner), are not handed to whoever knows the id, whatever key they bring.
        if record is not None and record.owner != owner:
            yield board.failed(SOMEONE_ELSES_JOB), request_id, None
            return
        if record is not None and record.status == "completed" and has_video(record):
            board.finished = True
            yield board.message("Already finished", "The video is in your history; it is shown below."), \
                request_id, record.output_path
            return
        if self.running.find(provider, request_id) is not None:
            yield board.message("Still running here", "This app is already following that job; its video will "
                                "appear in the History tab when it is done."), request_id, None
            return
        if key is None and self.settings.has_key(provider):
            # Polling and downloading on the server's key: the same gate as Generate, and only
            # for a job this app submitted for this visitor (never one it learns of by its id).
            try:
                await asyncio.to_thread(self.guard.check_resume, provider, uses_server_key=True,
                                        logged_in=logged_in)
            except LimitReached as exc:
                yield board.failed(exc.message), request_id, None
                return
            if record is None:
                yield board.failed(NOT_YOUR_JOB_ON_SERVER_KEY.format(label=board.label)), request_id, None
                return
        yield board.message(f"Asking {board.label} about job `{md_escape(request_id)}`…"), request_id, None
        # Detached like a new job: closing the page must not cancel a paid job at the provider.
        job = self.running.start(resume_job(provider, request_id, tier=board.tier, settings=self.settings,
                                            api_key=key, store=self.store, owner=owner), owner=owner)
        events = job.follow()
        try:
            async for event in events:
                status = board.update(event)
                if isinstance(event, Done):
                    yield status, request_id, str(event.path)
                    return
                yield status, request_id, None
        finally:
            await events.aclose()

    async def resume_selected(self, choice: str | None, api_key: str = "", visitor: str | None = None,
                              request: gr.Request | None = None) -> AsyncIterator[tuple[str, str, str | None]]:
        """The History tab's Resume button: ``choice`` is ``provider:request_id``."""
        provider, _, request_id = (choice or "").partition(":")
        if not request_id:
            yield "Pick a job to resume from the list first.", "", None
            return
        async for frame in self.resume(provider, request_id, api_key, visitor, request):
            yield frame
