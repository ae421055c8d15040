"""Money that must not leak (issue 14, items 4 and 7), against the loopback emulator.

- A submit answered HTTP 200 with something unreadable is "sent, request id unknown"
  (SubmitUncertain) for every provider: the user is told a paid job probably exists and
  where to find it, the job is kept in the history and the ledger keeps the charge.
- The ledger is corrected from the finished video's real length, and a correction that
  takes the server's keys over their daily cap is said plainly.
"""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from datetime import datetime, UTC
from pathlib import Path

import pytest

from avatar_core import jobs
from avatar_core.config import Secret, load_settings
from avatar_core.emulator import Emulator, Fault, tone_video_maker
from avatar_core.events import Done, FailedEvent, Submitted
from avatar_core.guard import Guard
from avatar_core.media.pricing import estimate_cost
from avatar_core.store import ID_UNKNOWN, JobStore
from tests.media_factory import make_image, make_tone

NOON = datetime(2026, 11, 10, 12, 0, tzinfo=UTC).timestamp()
AUDIO_S = 2.5

# provider -> (submit path, version, dashboard words in the message, a readable-looking reply without an id)
PROVIDERS = {
    "wavespeed": (r"^/api/v3/kwaivgi/kling-v1-ai-avatar-standard$", "v1", "WaveSpeed dashboard",
                  {"code": 200, "message": "success", "data": {"status": "created"}}),
    "segmind": (r"^/v2/kling-v1-standard-ai-avatar$", "v1", "Segmind console", {"status": "QUEUED"}),
    "fal": (r"^/fal-ai/kling-video/v1/standard/ai-avatar$", "v1", "fal.ai dashboard", {"status": "IN_QUEUE"}),
    "replicate": (r"^/v1/models/kwaivgi/kling-avatar-v2/predictions$", "v2", "Replicate dashboard",
                  {"status": "starting"}),
}  # fmt: skip


def spoilt_reply(kind: str, path: str, no_id_body: dict) -> Fault:
    """A 200 answer to the submit that cannot be read; the job is created first (handle=True)."""
    if kind == "not_json":
        return Fault("html", path, method="POST", handle=True)
    if kind == "no_id":
        return Fault("body", path, method="POST", handle=True, body=no_id_body)
    assert kind == "truncated"  # a JSON answer cut off mid-way
    return Fault("body", path, method="POST", handle=True, body=b'{"id": "0f3a9', content_type="application/json")


class Clock:
    def __init__(self, t: float = NOON) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture(scope="module")
def emu():
    with Emulator(queue_s=0.05, processing_s=0.2, video_maker=tone_video_maker) as emulator:
        yield emulator


@pytest.fixture
def settings(emu, tmp_path: Path):
    emu.reset()
    base = load_settings(env={}, dotenv_path=None)
    return replace(
        base,
        wavespeed_api_key=Secret("ws-money-key-0001"), wavespeed_base_url=emu.url,
        segmind_api_key=Secret("sm-money-key-0002"), segmind_base_url=emu.url,
        segmind_upload_url=emu.url + "/upload-asset",
        fal_key=Secret("fal-money-key-0003"), fal_base_url=emu.url,
        replicate_api_token=Secret("r8-money-key-0004"), replicate_base_url=emu.url,
        output_dir=tmp_path / "out", poll_typical_s=0.5, deadline_s=60,
    )  # fmt: skip


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("money-inputs")
    return make_image(d / "face.png", "PNG", (480, 600)), make_tone(d / "voice.wav", "wav", AUDIO_S)


def ledger_rows(store: JobStore) -> list[tuple]:
    with sqlite3.connect(store.path) as conn:
        return conn.execute("SELECT state, request_id, cost_microusd, paid_by_server FROM usage_ledger").fetchall()


