"""The job loop's promises, driven by a scripted in-memory provider and a fake clock.

Wire-level behaviour against the emulator is in test_providers_e2e.py; here we pin down
retries, deadlines, cancellation and the store, which need precise control of time.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import av
import numpy as np
import pytest

from avatar_core import jobs
from avatar_core.config import load_settings
from avatar_core.errors import NotSubmitted, ProtocolError, RateLimited, SubmitUncertain, TransientError
from avatar_core.events import Done, FailedEvent, ProcessingEvent, QueuedEvent, Submitted
from avatar_core.polling import PollSchedule
from avatar_core.store import JobStore
from avatar_core.providers.base import Completed, Failed, JobHandle, Processing, Queued


def make_mp4(path: Path, seconds: float = 1.0) -> Path:
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = 64, 64, "yuv420p"
        for _ in range(int(25 * seconds)):
            for p in s.encode(av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


class FakeClock:
    def __init__(self):
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


class ScriptedProvider:
    """Answers status() from a script of statuses/exceptions; records every call."""

    name = "local"  # lets the loop accept a file:// result without an HTTP server
    supports_cancel = True

    def __init__(self, script, video: Path, submit_errors=()):
        self.script = list(script)
        self.video = video
        self.submit_errors = list(submit_errors)
        self.calls: list[str] = []

    async def upload(self, path, content_type, progress=None):
        self.calls.append("upload")
        return f"file://{path}"

    async def submit(self, request):
        self.calls.append("submit")
        if self.submit_errors:
            raise self.submit_errors.pop(0)
        return JobHandle(self.name, "req-1", "model-x")

    async def status(self, handle):
        self.calls.append("status")
        item = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(item, Exception):
            raise item
        if isinstance(item, Completed):
            copy = self.video.with_name(f"copy-{len(self.calls)}.mp4")
            copy.write_bytes(self.video.read_bytes())
            return Completed(f"file://{copy}", item.metadata)
        return item

    async def result(self, handle):
        raise AssertionError("not needed")

    async def cancel(self, handle):
        self.calls.append("cancel")
        return True

    async def aclose(self):
        pass


class MemoryStore:
    def __init__(self, fail=False):
        self.rows = {}
        self.log = []
        self.fail = fail

    def record_submitted(self, **row):
        self.log.append(("record", row["request_id"]))
        if self.fail:
            raise OSError("disk full")
        self.rows[(row["provider"], row["request_id"])] = dict(row, status="submitted")

    def update(self, provider, request_id, **fields):
        self.log.append(("update", fields.get("status")))
        if not self.fail:
            self.rows[(provider, request_id)].update({k: v for k, v in fields.items() if v is not None})

    def get(self, provider, request_id):
        return None

    def typical_duration(self, provider, tier):
        return None


@pytest.fixture
def media(tmp_path):
    image = tmp_path / "face.png"
    image.write_bytes(b"\x89PNG fake")
    audio = tmp_path / "voice.wav"
    audio.write_bytes(b"RIFF fake")
    return image, audio, make_mp4(tmp_path / "result.mp4")


@pytest.fixture
def settings(tmp_path):
    return replace(load_settings(env={}, dotenv_path=None), output_dir=tmp_path / "out", deadline_s=600)


async def collect(gen):
    return [event async for event in gen]


def run(provider, media, settings, clock, **kw):
    image, audio, _ = media
    return jobs.run_job("local", image, audio, settings=settings, client=provider, clock=clock, sleep=clock.sleep, **kw)


async def test_transient_reads_are_survived_with_one_submit(media, settings):
    clock = FakeClock()
    script = [TransientError("502"), RateLimited("429", retry_after=5.0), Queued(position=3), Processing(0.5),
              Completed("x")]
    provider = ScriptedProvider(script, media[2])
    events = await collect(run(provider, media, settings, clock))
    assert provider.calls.count("submit") == 1
    assert isinstance(events[-1], Done) and events[-1].path.is_file()
    assert abs(events[-1].duration_s - 1.0) < 0.1
    assert any(isinstance(e, QueuedEvent) and e.position == 3 for e in events)
    assert any(isinstance(e, ProcessingEvent) and e.progress == 0.5 for e in events)
    assert any(s >= 5.0 for s in clock.sleeps), "Retry-After of 5 s was not honoured"


async def test_submit_is_retried_only_when_it_never_arrived(media, settings):
    clock = FakeClock()
    provider = ScriptedProvider([Completed("x")], media[2], submit_errors=[NotSubmitted("refused")])
    events = await collect(run(provider, media, settings, clock))
    assert provider.calls.count("submit") == 2 and isinstance(events[-1], Done)

    provider = ScriptedProvider([Completed("x")], media[2], submit_errors=[SubmitUncertain("sent, no answer")])
    events = await collect(run(provider, media, settings, clock))
    assert provider.calls.count("submit") == 1
    assert isinstance(events[-1], FailedEvent) and events[-1].kind == "SubmitUncertain"
    assert "status" not in provider.calls


async def test_request_id_is_stored_before_the_first_status_read(media, settings, tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    seen_at_first_read = []

    class Observing(ScriptedProvider):
        async def status(self, handle):
            seen_at_first_read.append(store.get("local", handle.request_id))
            return await super().status(handle)

    provider = Observing([Queued(1), Processing(0.4), Completed("x")], media[2])
    events = await collect(run(provider, media, settings, FakeClock(), store=store, prompt="hi",
                               audio_seconds=3.0, estimated_cost_usd=0.0))
    first = seen_at_first_read[0]
    assert first is not None and first.status == "submitted" and first.prompt == "hi"
    row = store.get("local", "req-1")
    assert row.status == "completed" and row.output_path == str(events[-1].path)
    assert [c.status for c in row.status_history] == ["submitted", "queued", "processing", "downloading",
                                                      "completed"]


async def test_a_broken_store_does_not_lose_the_job(media, settings):
    provider = ScriptedProvider([Completed("x")], media[2])
    events = await collect(run(provider, media, settings, FakeClock(), store=MemoryStore(fail=True)))
    assert isinstance(events[-1], Done)
    assert any(isinstance(e, Submitted) and e.request_id == "req-1" for e in events)


async def test_deadline_leaves_the_job_running_and_says_how_to_resume(media, settings):
    clock = FakeClock()
    provider = ScriptedProvider([Processing()], media[2])
    events = await collect(run(provider, media, replace(settings, deadline_s=120), clock))
    last = events[-1]
    assert isinstance(last, FailedEvent) and last.kind == "JobTimedOut"
    assert "req-1" in last.message and "resume" in last.message
    assert "not finished after 2 minutes" in last.message
    assert "cancel" not in provider.calls
    assert clock.now <= 121


async def test_a_short_deadline_is_told_in_seconds(media, settings):
    provider = ScriptedProvider([Processing()], media[2])
    events = await collect(run(provider, media, replace(settings, deadline_s=45), FakeClock()))
    assert "not finished after 45 s" in events[-1].message


async def test_failed_job_message_names_the_request_id(media, settings):
    provider = ScriptedProvider([Failed("content blocked by the safety filter")], media[2])
    events = await collect(run(provider, media, settings, FakeClock()))
    assert events[-1].kind == "JobFailed"
    assert "content blocked" in events[-1].message and "req-1" in events[-1].message


async def test_repeated_garbage_ends_with_a_resume_hint(media, settings):
    provider = ScriptedProvider([ProtocolError("unknown status 'weird'")], media[2])
    events = await collect(run(provider, media, settings, FakeClock()))
    assert events[-1].kind == "ProtocolError"
    assert provider.calls.count("status") == jobs.MAX_PROTOCOL_ERRORS
    assert "resume" in events[-1].message and "req-1" in events[-1].message


async def test_closing_the_generator_cancels_the_remote_job(media, settings, tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    provider = ScriptedProvider([Processing()], media[2])
    gen = run(provider, media, settings, FakeClock(), store=store)
    async for event in gen:
        if isinstance(event, ProcessingEvent):
            break
    await gen.aclose()
    assert provider.calls[-1] == "cancel"
    assert store.get("local", "req-1").status == "cancelled"


async def test_task_cancellation_cancels_the_remote_job(media, settings):
    provider = ScriptedProvider([Processing()], media[2])
    image, audio, _ = media

    async def consume():
        async for _ in jobs.run_job("local", image, audio, settings=settings, client=provider):
            pass

    task = asyncio.create_task(consume())
    for _ in range(200):
        await asyncio.sleep(0.01)
        if "status" in provider.calls:
            break
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert "cancel" in provider.calls


async def test_bad_prompt_and_unknown_tier_fail_before_anything_is_sent(media, settings):
    provider = ScriptedProvider([Completed("x")], media[2])
    events = await collect(run(provider, media, settings, FakeClock(), prompt="x" * 3000))
    assert events[-1].kind == "InputError" and "2500" in events[-1].message
    events = await collect(run(provider, media, settings, FakeClock(), tier="ultra"))
    assert events[-1].kind == "InputError" and "tier" in events[-1].message
    assert provider.calls == []


def test_prompt_control_characters_are_removed():
    assert jobs.clean_prompt("hello\x00 \x1b[31mworld\u200b ") == "hello [31mworld"


@pytest.mark.parametrize("ch", ["\u00ad", "\u200e", "\u200f", "\u2060", "\ufeff", "\u200b", "\u202e"])
def test_invisible_format_characters_are_dropped_without_a_space(ch):
    assert jobs.clean_prompt(f"{ch}gen{ch}tle{ch} nod") == "gentle nod"


def test_joiners_and_tags_stay_and_controls_become_spaces():
    flag = "\U0001F3F4\U000E0067\U000E0062\U000E0073\U000E0063\U000E0074\U000E007F"
    assert jobs.clean_prompt(f"a\u200db\u200cc {flag}") == f"a\u200db\u200cc {flag}"
    assert jobs.clean_prompt("one\rtwo\x07three\x85four\nfive\tsix") == "one two three four\nfive six"


async def test_a_waiting_job_wakes_only_to_read_its_status(media, settings):
    """No events and no wake-ups between status reads: one sleep and one event per read."""
    clock = FakeClock()
    script = [Queued(position=2)] * 3 + [Processing()] * 20 + [Completed("x")]
    provider = ScriptedProvider(script, media[2])
    plan = PollSchedule(typical_s=600.0)  # waits of up to 12 s between reads at this stage
    events = await collect(run(provider, media, settings, clock, schedule=plan))
    reads = provider.calls.count("status")
    assert reads == 24
    waiting = [e for e in events if isinstance(e, (QueuedEvent, ProcessingEvent))]
    assert len(waiting) == reads - 1  # every read but the last (Completed) is reported once
    assert clock.sleeps == [plan.interval(e.elapsed) for e in waiting]
    assert max(clock.sleeps) > 10.0
