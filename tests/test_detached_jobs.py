"""ui.DetachedJob.follow: what a page watching a job receives.

The job loop reports only real news (one event per status read); the page's clock keeps
moving because the watcher repeats the last queued/processing event every TICK_S with a
fresh elapsed time. These tests drive DetachedJob with a scripted event source in real
(short) time.
"""

from __future__ import annotations

import asyncio

import pytest

from avatar_core import ui
from avatar_core.events import Done, ProcessingEvent, QueuedEvent, Submitted

TICK = 0.05


@pytest.fixture(autouse=True)
def fast_ticks(monkeypatch):
    monkeypatch.setattr(ui, "TICK_S", TICK)


async def scripted(steps):
    """Yield each event after its delay (seconds)."""
    for delay, event in steps:
        await asyncio.sleep(delay)
        yield event


async def test_a_watched_job_ticks_while_waiting_and_ends_with_the_job(tmp_path):
    processing = ProcessingEvent("wavespeed", "r-1", elapsed=40.0, estimate_s=460.0)
    done = Done("wavespeed", "r-1", tmp_path / "v.mp4", 3.0, {}, 41.0)
    job = ui.RunningJobs().start(scripted([(0, Submitted("wavespeed", "r-1", "m", 0.0)), (0, processing),
                                           (12 * TICK, done)]), owner=None)
    seen = [event async for event in job.follow()]
    assert seen[0].request_id == "r-1" and seen[1] is processing and seen[-1] is done
    ticks = seen[2:-1]
    assert 6 <= len(ticks) <= 13, len(ticks)
    assert all(isinstance(t, ProcessingEvent) and t.request_id == "r-1" and t.estimate_s == 460.0 for t in ticks)
    elapsed = [t.elapsed for t in ticks]
    assert elapsed == sorted(elapsed) and elapsed[0] > 40.0 and elapsed[-1] < 40.0 + 13 * TICK * 2


async def test_no_event_is_lost_or_reordered_around_ticks():
    events = [QueuedEvent("segmind", "r-2", position=p, elapsed=float(i)) for i, p in enumerate(range(30, 0, -1))]
    # Delays straddle the tick: some events arrive just before, some just after one.
    steps = [(TICK * (0.5 + (i % 5) * 0.4), e) for i, e in enumerate(events)]
    job = ui.RunningJobs().start(scripted(steps), owner=None)
    seen = [event async for event in job.follow()]
    real = [e for e in seen if any(e is x for x in events)]
    assert real == events
    assert all(isinstance(e, QueuedEvent) for e in seen)


async def test_ticks_repeat_only_waiting_states():
    submitted = Submitted("fal", "r-3", "m", 1.0)
    job = ui.RunningJobs().start(scripted([(0, submitted), (6 * TICK, QueuedEvent("fal", "r-3", 1, 2.0))]),
                                 owner=None)
    seen = [event async for event in job.follow()]
    assert seen[0] is submitted and len(seen) == 2  # nothing repeated while only "submitted"


async def test_a_job_whose_page_left_runs_on_to_its_end():
    produced = []

    async def source():
        yield Submitted("wavespeed", "r-4", "m", 0.0)  # paid for: it must run on
        for i in range(5):
            await asyncio.sleep(TICK * 2)
            event = ProcessingEvent("wavespeed", "r-4", elapsed=float(i))
            produced.append(event)
            yield event

    job = ui.RunningJobs().start(source(), owner=None)
    follower = job.follow()
    first = await follower.__anext__()
    await follower.aclose()  # the page went away
    await job.task
    assert isinstance(first, Submitted) and len(produced) == 5
    assert job._queue.qsize() <= 1  # nothing was queued for a watcher that left (but the end mark)
