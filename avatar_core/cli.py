"""The command line: ``python -m avatar_core generate|resume|history|emulator``.

Prints one line per status change and the final file path; exits 0 on success and
non-zero with a one-line reason on stderr otherwise. Keys come from the environment or
``.env`` only (never from arguments, which end up in shell history and process lists).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from collections.abc import AsyncIterator, Sequence

from .config import key_values, load_settings, redact
from .errors import AvatarError
from .events import Done, Downloading, FailedEvent, JobEvent, ProcessingEvent, QueuedEvent, Submitted, Uploading
from .providers.base import PROVIDER_IDS, TIERS, VERSIONS

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def describe(event: JobEvent) -> str:
    """One line for a status change, in words."""
    if isinstance(event, Uploading):
        return f"uploading {event.what}: {event.sent}/{event.total} bytes"
    if isinstance(event, Submitted):
        return f"submitted to {event.provider}: request id {event.request_id}"
    if isinstance(event, QueuedEvent):
        where = f" (position {event.position})" if event.position is not None else ""
        return f"queued{where}"
    if isinstance(event, ProcessingEvent):
        pct = f" {event.progress * 100:.0f}%" if event.progress is not None else ""
        return f"processing{pct}"
    if isinstance(event, Downloading):
        return "downloading the video" if event.received == 0 else f"downloaded {event.received} bytes"
    if isinstance(event, Done):
        dur = f" ({event.duration_s:.1f} s)" if event.duration_s else ""
        note = f". {event.note}" if event.note else ""
        return f"done{dur}: {event.path}{note}"
    if isinstance(event, FailedEvent):
        return f"failed: {event.message}"
    return str(event)


def _status_key(event: JobEvent) -> tuple:
    """What counts as a change worth a line (a status read that brings no news does not)."""
    if isinstance(event, (QueuedEvent,)):
        return ("queued", event.position)
    if isinstance(event, ProcessingEvent):
        return ("processing", None if event.progress is None else round(event.progress, 1), event.logs[-1:] )
    if isinstance(event, Downloading):
        return ("downloading", event.received == 0, event.received == event.total)
    if isinstance(event, Uploading):
        return ("uploading", event.what, event.sent == event.total)
    return (type(event).__name__,)


_submitted: dict[str, str] = {}
# The configured keys (and both halves of ACCESS:SECRET-style keys), scrubbed from every
# line this command prints or logs: a provider may echo a key back in an error message.
_secrets: list[str] = []


def _scrub(text: str) -> str:
    return redact(text, _secrets)


class _ScrubLog(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = _scrub(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = _scrub(record.exc_text)
        return True


async def _print_events(events: AsyncIterator[JobEvent], out: Path | None) -> int:
    last = None
    async for event in events:
        if isinstance(event, Submitted):
            _submitted.update(provider=event.provider, request_id=event.request_id)
        key = _status_key(event)
        if isinstance(event, FailedEvent):
            print(_scrub(f"error: {event.message}"), file=sys.stderr)
            return EXIT_FAILED
        if key != last:
            if not isinstance(event, Done):
                print(_scrub(f"[{event.elapsed:6.1f}s] {describe(event)}"), flush=True)
            last = key
        if isinstance(event, Done):
            path = event.path
            if out is not None and Path(out) != path:
                try:
                    Path(out).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(path, out)
                except OSError as exc:
                    print(f"error: cannot write the video to {out} ({exc.strerror or type(exc).__name__}); "
                          f"it is kept at {path}", file=sys.stderr)
                    return EXIT_FAILED
                path = Path(out)
            dur = f"{event.duration_s:.1f} s" if event.duration_s else "unknown length"
            # The finished line says what the user must know about the video (no face found...).
            note = f". {event.note}" if event.note else ""
            print(_scrub(f"[{event.elapsed:6.1f}s] done: {dur}{note}"), flush=True)
            print(path)
            return 0
    print("error: the job ended without a result", file=sys.stderr)
    return EXIT_FAILED


def _open_store(settings):
    try:
        from .store import JobStore

        return JobStore(settings.store_path)
    except Exception as exc:  # the job must still run without history
        logging.getLogger(__name__).warning("job history unavailable: %s", exc)
        return None


def _out_problem(out: Path | None) -> str | None:
    """Why ``--out`` cannot be written, found before anything is paid for (best effort:
    the copy at the end says so too)."""
    if out is None:
        return None
    out = Path(out)
    if out.is_dir():
        return f"error: cannot write the video to {out}: it is a folder; give a file name ending in .mp4"
    if (out.exists() and not (out.is_file() and os.access(out, os.W_OK))) or str(out.resolve()).startswith(
            ("/proc/", "/sys/", "/dev/")):
        return f"error: cannot write the video to {out}; choose a file in a folder you can write to"
    return None


async def _generate(args, settings) -> int:
    from . import jobs
    from .media.inputs import prepare_inputs

    version = args.version
    prepared = await asyncio.to_thread(
        prepare_inputs, args.image, args.audio, provider=args.provider, tier=args.tier,
        version=version, settings=settings, trim_silence=args.trim_silence,
    )
    for warning in prepared.warnings:
        print(_scrub(f"warning: {warning}"), file=sys.stderr)
    cost = prepared.cost
    price = "unknown" if cost.usd is None else f"${cost.usd:.2f}"
    print(f"inputs ok: image {prepared.image.width}x{prepared.image.height}, {len(prepared.image.faces)} face(s); "
          f"audio {prepared.audio.duration_s:.1f} s; estimated cost {price} ({cost.basis})", flush=True)
    image, audio = jobs.inputs_to_send(prepared, args.provider)
    events = jobs.run_job(
        args.provider, image, audio, tier=args.tier, version=version, prompt=args.prompt or "",
        settings=settings, store=_open_store(settings), audio_seconds=prepared.audio.duration_s,
        estimated_cost_usd=cost.usd, input_names=(_source_name(args.image), _source_name(args.audio)),
    )
    return await _print_events(events, args.out)


def _source_name(source: str) -> str:
    return source.split("?")[0].rstrip("/").rsplit("/", 1)[-1] or source


async def _resume(args, settings) -> int:
    from . import jobs

    events = jobs.resume(args.provider, args.request_id, tier=args.tier, settings=settings,
                         store=_open_store(settings))
    return await _print_events(events, args.out)


def _history(args, settings) -> int:
    """Every job in the history file (all owners: the CLI runs where the file is), newest first."""
    from .store import ALL_OWNERS, JobStore

    store = JobStore(settings.store_path)
    records = store.unfinished(owner=ALL_OWNERS) if args.unfinished else store.list_jobs(owner=ALL_OWNERS,
                                                                                            limit=args.limit)
    if not records:
        print("no unfinished jobs" if args.unfinished else "no jobs yet")
        return 0
    for r in records:
        cost = f"${r.estimated_cost_usd:.2f}" if r.estimated_cost_usd is not None else "-"
        length = f"{r.audio_seconds:.1f}s" if r.audio_seconds else "-"
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(r.created_at))
        print(f"{when}  {r.provider:<9} {r.tier:<8} {length:>7} {cost:>7}  {r.status:<11} {r.request_id}"
              + (f"  {r.output_path}" if r.output_path else ""))
    if args.unfinished:
        print("resume one with: python -m avatar_core resume --provider PROVIDER --request-id ID")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m avatar_core", description="Talking-avatar videos with Kling AI Avatar.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="make a video from an image and an audio track")
    gen.add_argument("--provider", choices=PROVIDER_IDS, default="local")
    gen.add_argument("--tier", choices=TIERS, default="standard")
    gen.add_argument("--version", choices=VERSIONS, default=None, help="model version (default: v1 where offered)")
    gen.add_argument("--image", required=True, help="portrait: a file path or a public http(s) URL")
    gen.add_argument("--audio", required=True, help="voice track: a file path or a public http(s) URL")
    gen.add_argument("--prompt", default="")
    gen.add_argument("--trim-silence", action="store_true", help="cut leading/trailing silence (cheaper)")
    gen.add_argument("--out", type=Path, default=None, help="also copy the video here")

    res = sub.add_parser("resume", help="continue a job submitted earlier")
    res.add_argument("--provider", choices=PROVIDER_IDS, required=True)
    res.add_argument("--request-id", required=True)
    res.add_argument("--tier", choices=TIERS, default=None)
    res.add_argument("--out", type=Path, default=None)

    hist = sub.add_parser("history", help="list jobs from the history file")
    hist.add_argument("--unfinished", action="store_true", help="only jobs that can still be resumed")
    hist.add_argument("--limit", type=int, default=50)

    emu = sub.add_parser("emulator", help="run the loopback provider emulator (for trying things offline)")
    emu.add_argument("--port", type=int, default=8787)
    emu.add_argument("--host", default="127.0.0.1")
    emu.add_argument("--queue-s", type=float, default=2.0, help="seconds a job stays queued")
    emu.add_argument("--processing-s", type=float, default=5.0, help="seconds a job stays processing")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "emulator":
        from .emulator import main_serve

        main_serve(args.port, host=args.host, queue_s=args.queue_s, processing_s=args.processing_s)
        return 0
    problem = _out_problem(getattr(args, "out", None))
    if problem:
        print(problem, file=sys.stderr)
        return EXIT_FAILED
    try:
        settings = load_settings()
        _secrets[:] = key_values(settings)
        for handler in logging.getLogger().handlers:
            handler.addFilter(_ScrubLog())
        if args.command == "generate":
            return asyncio.run(_generate(args, settings))
        if args.command == "history":
            return _history(args, settings)
        return asyncio.run(_resume(args, settings))
    except AvatarError as exc:
        print(_scrub(f"error: {exc}"), file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        if _submitted:
            print(f"error: interrupted; job {_submitted['request_id']} was cancelled where {_submitted['provider']} "
                  "allows it, otherwise it keeps running: resume with "
                  f"`python -m avatar_core resume --provider {_submitted['provider']} "
                  f"--request-id {_submitted['request_id']}`", file=sys.stderr)
        else:
            print("error: interrupted before anything was submitted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