async def drive(guard: Guard, provider: str, image, audio, settings, store, *, cost: float | None,
                audio_seconds: float = AUDIO_S, version: str | None = None) -> list:
    ticket = guard.admit("alice", provider=provider, uses_server_key=True, estimated_cost_usd=cost, logged_in=False)
    run = jobs.run_job(provider, image, audio, settings=settings, store=store, owner="alice", version=version,
                       audio_seconds=audio_seconds, estimated_cost_usd=cost)
    events = [e async for e in ticket.watch(run)]
    assert ticket.closed
    return events


# ----------------------------------------------------------------- item 7: a 200 submit reply we cannot read


@pytest.mark.parametrize("kind", ["not_json", "no_id", "truncated"])
@pytest.mark.parametrize("provider", sorted(PROVIDERS))
async def test_an_unreadable_200_submit_reply_is_a_paid_job_with_an_unknown_id(
    emu, settings, media, tmp_path, provider, kind
):
    path, version, dashboard, no_id_body = PROVIDERS[provider]
    image, audio = media
    store = JobStore(tmp_path / "jobs.sqlite3")
    guard = Guard(settings, store, host="127.0.0.1", clock=Clock())
    cost = estimate_cost(provider, "standard", version, AUDIO_S).usd
    emu.faults.add(spoilt_reply(kind, path, no_id_body))

    events = await drive(guard, provider, image, audio, settings, store, cost=cost)

    failed = events[-1]
    assert isinstance(failed, FailedEvent) and failed.kind == "SubmitUncertain", failed
    assert not any(isinstance(e, Submitted) for e in events) and failed.request_id is None
    assert "A paid job has probably been created" in failed.message and dashboard in failed.message
    assert "before submitting again" in failed.message and "HTTP 200" in failed.message
    # Sent exactly once, and the provider did create the job the user is told about.
    assert len(emu.requests_to("POST", path)) == 1 and len(emu.jobs) == 1
    # The history keeps it (no request id), and it is not offered for resuming.
    [row] = store.list_jobs(owner="alice")
    assert row.status == ID_UNKNOWN and not row.request_id_known and row.provider == provider
    assert row.estimated_cost_usd == cost and dashboard in row.error and row.audio_seconds == AUDIO_S
    assert store.unfinished(owner="alice") == []
    # The ledger keeps the charge: the job counts and its cost stays spent.
    assert ledger_rows(store) == [("submitted", None, round(cost * 1_000_000), 1)]
    assert guard.usage_today("alice") == (1, round(cost * 1_000_000))


async def test_the_history_shows_the_unknown_id_job_in_words(emu, settings, media, tmp_path):
    from avatar_core import ui

    path = PROVIDERS["wavespeed"][0]
    image, audio = media
    store = JobStore(tmp_path / "jobs.sqlite3")
    emu.faults.add(Fault("html", path, method="POST", handle=True))
    events = [e async for e in jobs.run_job("wavespeed", image, audio, settings=settings, store=store, owner="bo")]
    assert events[-1].kind == "SubmitUncertain"
    records = store.list_jobs(owner="bo")
    [line] = ui.history_table(records)
    assert line[-1] == "not known"
    assert line[-2].startswith("sent, request id unknown: look for it in your WaveSpeed dashboard")
    assert ui.resumable_choices(records) == []
    assert ui.job_summary(records[0])["request_id"] is None


async def test_a_readable_reply_still_starts_the_job(emu, settings, media, tmp_path):
    # The other side of the coin: the same code path with an answer we can read.
    image, audio = media
    store = JobStore(tmp_path / "jobs.sqlite3")
    guard = Guard(settings, store, host="127.0.0.1", clock=Clock())
    events = await drive(guard, "segmind", image, audio, settings, store, cost=2.28)
    assert isinstance(events[-1], Done), events[-1]
    assert store.get("segmind", events[-1].request_id).status == "completed"


# ----------------------------------------------------------------- item 4: the ledger follows the real video


async def test_a_longer_video_than_estimated_corrects_the_ledger_and_says_the_cap_was_passed(
    emu, settings, media, tmp_path
):
    # Admitted at the price of a 3 s clip (one 5 s block, $0.25) under a $1 cap; the
    # provider renders 21 s (5 blocks, $1.25). The ledger must hold $1.25, and the user
    # must read that the cap is now passed.
    image, _ = media
    long_audio = make_tone(tmp_path / "long.wav", "wav", 21.0)
    capped = replace(settings, daily_spend_cap_usd=1.0, allow_anonymous_server_keys=True)
    store = JobStore(tmp_path / "jobs.sqlite3")
    guard = Guard(capped, store, host="0.0.0.0", clock=Clock())

    events = await drive(guard, "wavespeed", image, long_audio, capped, store, cost=0.25, audio_seconds=3.0)

    done = events[-1]
    assert isinstance(done, Done), done
    assert done.duration_s == pytest.approx(21.0, abs=0.2) and done.cost_usd == 1.25
    assert ledger_rows(store) == [("submitted", done.request_id, 1_250_000, 1)]
    assert guard.usage_today("alice").server_spend_microusd == 1_250_000
    assert "cost $1.25, more than the $0.25 estimated" in done.notice
    assert "daily budget for its own keys ($1.00) over its limit" in done.notice and "00:00 UTC" in done.notice
    row = store.get("wavespeed", done.request_id)
    assert row.metadata["cost_usd"] == 1.25 and row.metadata["video_seconds"] == pytest.approx(21.0, abs=0.2)
    assert row.estimated_cost_usd == 0.25  # the estimate stays on record beside the real cost
    # And the next job on the server's key is refused by the corrected spend.
    from avatar_core.guard import LimitReached

    with pytest.raises(LimitReached, match=r"\$1.25 spent"):
        guard.admit("bob", provider="wavespeed", uses_server_key=True, estimated_cost_usd=0.25, logged_in=False)


async def test_the_ledger_follows_the_real_length_both_ways_without_a_notice_under_the_cap(
    emu, settings, media, tmp_path
):
    image, audio = media  # 2.5 s: one block, $0.25
    store = JobStore(tmp_path / "jobs.sqlite3")
    guard = Guard(settings, store, host="127.0.0.1", clock=Clock())
    # Over-estimated (say the estimate assumed an untrimmed 12 s): corrected down to one block.
    events = await drive(guard, "wavespeed", image, audio, settings, store, cost=0.75, audio_seconds=12.0)
    done = events[-1]
    assert isinstance(done, Done) and done.cost_usd == 0.25 and done.notice == ""
    assert ledger_rows(store) == [("submitted", done.request_id, 250_000, 1)]
    # Per-second prices (fal.ai): the real 2.5 s, not the 1 s estimated.
    events = await drive(guard, "fal", image, audio, settings, store, cost=0.0562, audio_seconds=1.0)
    done = events[-1]
    assert isinstance(done, Done) and done.cost_usd == pytest.approx(0.0562 * done.duration_s, abs=1e-4)
    assert ledger_rows(store)[1] == ("submitted", done.request_id, round(done.cost_usd * 1_000_000), 1)


@pytest.mark.parametrize("how", ["restart", "timeout"])
async def test_a_job_finished_through_resume_corrects_its_ledger_row(emu, settings, media, tmp_path, how):
    # Admitted at the price of a 3 s clip; the provider renders 21 s. The job is left
    # before its video, so no ticket is left to settle: "restart", WaveSpeed, the app goes
    # away right after the submit (its job is dropped, as a restart drops it); "timeout",
    # fal.ai, the job passes the app's deadline and is left running. Resume finishes it and
    # must correct the row.
    from avatar_core.emulator import JobPlan

    provider = "wavespeed" if how == "restart" else "fal"
    image, _ = media
    long_audio = make_tone(tmp_path / "long.wav", "wav", 21.0)
    version = PROVIDERS[provider][1]
    estimate = estimate_cost(provider, "standard", version, 3.0).usd
    store = JobStore(tmp_path / "jobs.sqlite3")
    guard = Guard(settings, store, host="127.0.0.1", clock=Clock())
    ticket = guard.admit("alice", provider=provider, uses_server_key=True, estimated_cost_usd=estimate,
                         logged_in=False)
    first = settings
    if how == "timeout":
        emu.plan_jobs(JobPlan(queue_s=0.1, processing_s=3.0))
        first = replace(settings, deadline_s=1.0)
    watched = ticket.watch(jobs.run_job(provider, image, long_audio, settings=first, store=store, owner="alice",
                                        version=version, audio_seconds=3.0, estimated_cost_usd=estimate))
    rid = None
    async for event in watched:
        if isinstance(event, Submitted):
            rid = event.request_id
            if how == "restart":
                break
    await watched.aclose()
    if how == "timeout":
        assert isinstance(event, FailedEvent) and event.kind == "JobTimedOut", event
    assert ticket.closed
    other = ledger_rows(store)  # another job's row must not be touched
    store.reserve_usage(day="2026-11-10", owner="bob", provider=provider, paid_by_server=True, cost_microusd=7,
                        now=NOON, check=lambda usage: None)
    assert other == [("submitted", rid, round(estimate * 1_000_000), 1)]

    after_restart = JobStore(tmp_path / "jobs.sqlite3")
    events = [e async for e in jobs.resume(provider, rid, settings=settings, store=after_restart, owner="alice")]

    done = events[-1]
    assert isinstance(done, Done), done
    real = estimate_cost(provider, "standard", version, done.duration_s).usd
    assert done.duration_s == pytest.approx(21.0, abs=0.2) and done.cost_usd == real and real > estimate
    assert ledger_rows(store) == [("submitted", rid, round(real * 1_000_000), 1), ("reserved", None, 7, 1)]
    assert Guard(settings, after_restart, host="127.0.0.1", clock=Clock()).usage_today("alice") == (
        1, round(real * 1_000_000) + 7)  # alice's one job; everyone's server-key spend
    # Only one job went to the provider: resume never submits.
    assert len(emu.requests_to("POST", PROVIDERS[provider][0])) == 1


async def test_resuming_a_job_without_a_ledger_row_writes_none(emu, settings, media, tmp_path):
    # A job the CLI started (no guard, no row): the resume finishes it and adds nothing.
    image, audio = media
    store = JobStore(tmp_path / "jobs.sqlite3")
    run = jobs.run_job("wavespeed", image, audio, settings=settings, store=store)
    async for event in run:
        if isinstance(event, Submitted):
            rid = event.request_id
            break
    await run.aclose()
    events = [e async for e in jobs.resume("wavespeed", rid, settings=settings, store=store)]
    assert isinstance(events[-1], Done) and events[-1].cost_usd == 0.25
    assert ledger_rows(store) == []


async def test_a_per_generation_price_is_left_as_it_was(emu, settings, media, tmp_path):
    image, audio = media
    store = JobStore(tmp_path / "jobs.sqlite3")
    guard = Guard(settings, store, host="127.0.0.1", clock=Clock())
    events = await drive(guard, "segmind", image, audio, settings, store, cost=2.28)
    assert isinstance(events[-1], Done) and events[-1].cost_usd == 2.28
    assert ledger_rows(store)[0][2] == 2_280_000


def test_the_status_panel_shows_the_real_cost_and_the_cap_notice():
    from avatar_core import ui
    from avatar_core.media.pricing import CostEstimate

    board = ui.StatusBoard(provider="wavespeed", cost=CostEstimate(0.25, "1 block", "table"))
    notice = "This video is 21.0 s long, so it cost $1.25, more than the $0.25 estimated when it started."
    shown = board.update(Done("wavespeed", "r1", Path("v.mp4"), 21.0, cost_usd=1.25, notice=notice))
    assert "Video length 21.0 s." in shown and "costs about $1.25 (estimated $0.25 before it started)" in shown
    assert "21.0 s long, so it cost $1.25" in shown.replace("\\", "")
    plain = ui.StatusBoard(provider="wavespeed", cost=CostEstimate(0.25, "1 block", "table"))
    assert "costs about" not in plain.update(Done("wavespeed", "r2", Path("v.mp4"), 4.0, cost_usd=0.25))
